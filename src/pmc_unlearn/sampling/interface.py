"""The sampling interface: what every backend returns and how a generated row is finished.

`Sampler.sample(model, prompts, n, ...)` returns, for every prompt (a list of token ids), n
`Completion`s: the new token ids (cut after the first EOS), the decoded text, and whether the
answer hit the new-token limit without stopping (`hit_limit`, logged so that silent truncation
shows). Greedy decoding is `sample(..., greedy=True)` with n = 1. `Completion` is the library's
one type for generated text (training samples, evaluation and attack generations).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Completion:
    """One generated continuation."""

    text: str  # decoded new tokens before the stop token (special tokens dropped, stripped)
    n_tokens: int  # new tokens before the stop token
    hit_limit: bool  # no stop token within the new-token limit: the answer was cut
    ids: list[int] = field(default_factory=list)  # new token ids, the stop token included; empty when rebuilt from a record


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




def unwrap(model, n: int, greedy: bool) -> tuple:
    """(the model under a DDP wrapper, rows per prompt): greedy decoding draws one row per prompt."""
    return getattr(model, "module", model), 1 if greedy else n


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
    return Completion(text, len(body), hit_limit=not stopped, ids=out)
