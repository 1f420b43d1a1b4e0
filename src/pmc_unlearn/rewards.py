"""PMC's score: ROUGE-L recall of a candidate against the model's own earlier answer.

Pure functions, no model. Lower score = less like what the model said before = better for
forgetting (reward = 1 - score).
"""

from __future__ import annotations

import math
from functools import lru_cache


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rougeL_recall(reference: str, candidate: str) -> float:
    """LCS(reference, candidate) / len(reference) in rouge_score tokens (stemmer on)."""
    return _scorer().score(target=reference, prediction=candidate)["rougeL"].recall


def length_penalty(candidate: str, min_len: int) -> float:
    """exp(-words) for answers shorter than `min_len` words (0 when min_len is 0 or the answer is long enough)."""
    n = len(candidate.split())
    if min_len <= 0 or n >= min_len:
        return 0.0
    return math.exp(-n)


def pmc_score(reference: str, candidate: str, min_len: int = 0) -> float:
    """ROUGE-L recall plus the optional short-answer penalty, capped at 1."""
    return min(1.0, rougeL_recall(reference, candidate) + length_penalty(candidate, min_len))


def pmc_scores(reference: str, candidates: list[str], min_len: int = 0) -> list[float]:
    return [pmc_score(reference, c, min_len) for c in candidates]
