"""MUSE-News: bundled data, text rows, the pure parts of the MUSE metrics and the bootstrap (no model)."""

import hashlib
import math
import re

import pytest

from pmc_unlearn.data import is_text_row, load_qa, load_rows, muse_dir
from pmc_unlearn.errors import UserError
from pmc_unlearn.evaluation.bootstrap import bootstrap_interval, percentile_interval
from pmc_unlearn.evaluation.scoring import first_line, rouge_recall
from pmc_unlearn.evaluation import muse as MU
from pmc_unlearn.formatting import (PromptFormat, chunk_spans, collate_train, encode_row, row_prompt_ids,
                                    split_text_rows)


# ----------------------------------------------------------------------------- data

def test_shipped_files_match_their_sha256():
    text = (muse_dir() / "SOURCE.md").read_text()
    listed = re.findall(r"^([0-9a-f]{64})  (\S+)$", text, re.M)
    assert len(listed) == 9
    for digest, name in listed:
        assert hashlib.sha256((muse_dir() / name).read_bytes()).hexdigest() == digest, name
    assert "CC BY 4.0" in text and "Attribution 4.0" in (muse_dir() / "LICENSE").read_text()


def test_sources_load_with_their_shapes():
    for split, n in (("forget", 889), ("retain", 100), ("holdout", 100), ("privleak_forget", 100)):
        rows = load_rows(f"muse-news:{split}")
        assert len(rows) == n and all(set(r) == {"text"} and isinstance(r["text"], str) for r in rows), split
    verb = load_rows("muse-news:verbmem")
    assert len(verb) == 100 and all(set(r) == {"prompt", "gt"} for r in verb)
    for split, n in (("knowmem_forget", 100), ("knowmem_retain", 100), ("knowmem_forget_icl", 10),
                     ("knowmem_retain_icl", 10)):
        rows = load_rows(f"muse-news:{split}")
        assert len(rows) == n and all(set(r) == {"question", "answer"} for r in rows), split
    # as training data: the one empty article (row 821) is skipped; QA splits load as QA
    arts = load_qa("muse-news:forget", require_answers=False, allow_text=True)
    assert len(arts) == 888 and all(is_text_row(r) for r in arts)
    assert load_qa("muse-news:knowmem_forget")[0] == {"question": "What year did the Orkney Islands become part of Scotland?",
                                                      "answer": "1472"}


def test_unknown_split_and_text_where_questions_are_needed():
    with pytest.raises(UserError, match="muse-news:nope: unknown MUSE-News split; choose one of: forget, retain"):
        load_rows("muse-news:nope")
    with pytest.raises(UserError, match="no column 'question'"):
        load_qa("muse-news:forget")  # evaluation-style loading wants QA pairs


# ----------------------------------------------------------------------------- text rows

def test_chunk_spans():
    assert chunk_spans(6, 3) == [(0, 3), (3, 6)]
    assert chunk_spans(5, 2) == [(0, 2), (2, 4)]  # the 1-token tail has nothing to predict after a prefix
    assert chunk_spans(5, 2, min_tokens=1) == [(0, 2), (2, 4), (4, 5)]
    assert chunk_spans(1, 4) == []


