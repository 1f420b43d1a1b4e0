"""Choosing among sampled candidates and remembering the best: pure functions.

- `select_argmin`: the lowest score wins (ties: the first); the authors' choice (tau -> 0).
- `select_bradley_terry`: candidate k with probability proportional to exp((1 - s_k) / tau).
- `update_memory`: best-so-far memory; a new pick replaces the stored one only if it scores no
  higher. A question whose stored score is 0 is resolved and is not sampled again.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass


def select_argmin(scores: list[float]) -> int:
    if not scores:
        raise ValueError("no candidates to select from")
    return min(range(len(scores)), key=lambda k: (scores[k], k))


def bradley_terry_probs(scores: list[float], tau: float) -> list[float]:
    """P(k) = exp(r_k / tau) / sum_j exp(r_j / tau), r = 1 - score (computed stably)."""
    if tau <= 0:
        raise ValueError("Bradley-Terry temperature must be > 0; use argmin selection for tau -> 0")
    r = [(1.0 - s) / tau for s in scores]
    m = max(r)
    w = [math.exp(x - m) for x in r]
    z = sum(w)
    return [x / z for x in w]


def select_bradley_terry(scores: list[float], tau: float, rng: random.Random) -> int:
    probs = bradley_terry_probs(scores, tau)
    u = rng.random()
    acc = 0.0
    for k, p in enumerate(probs):
        acc += p
        if u < acc:
            return k
    return len(probs) - 1


@dataclass
class Memory:
    """The best answer so far for one forget question."""

    text: str
    ids: list[int]  # the sampled answer tokens (EOS included when the model stopped)
    score: float
    step: int  # optimizer step at which it was chosen

    def to_json(self) -> dict:
        return asdict(self)


def is_unresolved(mem: Memory | None) -> bool:
    """Sample again unless the stored answer already scores 0."""
    return mem is None or mem.score > 0.0


def update_memory(old: Memory | None, new: Memory) -> tuple[Memory, bool]:
    """(memory to keep, whether the new pick replaced it): replace when new.score <= old.score."""
    if old is None or new.score <= old.score:
        return new, True
    return old, False
