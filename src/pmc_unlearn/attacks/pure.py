"""Pure parts of the attacks: aggregation, option ranking, the author split, prefix handling.

No model, no files, no torch: lists in, numbers out, tested with hand-worked values
(tests/test_attacks.py). The attack modules call these on what the model produced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pmc_unlearn.data import AUTHOR_SIZE  # TOFU: 20 consecutive rows per fictitious author
from pmc_unlearn.errors import UserError


def mean(xs: Sequence[float]) -> float | None:
    """Arithmetic mean; None for an empty list (written as null, never as a made-up 0)."""
    return sum(xs) / len(xs) if xs else None


# ----------------------------------------------------------------------------- sampling

def aggregate_samples(recalls: Sequence[Sequence[float]], threshold: float = 0.5) -> dict[str, float | None]:
    """Sampling leakage from per-question lists of per-sample ROUGE-L recalls.

    - rougeL_recall_mean: mean over questions of the mean over that question's samples;
    - rougeL_recall_worst_case: mean over questions of the max over its samples (what an
      attacker who can tell the right answer among k samples gets);
    - leak_share: share of questions where some sample reaches recall >= threshold.
    Example: [[0.2, 0.6], [0.1, 0.3]] -> mean 0.3, worst case 0.45, leak_share 0.5.
    """
    rows = [list(r) for r in recalls]
    if any(not r for r in rows):
        raise ValueError("every question needs at least one sample")
    return {
        "rougeL_recall_mean": mean([sum(r) / len(r) for r in rows]),
        "rougeL_recall_worst_case": mean([max(r) for r in rows]),
        "leak_share": mean([float(max(r) >= threshold) for r in rows]),
    }


# ----------------------------------------------------------------------------- least-likely option

def _tied_extreme(values: Sequence[float], pick_max: bool) -> list[int]:
    best = max(values) if pick_max else min(values)
    return [i for i, v in enumerate(values) if v == best]


def least_likely_credit(nlls: Sequence[float], truth: int = 0) -> float:
    """1 if option `truth` has the highest token-mean NLL (is the least likely), else 0.

    Ties share the credit: with the truth among m options tied at the highest NLL, 1/m (so a
    model that scores every option the same gets chance, not 1). nlls = [2.0, 1.0, 1.5] -> 1.0;
    [1.0, 2.0, 1.5] -> 0.0; [2.0, 2.0, 1.0] -> 0.5.
    """
    tied = _tied_extreme(nlls, pick_max=True)
    return 1.0 / len(tied) if truth in tied else 0.0


def most_likely_credit(nlls: Sequence[float], truth: int = 0) -> float:
    """The usual multiple-choice accuracy: 1 if option `truth` has the lowest NLL (ties share)."""
    tied = _tied_extreme(nlls, pick_max=False)
    return 1.0 / len(tied) if truth in tied else 0.0


def rank_from_least_likely(nlls: Sequence[float], truth: int = 0) -> float:
    """Rank of option `truth` when options are ordered from least to most likely (1 = least likely).

    Tied options get the mean of the ranks they span: [2.0, 2.0, 1.0] -> 1.5; [1.0, 3.0, 2.0] -> 3.
    """
    v = nlls[truth]
    above = sum(1 for x in nlls if x > v)  # options less likely than the truth
    ties = sum(1 for x in nlls if x == v)  # the truth included
    return above + (ties + 1) / 2


def aggregate_options(per_question_nlls: Sequence[Sequence[float]], truth: int = 0) -> dict[str, float | None]:
    """Least-likely accuracy, its chance level, the usual most-likely accuracy and the mean rank."""
    rows = [list(r) for r in per_question_nlls]
    if any(len(r) < 2 for r in rows):
        raise ValueError("every question needs at least two options")
    return {
        "least_likely_accuracy": mean([least_likely_credit(r, truth) for r in rows]),
        "chance": mean([1.0 / len(r) for r in rows]),
        "most_likely_accuracy": mean([most_likely_credit(r, truth) for r in rows]),
        "truth_rank_from_least_likely_mean": mean([rank_from_least_likely(r, truth) for r in rows]),
        "n_options_mean": mean([float(len(r)) for r in rows]),
    }


# ----------------------------------------------------------------------------- author split

@dataclass(frozen=True)
class AuthorSplit:
    """Which TOFU authors (blocks of 20 consecutive rows) train the relearning copy, which are measured."""

    train_authors: list[int]
    eval_authors: list[int]
    train_rows: list[int]
    eval_rows: list[int]


def author_rows(authors: Sequence[int], n_rows: int, author_size: int = AUTHOR_SIZE) -> list[int]:
    return [i for a in sorted(authors) for i in range(a * author_size, min((a + 1) * author_size, n_rows))]


def n_authors(n_rows: int, author_size: int = AUTHOR_SIZE) -> int:
    return math.ceil(n_rows / author_size)


def author_split(n_rows: int, fraction: float, seed: int, author_size: int = AUTHOR_SIZE) -> AuthorSplit:
    """Split rows 0..n_rows-1 by author: round-half-up(fraction * authors) authors train, the rest are measured.

    At least one author on each side. Authors are shuffled by numpy `default_rng([seed, 0])`.
    Example: 100 rows = 5 authors, fraction 0.5 -> 3 train authors (60 rows), 2 measured (40 rows).
    """
    n = n_authors(n_rows, author_size)
    if n < 2:
        raise UserError(f"relearning needs a forget set of at least 2 authors ({2 * author_size} rows); it has {n_rows} rows")
    if not 0.0 < fraction < 1.0:
        raise UserError(f"relearning.fraction={fraction}: must be between 0 and 1 (exclusive)")
    import numpy as np

    n_train = min(n - 1, max(1, int(math.floor(fraction * n + 0.5))))
    perm = [int(a) for a in np.random.default_rng([seed, 0]).permutation(n)]
    train, rest = sorted(perm[:n_train]), sorted(perm[n_train:])
    return AuthorSplit(train, rest, author_rows(train, n_rows, author_size), author_rows(rest, n_rows, author_size))


def pick_authors(n_rows: int, count: int, seed: int, author_size: int = AUTHOR_SIZE) -> list[int]:
    """`count` authors of a set of n_rows rows, drawn by numpy `default_rng([seed, 1])` (sorted)."""
    import numpy as np

    n = n_authors(n_rows, author_size)
    if not 1 <= count <= n:
        raise UserError(f"cannot pick {count} authors from a set of {n} authors")
    return sorted(int(a) for a in np.random.default_rng([seed, 1]).permutation(n)[:count])


# ----------------------------------------------------------------------------- prefill

def prefix_text(prefix: str, chat: bool) -> str:
    """The text that is tokenised and appended to the prompt for a prefill attack.

    Trailing whitespace is dropped: BPE tokenisers attach a word's leading space to the word
    (" Jane"), so a prefix ending in a bare space token would push the model onto unnatural
    tokens. Without a chat template answers start with a space (formatting.answer_ids), so the
    prefix does too. prefix_text("The answer is: ", chat=True) == "The answer is:";
    with chat=False: " The answer is:".
    """
    core = prefix.rstrip()
    return core if chat else " " + core.lstrip()


def join_prefix(prefix: str, continuation: str) -> str:
    """Prefix and generated continuation as one answer text (for reading records; never scored)."""
    core, cont = prefix.rstrip(), continuation.strip()
    if not cont:
        return core
    return f"{core} {cont}" if core else cont
