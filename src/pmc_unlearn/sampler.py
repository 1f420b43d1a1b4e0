"""Sampling answers from the current weights, behind one small interface.

`Sampler.sample(model, prompts, n, ...)` returns, for every prompt (a list of token ids), n
`Completion`s: the new token ids (cut after the first EOS), the decoded text, and whether the
answer hit the new-token limit without stopping (`truncated`, logged so that silent truncation
shows). Greedy decoding is `sample(..., greedy=True)` with n = 1.

Backends are registered in `SAMPLERS`; PMC does not care which one runs. Each call takes a
seed, so results do not depend on what ran before (and a resumed run samples the same).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch

from pmc_unlearn.formatting import collate_prompts


@dataclass
class Completion:
    ids: list[int]  # new tokens, EOS included when the model stopped
    text: str
    truncated: bool  # reached the new-token limit without EOS


class Sampler(Protocol):
    def sample(
        self, model, prompts: list[list[int]], n: int, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
        max_new_tokens: int = 128, seed: int = 0, greedy: bool = False,
    ) -> list[list[Completion]]: ...


def eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def finish(tokenizer, new_ids: list[int], stop: set[int], limit: int) -> Completion:
    """Cut generated ids after the first stop token (kept) or at `limit`; decode the answer text."""
    out: list[int] = []
    stopped = False
    for t in new_ids[:limit]:
        out.append(int(t))
        if t in stop:
            stopped = True
            break
    body = out[:-1] if stopped else out
    text = tokenizer.decode(body, skip_special_tokens=True).strip()
    return Completion(out, text, truncated=not stopped)


class HFSampler:
    """`transformers` generate, batched over prompts x n, left-padded, in chunks of `batch_rows` rows."""

    def __init__(self, tokenizer, batch_rows: int = 64, bf16: bool = False):
        self.tok = tokenizer
        self.batch_rows = batch_rows
        self.bf16 = bf16

    @torch.no_grad()
    def sample(self, model, prompts, n, *, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=128, seed=0, greedy=False):
        if greedy:
            n = 1
        model = getattr(model, "module", model)
        device = next(model.parameters()).device
        stop = eos_ids(model, self.tok)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else next(iter(stop))
        results: list[list[Completion]] = [[] for _ in prompts]
        per_chunk = max(1, self.batch_rows // n)
        # Sort by length so a chunk pads little; results go back to their own slot.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        was_training = model.training
        model.eval()
        try:
            for c0 in range(0, len(order), per_chunk):
                idx = order[c0 : c0 + per_chunk]
                batch = collate_prompts([prompts[i] for i in idx], pad)
                batch = {k: v.to(device) for k, v in batch.items()}
                kw = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=sorted(stop))
                if greedy:
                    kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                else:
                    kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, num_return_sequences=n)
                with torch.random.fork_rng(devices=[]), self._autocast(device):
                    torch.manual_seed(seed + c0)
                    out = model.generate(**batch, **kw)
                new = out[:, batch["input_ids"].shape[1] :].tolist()
                for r, ids in enumerate(new):
                    results[idx[r // n]].append(finish(self.tok, ids, stop, max_new_tokens))
        finally:
            model.train(was_training)
        return results

    def _autocast(self, device):
        if self.bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


SAMPLERS = {"hf": HFSampler}