def test_split_encode_and_prompt_of_text_rows(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.bos_token_id is None or not getattr(tokenizer, "add_bos_token", False)  # SmolLM2: no BOS
    qa = {"question": "q?", "answer": "a"}
    rows = split_text_rows(tokenizer, [{"text": text}, qa], max_length=10, prefix_tokens=4)
    assert rows[-1] is qa  # QA rows pass through
    chunks = rows[:-1]
    assert [len(c["ids"]) for c in chunks[:-1]] == [10] * (len(chunks) - 1)
    assert sum((c["ids"] for c in chunks), []) == ids[: sum(len(c["ids"]) for c in chunks)]
    assert [c["chunk"] for c in chunks] == list(range(len(chunks))) and {c["doc"] for c in chunks} == {0}
    assert chunks[0]["prefix_len"] == 4
    fmt = PromptFormat(max_length=10)
    # plain language modelling: no template, no EOS; the first token is the prompt, the other 9 are labels
    ex = encode_row(tokenizer, chunks[0], fmt)
    assert ex.prompt == ids[:1] and ex.answer == ids[1:10]
    batch = collate_train([ex], tokenizer.pad_token_id)
    assert int((batch["labels"] != -100).sum()) == 9
    # PMC's "question": the chunk's first 4 tokens
    assert row_prompt_ids(tokenizer, chunks[1], fmt) == ids[10:14]
    # prefix_only (PMC never holds the rest of a forget text)
    short = split_text_rows(tokenizer, [{"text": text}], max_length=10, prefix_tokens=4, prefix_only=True)
    assert short[0]["ids"] == ids[:4] and row_prompt_ids(tokenizer, short[0], fmt) == ids[:4]
    # a replacement answer (IDK-style) follows the prefix
    idk = encode_row(tokenizer, chunks[0], PromptFormat(max_length=64), answer="I don't know.")
    assert idk.prompt == ids[:4] and idk.answer == tokenizer(" I don't know.", add_special_tokens=False).input_ids


# ----------------------------------------------------------------------------- metrics (pure)

def test_knowmem_prompt_and_first_line():
    icl = [{"question": "A?", "answer": "1"}, {"question": "B?", "answer": "2"}]
    assert MU.knowmem_prompt(icl, "C?") == "Question: A?\nAnswer: 1\n\nQuestion: B?\nAnswer: 2\n\nQuestion: C?\nAnswer:"
    assert first_line(" 1472\n\nQuestion: next") == "1472"
    assert first_line("\n  Paris, France \nmore") == "Paris, France"


def test_verbmem_and_knowmem_on_hand_made_strings():
    # target "the cat sat on the mat" (6 tokens), generation "cat on mat": LCS 3 -> recall 1/2, precision 1,
    # F1 = 2 * 1/2 * 1 / (3/2) = 2/3
    r = rouge_recall("the cat sat on the mat", "cat on mat")
    assert r["rougeL_recall"] == pytest.approx(0.5) and r["rougeL_f1"] == pytest.approx(2 / 3)
    # knowmem: answer "1472", generation "in 1472": recall 1 (F1 2/3, not used)
    k = rouge_recall("1472", "in 1472")
    assert k["rougeL_recall"] == pytest.approx(1.0) and k["rougeL_f1"] == pytest.approx(2 / 3)
    recs = [
        {"split": "verbmem", "index": 0, "rougeL_f1": 2 / 3},
        {"split": "verbmem", "index": 1, "rougeL_f1": 0.0},
        {"split": "knowmem_forget", "index": 0, "rougeL_recall": 1.0},
        {"split": "knowmem_forget", "index": 1, "rougeL_recall": 0.5},
        {"split": "knowmem_retain", "index": 0, "rougeL_recall": 0.25},
    ]
    s = MU.summarize_muse(recs, n_resamples=200)
    assert s["verbmem_forget"] == pytest.approx(100 / 3)  # 100 x mean(2/3, 0)
    assert s["knowmem_forget"] == pytest.approx(75.0)
    assert s["knowmem_retain"] == pytest.approx(25.0) and s["knowmem_retain_ci"] == [25.0, 25.0]
    lo, hi = s["verbmem_forget_ci"]  # resampled means of {2/3, 0}: 0, 1/3 or 2/3 (x 100)
    assert lo == pytest.approx(0.0) and hi == pytest.approx(200 / 3)
    assert s["privleak"] is None and "retain" in s["privleak_note"] and math.isnan(s["privleak_min_k_auc"])


def test_privleak_on_a_tiny_example():
    def rec(split, i, score):
        return {"split": split, "index": i, "mia_min_k": score}

    # forget Min-K [1, 3], holdout [2, 4] (higher = non-member): 3 of 4 (holdout, forget) pairs are ordered,
    # AUC 0.75, AUC' = 0.25
    recs = [rec("privleak_forget", 0, 1.0), rec("privleak_forget", 1, 3.0),
            rec("privleak_holdout", 0, 2.0), rec("privleak_holdout", 1, 4.0)]
    s = MU.summarize_muse(recs, retain_auc=0.5, n_resamples=200)
    assert s["privleak_min_k_auc"] == pytest.approx(0.75)
    assert s["privleak"] == pytest.approx(-50.0)  # (0.25 - 0.5) / 0.5 x 100
    assert MU.summarize_muse(recs, retain_auc=0.75, n_resamples=10)["privleak"] == pytest.approx(0.0)
    # fully separated (the model knows its forget texts): AUC 1, AUC' 0 -> -100
    sep = [rec("privleak_forget", 0, 1.0), rec("privleak_forget", 1, 2.0),
           rec("privleak_holdout", 0, 3.0), rec("privleak_holdout", 1, 4.0)]
    s2 = MU.summarize_muse(sep, retain_auc=0.5, n_resamples=200)
    assert s2["privleak"] == pytest.approx(-100.0)
    lo, hi = s2["privleak_ci"]  # every resample keeps forget < holdout: AUC 1 (or undefined) -> -100
    assert lo == pytest.approx(-100.0) and hi == pytest.approx(-100.0)
    # the retain model's AUC from its records, on the same indices
    assert MU.retain_auc_from_records(recs, [0, 1], [0, 1]) == pytest.approx(0.75)
    with pytest.raises(UserError, match="lack 1 of the privleak texts"):
        MU.retain_auc_from_records(recs, [0, 1, 2], [0, 1])


def test_bootstrap():
    # the percentile interval: quantiles 0.025 and 0.975 of 0..100 (linear interpolation)
    # empirical quantiles: F(2) = 3/101 is the first value of F at or above 0.025, F(98) = 99/101 above 0.975
    assert percentile_interval(list(range(101))) == (2.0, 98.0)
    assert percentile_interval([float("nan"), 1.0, 3.0], level=0.5) == (1.0, 3.0)
    # values {0, 1}: a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4, so with 1000
    # resamples both extremes hold far more than 2.5% each: the interval is [0, 1]
    assert bootstrap_interval([[0.0, 1.0]], n_resamples=1000, seed=0) == (0.0, 1.0)
    a = bootstrap_interval([[0.1, 0.5, 0.9, 0.3]], n_resamples=300, seed=7)
    assert bootstrap_interval([[0.1, 0.5, 0.9, 0.3]], n_resamples=300, seed=7) == a  # fixed seed reproduces
    assert 0.1 <= a[0] < a[1] <= 0.9
    assert bootstrap_interval([[3.0, 3.0, 3.0]]) == (3.0, 3.0)  # constant values: a point
    assert all(math.isnan(x) for x in bootstrap_interval([[]]))
    # two groups resampled independently: difference of means of constants
    assert bootstrap_interval([[2.0, 2.0], [0.5]], lambda a, b: a.mean() - b.mean()) == (1.5, 1.5)


def test_coverage_of_questions_by_articles():
    texts = ["Orkney became part of Scotland in 1472.", "In 2005 there was a party."]
    qa = [{"question": "What year did Orkney become part of Scotland?", "answer": "1472"},
          {"question": "When did Elton host the stag party?", "answer": "2005"},
          {"question": "Who won?", "answer": "Nobody"}]
    assert MU.contains_answer("1472", texts[0]) and not MU.contains_answer("147", texts[0])
    assert not MU.contains_answer("1472", "in 14720")
    # q0: 6 content words (what year orkney become part scotland), 3 in the text: 3 >= 0.5 x 6
    assert MU.covers(qa[0], texts[0])
    # q1: the answer occurs but only 1 of its 5 content words (when elton host stag party): not covered
    assert not MU.covers(qa[1], texts[1])
    assert MU.answerable(qa, texts) == [0]
    assert MU.pick_docs(qa, texts, 2) == [0]  # the second text covers nothing: not picked
    assert MU.verbmem_in([{"gt": "Hello world"}, {"gt": "absent"}], ["say hello   world!"]) == [0]


def test_pair_auc_matches_sklearn():
    from pmc_unlearn.evaluation.metrics import mia_auc

    f, h = [1.0, 3.0, 2.0, 2.0], [2.0, 4.0, 0.5]
    # pairs (h > f) + ties / 2 over 12 pairs: h=2 beats 1 and ties both 2s (1 + 2 x 1/2 = 2); h=4 beats
    # all 4; h=0.5 beats none -> 6/12
    assert MU.pair_auc(f, h) == pytest.approx(0.5)
    assert mia_auc(f, h) == pytest.approx(0.5)
    assert MU.pair_auc([1.0], [2.0, 0.0, 1.0]) == pytest.approx(0.5)  # (1 + 0 + 1/2) / 3


def test_muse_profiles_validate():
    from pmc_unlearn import demo as D

    for name in ("muse-quick", "muse-test"):
        p = D.load_profile(name)
        assert p["benchmark"] == "muse-news" and p["unlearn"]["pmc"] and D.demo_class(p).__name__ == "MuseDemo"
    with pytest.raises(UserError, match=r"muse.forget_articles=0: must be >= 1"):
        D.load_profile("muse-quick", ["muse.forget_articles=0"])
    with pytest.raises(UserError, match="unknown config key evaluate.forget; known keys in 'evaluate'"):
        D.load_profile("muse-quick", ["evaluate.forget=3"])
    with pytest.raises(UserError, match="benchmark='nope': choose tofu"):
        D.load_profile("quick", ["benchmark=nope"])
