"""`pmc-unlearn attack`: the pure parts with hand-worked numbers, then every attack end to end on tiny-random."""

from __future__ import annotations

import json

import pytest
import torch

from pmc_unlearn.attacks import pure
from pmc_unlearn.attacks.api import ATTACK_NAMES, read_attack_records, read_attacks, run_attacks
from pmc_unlearn.cli import main
from pmc_unlearn.errors import UserError
from pmc_unlearn.rewards import rougeL_recall

# ----------------------------------------------------------------------------- pure parts


def test_worst_case_aggregation_hand_worked():
    # question 1: samples 0.2, 0.6 (mean 0.4, max 0.6); question 2: 0.1, 0.3 (mean 0.2, max 0.3)
    m = pure.aggregate_samples([[0.2, 0.6], [0.1, 0.3]], threshold=0.5)
    assert m["rougeL_recall_mean"] == pytest.approx(0.3)
    assert m["rougeL_recall_worst_case"] == pytest.approx(0.45)
    assert m["leak_share"] == pytest.approx(0.5)  # only question 1 has a sample >= 0.5
    assert pure.aggregate_samples([[0.5], [0.49]])["leak_share"] == 0.5  # the threshold counts as a leak
    with pytest.raises(ValueError):
        pure.aggregate_samples([[0.1], []])


