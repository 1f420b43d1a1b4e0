"""The method interface and the context the training loop hands to methods.

The loop (pmc_unlearn.trainer) owns data order, micro-batches, the optimizer, checkpoints and
logging. A method only says what to do with a micro-batch of primary-set indices:

    configure_model(model)      optional: before the optimizer exists (freeze weights)
    setup(ctx)                  once, before training (PMC: greedy reference answers);
                                skipped state is restored from a checkpoint instead
    on_epoch_start(ctx, epoch)  optional hook
    prepare(ctx, idx, ridx)     build the batch (PMC samples and selects here) -> Prepared
    loss(ctx, model, prepared)  -> (scalar loss, {log key: float}); runs under autocast
    state_dict / load_state_dict  whatever must survive a crash (PMC: references, memory)

`idx` are indices into the primary set (the forget set for unlearning, the training set for
fine-tuning); `ridx` are retain indices drawn by the loop, one per primary index.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from pmc_unlearn.formatting import PromptFormat


def derive_seed(*keys: Any) -> int:
    """A 31-bit seed from any keys (seed, step, example, ...): same keys, same seed, any process."""
    h = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


@dataclass
class RunContext:
    cfg: Any  # RunConfig
    model: Any  # possibly wrapped by accelerate (DDP/FSDP)
    tokenizer: Any
    fmt: PromptFormat
    primary: list[dict]
    retain: list[dict]
    accelerator: Any
    sampler: Any = None
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro: int = 0  # micro-batch index within the epoch
    write_samples: Callable[[list[dict]], None] = lambda rows: None
    bf16: bool = False  # the loop's resolved autocast (train.bf16 on this device)
    weights_dtype: str = "float32"  # the resolved model.dtype
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def raw_model(self):
        return self.accelerator.unwrap_model(self.model)

    def gather(self, obj: list) -> list:
        """Concatenate a list from every process (identity with one process)."""
        if self.accelerator.num_processes == 1:
            return obj
        from accelerate.utils import gather_object

        return gather_object(obj)


@dataclass
class Prepared:
    batch: dict[str, torch.Tensor]  # collated tensors (right-padded), forget rows first
    n_primary: int  # rows [0, n_primary) are primary-set rows, the rest retain rows
    stats: dict[str, float] = field(default_factory=dict)
    tokens: int = 0  # answer tokens trained on (for throughput)


class Method:
    name = "base"
    uses_primary_answers = True  # PMC: False (it never reads the forget answers)
    uses_retain = True

    def __init__(self, cfg):
        self.cfg = cfg

    def configure_model(self, model) -> None:
        """Called once before the optimizer is built: freeze weights here (e.g. RMU trains a few layers)."""

    def setup(self, ctx: RunContext) -> None:
        pass

    def on_epoch_start(self, ctx: RunContext, epoch: int) -> None:
        pass

    def prepare(self, ctx: RunContext, idx: list[int], ridx: list[int]) -> Prepared:
        raise NotImplementedError

    def loss(self, ctx: RunContext, model, prep: Prepared) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def manifest_info(self) -> dict:
        """Extra facts for manifest.json (e.g. a reference model's memory cost)."""
        return {}


def answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a right-padded batch, from the first position that predicts an answer token on.

    Prompt positions before it predict nothing the losses count, so the vocabulary projection
    (a fifth of a small model's FLOPs) and the fp32 log-softmax skip them; `labels` is cut to the
    same window, so every shift-based loss gives the numbers of the full-length logits.
    """
    from pmc_unlearn.formatting import IGNORE
    from pmc_unlearn.models import takes_logits_to_keep

    labels = batch["labels"]
    T = labels.shape[1]
    counted = (labels != IGNORE).any(0)  # [T]
    first = int(counted.float().argmax()) if bool(counted.any()) else 1
    start = max(0, first - 1)  # the position that predicts the first answer token
    kw = {}
    if start > 0 and takes_logits_to_keep(model):
        # an index tensor: the int form slices a strided view, which makes matmul copy the LM head
        kw["logits_to_keep"] = torch.arange(start, T, device=labels.device)
    else:
        start = 0
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw).logits
    return logits, labels[:, start:]


def answer_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`losses.token_logprobs` of the batch's answer tokens, via `answer_logits` ([B, L] each, L <= T-1)."""
    from pmc_unlearn.losses import token_logprobs

    return token_logprobs(*answer_logits(model, batch))


def split_nll(logits: torch.Tensor, labels: torch.Tensor, n_primary: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-mean NLL of the primary rows and of the retain rows of one forward pass."""
    from pmc_unlearn.losses import token_logprobs

    lp, mask = token_logprobs(logits, labels)  # [B, T-1]
    p = -lp[:n_primary].sum() / mask[:n_primary].sum().clamp(min=1)
    if n_primary == lp.shape[0]:
        return p, None
    r = -lp[n_primary:].sum() / mask[n_primary:].sum().clamp(min=1)
    return p, r
