"""Score, selection and memory: hand-worked numbers."""

import math
import random

import pytest

from pmc_unlearn.rewards import length_penalty, pmc_score, rougeL_recall
from pmc_unlearn.selection import (
    Memory, bradley_terry_probs, is_unresolved, select_argmin, select_bradley_terry, update_memory,
)


def test_rougeL_recall_hand_worked():
    # reference has 6 tokens; the LCS with the candidate is "the cat" -> 2/6
    assert rougeL_recall("the cat sat on the mat", "the cat ate") == pytest.approx(2 / 6)
    # LCS is order-aware: "mat the" against "the ... mat" has LCS length 1 -> 1/6
    assert rougeL_recall("the cat sat on the mat", "mat") == pytest.approx(1 / 6)
    # the stemmer maps running->run, dogs->dog: full recall
    assert rougeL_recall("running dogs", "run dog") == pytest.approx(1.0)
    assert rougeL_recall("alpha beta", "") == 0.0


def test_length_penalty_and_cap():
    assert length_penalty("a b c", 0) == 0.0  # off
    assert length_penalty("a b c", 3) == 0.0  # long enough
    assert length_penalty("hi", 3) == pytest.approx(math.exp(-1))  # one word: e^-1 = 0.3679
    # empty: "".split(" ") is [""], one word for the authors' count -> e^-1; the whitespace count: 0 words -> e^0
    assert length_penalty("", 3) == pytest.approx(math.exp(-1))
    assert length_penalty("", 3, words="whitespace") == pytest.approx(1.0)
    # recall 2/6 + e^-2 (two words "the cat" < 5) = 0.3333 + 0.1353 = 0.4687
    assert pmc_score("the cat sat on the mat", "the cat", min_len=5) == pytest.approx(2 / 6 + math.exp(-2))
    # capped at 1: recall 1 + penalty
    assert pmc_score("cat", "cat", min_len=5) == 1.0


def test_word_count_follows_the_authors_split_on_single_spaces():
    from pmc_unlearn.rewards import word_count

    # "a  b": split(" ") gives ["a", "", "b"] = 3 words; split() gives ["a", "b"] = 2
    assert word_count("a  b") == 3 and word_count("a  b", "whitespace") == 2
    # a trailing space adds an empty word: "hi " -> ["hi", ""] = 2; a newline is not a separator: "a\nb" -> 1
    assert word_count("hi ") == 2 and word_count("a\nb") == 1 and word_count("a\nb", "whitespace") == 2
    # min_len 3: "a  b" is long enough for the authors (3 words, no penalty), not for split() (2 words: + e^-2)
    assert length_penalty("a  b", 3) == 0.0
    assert length_penalty("a  b", 3, words="whitespace") == pytest.approx(math.exp(-2))  # 0.1353
    # a score with the authors' empty-answer penalty: recall 0 ("" shares nothing) + e^-1 = 0.3679
    assert pmc_score("the cat", "", min_len=5) == pytest.approx(math.exp(-1))
    assert pmc_score("the cat", "", min_len=5, words="whitespace") == pytest.approx(1.0)
    with pytest.raises(ValueError):
        word_count("x", "letters")


def test_argmin_ties_take_first():
    assert select_argmin([0.5, 0.2, 0.2, 0.9]) == 1
    assert select_argmin([0.0]) == 0
    with pytest.raises(ValueError):
        select_argmin([])


def test_bradley_terry_probs_hand_worked():
    # scores 0 and 0.5, tau 0.5: rewards 1 and 0.5 -> logits 2 and 1 -> p0 = e^2/(e^2+e) = 0.7311
    p = bradley_terry_probs([0.0, 0.5], 0.5)
    assert p[0] == pytest.approx(math.e**2 / (math.e**2 + math.e))
    assert sum(p) == pytest.approx(1.0)
    # small tau approaches argmin
    assert bradley_terry_probs([0.3, 0.1, 0.2], 1e-4)[1] == pytest.approx(1.0)
    rng = random.Random(0)
    picks = [select_bradley_terry([0.0, 0.5], 0.5, rng) for _ in range(4000)]
    assert picks.count(0) / 4000 == pytest.approx(0.7311, abs=0.03)


def test_memory_update_rules():
    a = Memory("first", [1], 0.4, 0)
    kept, replaced = update_memory(None, a)
    assert kept is a and replaced
    worse = Memory("worse", [2], 0.6, 1)
    kept, replaced = update_memory(a, worse)
    assert kept is a and not replaced  # higher score never replaces
    equal = Memory("equal", [3], 0.4, 2)
    kept, replaced = update_memory(a, equal)
    assert kept is equal and replaced  # "scores no higher": ties replace
    zero = Memory("zero", [4], 0.0, 3)
    assert is_unresolved(None) and is_unresolved(a) and not is_unresolved(zero)