def test_option_ranking_hand_worked():
    # option 0 is the truth; the values are token-mean NLLs (higher = less likely)
    assert pure.least_likely_credit([2.0, 1.0, 1.5]) == 1.0
    assert pure.least_likely_credit([1.0, 2.0, 1.5]) == 0.0
    assert pure.least_likely_credit([2.0, 2.0, 1.0]) == 0.5  # tied with one other option: half the credit
    assert pure.least_likely_credit([1.0, 1.0, 1.0]) == pytest.approx(1 / 3)  # all equal: chance
    assert pure.most_likely_credit([1.0, 2.0, 1.5]) == 1.0
    assert pure.rank_from_least_likely([2.0, 2.0, 1.0]) == 1.5
    assert pure.rank_from_least_likely([1.0, 3.0, 2.0]) == 3
    m = pure.aggregate_options([[2.0, 1.0, 1.5], [1.0, 2.0, 1.5], [2.0, 2.0, 1.0, 1.0]])
    assert m["least_likely_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert m["chance"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 4) / 3)
    assert m["most_likely_accuracy"] == pytest.approx(1 / 3)
    assert m["truth_rank_from_least_likely_mean"] == pytest.approx((1 + 3 + 1.5) / 3)
    assert m["n_options_mean"] == pytest.approx(10 / 3)


def test_author_split():
    s = pure.author_split(40, 0.5, seed=0)  # forget01: two authors, one trains, one is measured
    assert len(s.train_authors) == len(s.eval_authors) == 1
    assert sorted(s.train_rows + s.eval_rows) == list(range(40))
    assert {i // 20 for i in s.train_rows} == set(s.train_authors) and {i // 20 for i in s.eval_rows} == set(s.eval_authors)
    assert s == pure.author_split(40, 0.5, seed=0)  # recorded seed -> the same split
    assert {tuple(pure.author_split(200, 0.5, seed=k).train_authors) for k in range(5)} != {(0, 1, 2, 3, 4)}
    # 5 authors: 0.5 * 5 = 2.5 rounds half up to 3; a tiny fraction still trains on one, a big one keeps one unseen
    assert len(pure.author_split(100, 0.5, 1).train_authors) == 3
    assert len(pure.author_split(100, 0.01, 1).train_authors) == 1
    assert len(pure.author_split(100, 0.99, 1).eval_authors) == 1
    s = pure.author_split(100, 0.5, 1)
    assert s.train_rows == [i for a in s.train_authors for i in range(20 * a, 20 * a + 20)]
    with pytest.raises(UserError, match="at least 2 authors"):
        pure.author_split(20, 0.5, 0)
    r = pure.pick_authors(3960, 2, seed=0)
    assert r == pure.pick_authors(3960, 2, seed=0) and len(r) == 2 and all(0 <= a < 198 for a in r)
    assert pure.author_rows([1], 30) == list(range(20, 30))  # a last, shorter author


def test_prefix_handling():
    assert pure.prefix_text("The answer is: ", chat=True) == "The answer is:"
    assert pure.prefix_text("The answer is: ", chat=False) == " The answer is:"
    assert pure.join_prefix("The answer is: ", " Jane Doe") == "The answer is: Jane Doe"
    # scoring the continuation only: the prefix's words must not count as recalled
    gt = "The author is Jane Doe"
    assert rougeL_recall(gt, "Jane Doe") == pytest.approx(2 / 5)
    assert rougeL_recall(gt, pure.join_prefix("The answer is: ", "Jane Doe")) == pytest.approx(4 / 5)


def test_prefilled_prompt_is_prompt_then_prefix(tokenizer):
    from pmc_unlearn.attacks.common import AttackContext
    from pmc_unlearn.attacks.prefill import _prefilled
    from pmc_unlearn.evaluation.suite import EVAL_FORMAT
    from pmc_unlearn.formatting import prompt_ids

    ctx = AttackContext(None, tokenizer, EVAL_FORMAT, "forget01", [], None, 8, 2, None, "float32", "cpu", "x", None)
    q = "Who wrote it?"
    ids = _prefilled(ctx, [q], "The answer is: ")[0]
    p = prompt_ids(tokenizer, q, EVAL_FORMAT)
    assert ids[: len(p)] == p
    assert tokenizer.decode(ids[len(p):]) == "The answer is:"  # no dangling space token


def test_rtn_quantize_hand_worked():
    from pmc_unlearn.attacks.quantization import rtn_quantize

    # 4 bits: scale = 1.5 / 7.5 = 0.2; 7.5 -> 8 -> clamped 7; -3.75 -> -4; 1.5 -> 2 (half to even); 0 -> 0
    w = torch.tensor([[1.5, -0.75, 0.3, 0.0]])
    assert torch.allclose(rtn_quantize(w, 4), torch.tensor([[1.4, -0.8, 0.4, 0.0]]))
    # groups of 2: [1.5, -0.75] scale 0.2 -> [1.4, -0.8]; [0.3, 0.0] scale 0.04 -> [0.28 (7 steps), 0.0]
    assert torch.allclose(rtn_quantize(w, 4, group_size=2), torch.tensor([[1.4, -0.8, 0.28, 0.0]]))
    x = torch.randn(8, 64)
    assert (rtn_quantize(x, 8) - x).abs().max() <= x.abs().max() / 127.5 / 2 + 1e-6  # half a step at most
    assert torch.equal(rtn_quantize(torch.zeros(2, 4), 4), torch.zeros(2, 4))


def test_rtn_fallback_matches_torchao():
    from pmc_unlearn.attacks.quantization import Settings, quantize_copy, torchao_status

    if not torchao_status()[0]:
        pytest.skip("torchao not installed")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 16, bias=False))
    for bits, g in ((8, 0), (4, 0), (4, 32)):
        s = Settings(bits=[bits], group_size_4bit=g)
        a, ia = quantize_copy(m, bits, s, "torchao")
        b, ib = quantize_copy(m, bits, s, "rtn")
        diff = (a[0].weight.dequantize() - b[0].weight).abs()
        step = m[0].weight.abs().max() / (127.5 if bits == 8 else 7.5)
        assert diff.max() <= step * 1.01 and (diff > 1e-6).float().mean() < 0.01, (bits, g)
        assert ia["weight_rel_error_mean"] == pytest.approx(ib["weight_rel_error_mean"], rel=0.05)


# ----------------------------------------------------------------------------- end to end on tiny-random

