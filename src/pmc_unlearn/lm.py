"""The one interface to a causal language model: score continuations, generate text.

Everything that asks a model about text goes through here: the training losses (methods),
the evaluation's records and the attacks.

- `score(model, prompts, continuations, pad_id) -> Scored`: the log-probability of every
  continuation token given its prompt and the tokens before it (teacher forcing), from one
  right-padded forward pass. `score_batch` does the same for a batch already collated and on
  the model's device (the training loop's batches); `score_shared` runs each prompt once for
  several continuations (a KV cache whose rows are repeated per continuation).
- `generate(model, tokenizer, prompts, decoding) -> [[Completion]]`: n continuations per
  prompt from a sampling backend (`sampling.SAMPLERS`), greedy or sampled; `Completion` is the
  library's one type for generated text.

The logits come only from the positions that predict a counted token on (the vocabulary
projection and the fp32 log-softmax skip the prompt), so every number equals the one a full
forward pass gives. Log-probabilities are fp32 (`losses.token_logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from pmc_unlearn.formatting import IGNORE, Example, collate_prompts, collate_train
from pmc_unlearn.losses import token_logprobs
from pmc_unlearn.models import takes_logits_to_keep


@dataclass
class Scored:
    """Predictions over a window of positions and the labels they predict (HF alignment).

    `logits[:, t]` predicts `labels[:, t + 1]`; labels are IGNORE where nothing counts. The
    window ends at the last position and starts where the first counted label is predicted.
    """

    logits: torch.Tensor  # [B, L, V]
    labels: torch.Tensor  # [B, L]

    @cached_property
    def _token_logprobs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return token_logprobs(self.logits, self.labels)

    @property
    def logprobs(self) -> torch.Tensor:
        """Log-prob of each target token, 0 where none counts, [B, L-1] (fp32)."""
        return self._token_logprobs[0]

    @property
    def mask(self) -> torch.Tensor:
        """Which targets count, [B, L-1] (bool)."""
        return self._token_logprobs[1]


def to_device(batch: dict, device, non_blocking: bool = False) -> dict:
    """The batch's tensors on `device` (other values as they are)."""
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def window_start(labels: torch.Tensor) -> int:
    """The position that predicts the first counted label of any row (0 when none counts)."""
    counted = (labels != IGNORE).any(0)  # [T]
    first = int(counted.float().argmax()) if bool(counted.any()) else 1
    return max(0, first - 1)


def forward_from(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
    """Logits of positions [start, T) ([B, T - start, V]); all T positions when the model cannot skip any."""
    kw = {}
    if start > 0 and takes_logits_to_keep(model):
        # an index tensor: the int form slices a strided view, which makes matmul copy the LM head
        kw["logits_to_keep"] = torch.arange(start, input_ids.shape[1], device=input_ids.device)
    return model(input_ids=input_ids, attention_mask=attention_mask, **kw).logits


def score_batch(model, batch: dict[str, torch.Tensor]) -> Scored:
    """Scores of a right-padded batch (input_ids, attention_mask, labels) on the model's device.

    Runs under whatever grad/autocast mode the caller set: training losses differentiate it.
    """
    labels = batch["labels"]
    logits = forward_from(model, batch["input_ids"], batch["attention_mask"], window_start(labels))
    return Scored(logits, labels[:, labels.shape[1] - logits.shape[1]:])


def score(model, prompts: list[list[int]], continuations: list[list[int]], pad_id: int) -> Scored:
    """Scores of each continuation given its prompt (token ids), one right-padded forward pass."""
    batch = collate_train([Example(list(p), list(c)) for p, c in zip(prompts, continuations)], pad_id)
    return score_batch(model, to_device(batch, model_device(model)))


def supports_shared_prompt(model) -> bool:
    """Prefix sharing needs a KV cache the forward accepts with explicit positions (decoder-only HF models)."""
    return takes_logits_to_keep(model) and getattr(getattr(model, "config", None), "is_encoder_decoder", False) is False


def score_shared(model, prompts: list[list[int]], continuations: list[list[list[int]]], pad_id: int) -> Scored:
    """Scores of several continuations per prompt, each prompt's tokens run once; rows prompt-major.

    The prompts (left-padded) are prefilled with a KV cache, whose rows are repeated for each of
    their continuations; the continuations (right-padded, positions continuing their prompt's)
    then run on the cache. The first continuation token is predicted by the prompt's last
    position, the others by the continuation positions, exactly as in one forward pass of
    prompt + continuation (same numbers within float rounding). Window: column 0 is the prompt's
    last position, so `labels[:, 0]` is IGNORE.
    """
    from transformers import DynamicCache

    dev = model_device(model)
    q = collate_prompts(prompts, pad_id)  # left-padded: every prompt ends at position P-1
    q_ids, q_mask = q["input_ids"].to(dev), q["attention_mask"].to(dev)
    P = q_ids.shape[1]
    q_pos = (q_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    last = model(input_ids=q_ids, attention_mask=q_mask, position_ids=q_pos, past_key_values=cache, use_cache=True,
                 logits_to_keep=torch.tensor([P - 1], device=dev)).logits  # [Q, 1, V]
    owner = [q for q, g in enumerate(continuations) for _ in g]
    conts = [c for g in continuations for c in g]
    idx = torch.tensor(owner, device=dev)
    cache.batch_select_indices(idx)  # [N rows] of the prompts' keys and values
    A = max(len(c) for c in conts)
    a_ids = torch.full((len(conts), A), pad_id, dtype=torch.long)
    a_mask = torch.zeros((len(conts), A), dtype=torch.long)
    labels = torch.full((len(conts), A + 1), IGNORE, dtype=torch.long)  # column 0: the last prompt position
    for r, c in enumerate(conts):
        a_ids[r, : len(c)] = torch.tensor(c)
        a_mask[r, : len(c)] = 1
        labels[r, 1 : len(c) + 1] = torch.tensor(c)
    a_ids, a_mask = a_ids.to(dev), a_mask.to(dev)
    plen = torch.tensor([len(prompts[q]) for q in owner], device=dev)
    a_pos = plen[:, None] + torch.arange(A, device=dev)[None, :]
    logits = model(input_ids=a_ids, attention_mask=torch.cat([q_mask[idx], a_mask], 1), position_ids=a_pos,
                   past_key_values=cache, use_cache=True).logits  # [N, A, V]
    return Scored(torch.cat([last[idx], logits], 1), labels.to(dev))  # [N, A+1, V]


@dataclass(frozen=True)
class Decoding:
    """How `generate` decodes: greedy (n = 1) or sampled, the new-token limit, the backend."""

    n: int = 1  # continuations per prompt (greedy: always 1)
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 128
    seed: int = 0
    backend: str = "fast"  # a key of sampling.SAMPLERS
    batch_rows: int = 256  # rows (prompts x n) per decoding batch; results do not depend on it


def generate(model, tokenizer, prompts: list[list[int]], decoding: Decoding = Decoding()) -> list[list]:
    """`decoding.n` `Completion`s per prompt (token ids), in input order, cut at the first stop token."""
    from pmc_unlearn.sampling import SAMPLERS

    d = decoding
    sampler = SAMPLERS[d.backend](tokenizer, batch_rows=d.batch_rows)
    return sampler.sample(model, [list(p) for p in prompts], d.n, temperature=d.temperature, top_p=d.top_p,
                          top_k=d.top_k, max_new_tokens=d.max_new_tokens, seed=d.seed, greedy=d.greedy)
