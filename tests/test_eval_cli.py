"""`pmc-unlearn eval` end to end on the tiny random model, and its refusals of bad input."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from eval_fixtures import eval_cache  # noqa: F401  (fixture)

from pmc_unlearn.cli import main
from pmc_unlearn.evaluation import records as R
from pmc_unlearn.evaluation import scoring as SC

SUMMARY_KEYS = [
    "unlearn_quality", "utility",
    "forget_quality", "model_utility", "forget_truth_ratio", "forget_prob", "forget_rougeL_recall",
    "forget_para_rougeL_recall", "retain_prob", "retain_rougeL_recall", "retain_truth_ratio",
    "real_authors_prob", "real_authors_rougeL_recall", "real_authors_truth_ratio",
    "world_facts_prob", "world_facts_rougeL_recall", "world_facts_truth_ratio",
    "exact_memorization", "extraction_strength", "mia_loss_auc", "mia_zlib_auc", "mia_min_k_auc",
    "mia_min_k_plus_plus_auc", "privleak",
    # settings
    "model_fingerprint", "model_name", "forget_split", "n_examples_forget", "n_examples_holdout",
    "max_new_tokens", "batch_size", "dtype", "time_collect_s", "time_aggregate_s", "version_torch",
    "version_transformers", "forget_quality_note",
]
BASE = ["eval", "--model", "tiny-random", "--forget-split", "forget01", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(eval_cache, tmp_path_factory):
    """The documented smoke command, run once for the module; returns (output folder, seconds)."""
    out = tmp_path_factory.mktemp("eval") / "run"
    t = time.time()
    rc = main(["eval", "--model", "tiny-random", "--forget-split", "forget01", "--no-forget-quality",
               "--max-examples", "8", "--output", str(out)])
    assert rc == 0
    return out, time.time() - t


def test_smoke_run_writes_records_and_every_summary_key(run_dir):
    out, seconds = run_dir
    assert seconds < 120
    s = json.loads((out / "summary.json").read_text())
    missing = [k for k in SUMMARY_KEYS if k not in s]
    assert not missing, missing
    assert s["forget_quality"] is None and s["privleak"] is None  # reported as null, with the note
    assert s["n_examples_forget"] == 8 and s["max_new_tokens"] == 200
    # --dtype auto: bfloat16 where this CPU runs it natively, float32 elsewhere; the summary says which and why
    from pmc_unlearn.precision import cpu_native_bf16

    assert s["dtype"] == ("bfloat16" if cpu_native_bf16() else "float32") == s["precision"]["dtype"]
    assert s["precision"]["setting"] == "auto" and s["precision"]["reason"].startswith("auto: CPU")
    recs = R.read_records(out / "records.jsonl")
    splits = {r["split"] for r in recs}
    assert splits == {"forget", "forget_para", "retain", "real_authors", "world_facts", "holdout"}
    assert all(sum(r["split"] == sp for r in recs) == 8 for sp in splits)
    f0 = next(r for r in recs if r["split"] == "forget")
    for k in ("question", "answer", "index", "nll", "para_nll", "pert_nll", "generation", "rougeL_recall",
              "rouge1_recall", "em", "es", "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus",
              "gen_hit_limit", "max_new_tokens"):
        assert k in f0, k
    assert len(f0["pert_nll"]) == 5
    ev = json.loads((out / "TOFU_EVAL.json").read_text())
    assert set(ev["forget_truth_ratio"]["value_by_index"]) == {str(i) for i in range(8)}
    assert "auc" in ev["mia_min_k"] and "forget" in ev["mia_min_k"] and "holdout" in ev["mia_min_k"]
    ou = json.loads((out / "TOFU_SUMMARY.json").read_text())
    for k in ("forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio", "model_utility", "ra_Q_A_Prob_normalised",
              "wf_Truth_Ratio", "retain_Truth_Ratio", "forget_quality", "privleak", "mia_min_k", "extraction_strength"):
        assert k in ou, k
    assert ou["model_utility"] == pytest.approx(s["model_utility"])


def test_missing_retain_records_exits_2(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(BASE + ["--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--retain-records" in err and "--no-forget-quality" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before any work


def test_retain_records_give_forget_quality(run_dir, tmp_path):
    # the same model as its own "retain model": identical truth ratios -> KS p = 1, PrivLeak = 0
    out, _ = run_dir
    for ref in (out / "records.jsonl", out, out / "TOFU_EVAL.json"):
        dest = tmp_path / ref.name.replace(".", "_")
        assert main(BASE + ["--max-examples", "8", "--retain-records", str(ref), "--output", str(dest)]) == 0
        s = json.loads((dest / "summary.json").read_text())
        assert s["forget_quality"] == pytest.approx(1.0)
        assert s["privleak"] == pytest.approx(0.0, abs=1e-9)
        assert "forget_quality_note" not in s


def test_mismatched_retain_records_are_refused(run_dir, tmp_path, capsys):
    out, _ = run_dir
    recs = (out / "records.jsonl").read_text().splitlines()
    # 1. another forget split: records of forget01 for a forget05 evaluation
    assert main(["eval", "--model", "tiny-random", "--forget-split", "forget05", "--max-examples", "8",
                 "--retain-records", str(out / "records.jsonl"), "--output", str(tmp_path / "a")]) == 2
    assert "forget01" in capsys.readouterr().err
    # 2. another question set: one forget question changed
    bad = []
    for line in recs:
        r = json.loads(line)
        if r["split"] == "forget" and r["index"] == 3:
            r["question"] = "Who wrote a different book?"
        bad.append(json.dumps(r))
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(bad) + "\n")
    assert main(BASE + ["--max-examples", "8", "--retain-records", str(p), "--output", str(tmp_path / "b")]) == 2
    assert "differs" in capsys.readouterr().err
    # 3. another count: an open-unlearning file with 200 forget truth ratios (forget05's size) for forget01
    ev = {"forget_truth_ratio": {"agg_value": 0.5, "value_by_index": {str(i): {"score": 0.5} for i in range(200)}}}
    q = tmp_path / "TOFU_EVAL.json"
    q.write_text(json.dumps(ev))
    assert main(BASE + ["--retain-records", str(q), "--output", str(tmp_path / "c")]) == 2
    assert "covers 200" in capsys.readouterr().err
    # 4. fewer examples than evaluated: records of 8 questions for a 10-question evaluation
    assert main(BASE + ["--max-examples", "10", "--retain-records", str(out), "--output", str(tmp_path / "d")]) == 2
    assert "lacks forget questions" in capsys.readouterr().err
    assert not any((tmp_path / x).exists() for x in "abcd")


@pytest.mark.parametrize("args, words", [
    (["--batch-size", "0", "--no-forget-quality"], "--batch-size"),
    (["--max-examples", "0", "--no-forget-quality"], "--max-examples"),
    (["--max-new-tokens", "0", "--no-forget-quality"], "--max-new-tokens"),
    (["--retain-records", "/nonexistent/records.jsonl"], "not found"),
])
def test_bad_input_exits_2(tmp_path, capsys, args, words):
    assert main(BASE + args + ["--output", str(tmp_path / "o")]) == 2
    assert words in capsys.readouterr().err


def test_killed_run_resumes_without_recomputing(run_dir, tmp_path, monkeypatch):
    out, _ = run_dir
    dest = tmp_path / "resume"
    dest.mkdir()
    lines = (out / "records.jsonl").read_text().splitlines()
    keep = lines[:-5]  # the last five records (holdout) are lost, the last one half written
    (dest / "records.jsonl").write_text("\n".join(keep) + "\n" + lines[-5][:40])
    lost = {(json.loads(x)["split"], json.loads(x)["index"]) for x in lines[-5:]}
    computed = []
    real = SC.compute_items
    monkeypatch.setattr(SC, "compute_items", lambda m, t, work, *a, **k:
                        computed.extend((spec.name, it.index) for spec, it in work) or real(m, t, work, *a, **k))
    assert main(BASE + ["--no-forget-quality", "--max-examples", "8", "--no-cache", "--output", str(dest)]) == 0
    assert set(computed) == lost
    a = json.loads((out / "summary.json").read_text())
    b = json.loads((dest / "summary.json").read_text())
    for k in ("forget_truth_ratio", "model_utility", "mia_min_k_auc", "unlearn_quality"):
        assert a[k] == pytest.approx(b[k], abs=1e-6), k


def test_output_of_another_model_is_refused(run_dir, tmp_path, capsys):
    out, _ = run_dir
    dest = tmp_path / "other"
    shutil.copytree(out, dest)
    # another generation limit = other records: resuming into this folder would mix them
    assert main(BASE + ["--no-forget-quality", "--max-examples", "8", "--max-new-tokens", "7",
                        "--output", str(dest)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_convention_switch_reuses_the_records_and_refuses_a_mixed_reference(run_dir, tmp_path, monkeypatch, capsys):
    out, _ = run_dir
    ou = json.loads((out / "summary.json").read_text())
    assert ou["convention"] == "open-unlearning"  # the default
    assert json.loads((out / "TOFU_EVAL.json").read_text())["pmc_unlearn"] == {"convention": "open-unlearning"}
    computed = []
    real = SC.compute_items
    monkeypatch.setattr(SC, "compute_items", lambda m, t, work, *a, **k: computed.extend(work) or real(m, t, work, *a, **k))
    dest = tmp_path / "pmc"
    assert main(BASE + ["--no-forget-quality", "--max-examples", "8", "--convention", "pmc-unlearn",
                        "--output", str(dest)]) == 0
    assert computed == []  # the cached records serve both conventions: only the aggregation differs
    pmc = json.loads((dest / "summary.json").read_text())
    assert pmc["convention"] == "pmc-unlearn"
    # what both conventions define alike: the output-level metrics, the ROUGE and the LOSS attack
    for k in ("unlearn_quality", "utility", "forget_rougeL_recall", "mia_loss_auc", "forget_prob"):
        assert pmc[k] == pytest.approx(ou[k], abs=1e-9), k
    # per record: EM over every answer token (pmc-unlearn) or without the last one (open-unlearning)
    a = {r["index"]: r for r in R.read_records(out / "records.jsonl") if r["split"] == "forget"}
    b = {r["index"]: r for r in R.read_records(dest / "records.jsonl") if r["split"] == "forget"}
    for i, r in b.items():
        assert r["convention"] == "pmc-unlearn" and a[i]["convention"] == "open-unlearning"
        assert r["em"] == pytest.approx(sum(r["tok_hit"]) / len(r["tok_hit"]))
        assert a[i]["em"] == pytest.approx(sum(r["tok_hit"][:-1]) / (len(r["tok_hit"]) - 1))
    # references: our records convert; an open-unlearning-convention TOFU_EVAL.json is refused under pmc-unlearn
    assert main(BASE + ["--max-examples", "8", "--convention", "pmc-unlearn", "--retain-records",
                        str(out / "records.jsonl"), "--output", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["forget_quality"] == pytest.approx(1.0)
    capsys.readouterr()
    assert main(BASE + ["--max-examples", "8", "--convention", "pmc-unlearn", "--retain-records",
                        str(out / "TOFU_EVAL.json"), "--output", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "open-unlearning-convention" in err and "--convention open-unlearning" in err
    assert not (tmp_path / "t").exists()