TINY = ["--max-examples", "4", "--max-new-tokens", "6", "--no-progress", "--batch-size", "4"]
SETTINGS = ["sampling.k=3", "relearning.bf16=false", "prefill.prefixes=[\"The answer is: \", \"Sure:\"]"]
BASE = ["attack", "--model", "tiny-random", "--forget-split", "forget01"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("attack") / "run"
    assert main([*BASE, "--output", str(out), *TINY, *SETTINGS]) == 0
    return out


def test_every_attack_writes_its_section(run_dir):
    doc = read_attacks(run_dir)
    assert doc["model_name"] == "tiny-random" and doc["forget_split"] == "forget01" and doc["n_forget_examples"] == 4
    assert doc["max_new_tokens"] == 6 and doc["baseline"]["n_examples"] == 4
    assert list(doc["attacks"]) == list(ATTACK_NAMES)
    for name, sec in doc["attacks"].items():
        for k in ("settings", "time_s", "n_examples", "headline", "metrics"):
            assert k in sec, (name, k)
        assert set(sec["headline"]) == {"metric", "value", "reference", "reference_name"}
        assert sec["headline"]["value"] is not None and sec["time_s"] >= 0
    a = doc["attacks"]
    assert a["sampling"]["settings"]["k"] == 3 and a["sampling"]["metrics"]["n_samples"] == 12
    assert {"rougeL_recall_mean", "rougeL_recall_worst_case", "leak_share"} <= set(a["sampling"]["metrics"])
    assert a["sampling"]["metrics"]["rougeL_recall_worst_case"] >= a["sampling"]["metrics"]["rougeL_recall_mean"]
    pre = a["prefill"]["metrics"]
    assert [p["prefix"] for p in pre["by_prefix"]] == ["The answer is: ", "Sure:"] and pre["prefix_scored"] is False
    assert all(p["retain_rougeL_recall"] is not None for p in pre["by_prefix"])
    assert {"para_rougeL_recall", "para_vs_original_answer_rougeL_recall"} <= set(a["paraphrase"]["metrics"])
    rl = a["relearning"]
    split = rl["split"]
    assert split["seed"] == 0 and len(split["train_rows"]) == len(split["eval_rows"]) == 4
    assert not set(split["train_rows"]) & set(split["eval_rows"])
    assert {i // 20 for i in split["eval_rows"]} == set(split["eval_authors"])
    assert split["retain_source"] == "tofu:retain99" and len(split["retain_rows"]) == 4
    assert rl["metrics"]["forget_ft"]["steps"] == 1 and rl["metrics"]["retain_ft"]["steps"] == 1
    assert rl["metrics"]["forget_ft"]["model_folder"] is None  # weights deleted after measuring
    assert not (run_dir / "relearning" / "forget_ft" / "model").exists()
    assert not (run_dir / "relearning" / "base_model").exists()
    assert (run_dir / "relearning" / "forget_ft" / "log.jsonl").exists()
    q = a["quantization"]
    assert q["backend"] in ("torchao", "rtn") and q["backend_reason"]
    assert set(q["metrics"]["by_bits"]) == {"8", "4"}
    assert 0 < q["metrics"]["by_bits"]["8"]["weight_rel_error_mean"] < q["metrics"]["by_bits"]["4"]["weight_rel_error_mean"]
    ll = a["least_likely"]["metrics"]
    assert ll["chance"] == pytest.approx(1 / 6) and 0 <= ll["least_likely_accuracy"] <= 1


def test_records_per_attack(run_dir):
    recs = read_attack_records(run_dir)
    count = {}
    for r in recs:
        count[r["attack"]] = count.get(r["attack"], 0) + 1
    assert count == {"baseline": 4, "sampling": 4, "prefill": 4 + 2 * 8, "paraphrase": 4, "relearning": 4 * 3,
                     "quantization": 8, "least_likely": 4}
    s = next(r for r in recs if r["attack"] == "sampling")
    assert len(s["samples"]) == len(s["rougeL_recall"]) == 3
    assert max(s["rougeL_recall"]) == s["rougeL_recall_max"]
    ll = next(r for r in recs if r["attack"] == "least_likely")
    assert len(ll["options"]) == len(ll["mean_logprob"]) == 6


def test_rerun_skips_finished_attacks(run_dir, monkeypatch):
    import pmc_unlearn.attacks.api as api

    def boom(name):
        raise AssertionError(f"{name} ran again")

    real = api.attack_module
    monkeypatch.setattr(api, "attack_module", lambda n: type("M", (), {"Settings": real(n).Settings,
                                                                        "run": staticmethod(lambda *a: boom(n))}))
    before = (run_dir / "attacks.json").read_text()
    assert main([*BASE, "--output", str(run_dir), *TINY, *SETTINGS]) == 0
    assert json.loads(before)["attacks"] == read_attacks(run_dir)["attacks"]


def test_overwrite_reruns_only_the_named_attack(run_dir, tmp_path):
    import shutil

    dest = tmp_path / "copy"
    shutil.copytree(run_dir, dest)
    old = read_attacks(dest)
    assert main([*BASE, "--output", str(dest), *TINY, "--attacks", "paraphrase", "--overwrite"]) == 0
    new = read_attacks(dest)
    assert new["attacks"]["paraphrase"]["finished_at"] >= old["attacks"]["paraphrase"]["finished_at"]
    assert new["attacks"]["sampling"] == old["attacks"]["sampling"]
    assert sum(r["attack"] == "paraphrase" for r in read_attack_records(dest)) == 4  # replaced, not appended


@pytest.mark.parametrize("change, words", [
    (["sampling.k=5"], "other settings"),  # the sampling section exists with k=3
    (["--max-new-tokens", "7"], "other run settings"),  # it was run with 6 (argparse keeps the last)
])
def test_changed_settings_are_refused_without_overwrite(run_dir, capsys, change, words):
    assert main([*BASE, "--output", str(run_dir), *TINY, *SETTINGS, *change]) == 2
    err = capsys.readouterr().err
    assert words in err and "--overwrite" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, words", [
    (["--attacks", "sampling,jailbreak"], "unknown attack 'jailbreak'"),
    (["sampling.k=0"], "sampling.k"),
    (["sampling.beams=2"], "unknown config key sampling.beams"),
    (["--attacks", "prefill", "sampling.k=2"], "not among the attacks"),
    (["quantization.bits=[3]"], "quantization.bits"),
    (["relearning.fraction=1.0"], "relearning.fraction"),
    (["prefill.prefixes=[]"], "prefill.prefixes"),
    (["--max-examples", "0"], "--max-examples"),
    (["bad_override"], "section.key=value"),
])
def test_bad_input_exits_2_before_writing(tmp_path, capsys, args, words):
    out = tmp_path / "o"
    assert main([*BASE, "--output", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_model_and_split_exit_2(tmp_path, capsys):
    assert main(["attack", "--model", str(tmp_path / "nope"), "--forget-split", "forget01", "--output", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["attack", "--model", "tiny-random", "--forget-split", "forget02", "--output", str(tmp_path / "o")]) == 2
    assert "forget01" in capsys.readouterr().err
    assert main(["attack", "--model", "tiny-random", "--forget-split", "forget01"]) == 2
    assert "--output" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_api_on_a_loaded_model_with_the_rtn_fallback(tiny, tmp_path):
    doc = run_attacks(tiny, "forget01", tmp_path / "q", attacks="quantization", max_examples=2, max_new_tokens=4,
                      settings={"quantization": {"backend": "rtn", "bits": "[4]", "group_size_4bit": 0}}, progress=False)
    q = doc["attacks"]["quantization"]
    assert q["backend"] == "rtn" and "asked for" in q["backend_reason"]
    assert q["metrics"]["by_bits"]["4"]["group_size"] == "per_channel"
    assert q["metrics"]["by_bits"]["4"]["config"] == "rtn_quantize(bits=4, group_size=0)"
    with pytest.raises(UserError, match="group_size_4bit=48"):
        run_attacks(tiny, "forget01", tmp_path / "q2", attacks=["quantization"], max_examples=2,
                    settings={"quantization": {"group_size_4bit": 48}}, progress=False)


def test_sampling_with_the_hf_backend(tiny, tmp_path):
    doc = run_attacks(tiny, "forget01", tmp_path / "s", attacks=["sampling"], max_examples=2, max_new_tokens=4,
                      settings={"sampling": {"backend": "hf", "k": 2}}, progress=False)
    sec = doc["attacks"]["sampling"]
    assert sec["sampler"] == "hf" and sec["metrics"]["n_samples"] == 4
    assert doc["baseline"]["n_examples"] == 2
