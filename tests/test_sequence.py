"""`pmc-unlearn sequence`: the file's validation, the per-request numbers by hand, two PMC requests on
tiny-random (files, the chain of models, resume, a changed config refused) and the report's section."""

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import yaml

from pmc_unlearn.cli import main
from pmc_unlearn.sequence import item_groups, request_specs, split_rows, step_scores

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "model": {"name": "tiny-random"},
    "data": {"retain": "tofu:retain99"},
    "train": {"max_steps": 1, "batch_size": 2, "grad_accum": 1, "lr": 1.0e-3, "save_every": 1},
    "pmc": {"n_samples": 2, "max_new_tokens": 8},
}
SPEC = {"base": BASE, "method": "pmc", "requests": {"split": {"source": "tofu:forget01", "rows": [0, 4], "parts": 2}},
        "eval": {"max_examples": 4, "max_new_tokens": 8, "batch_size": 8}}


def write(tmp_path: Path, spec: dict, name: str = "sequence.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


def with_(spec: dict, **changes) -> dict:
    out = json.loads(json.dumps(spec))
    for dotted, value in changes.items():
        cur = out
        *path, last = dotted.split("__")
        for k in path:
            cur = cur.setdefault(k, {})
        if value is None:
            cur.pop(last, None)
        else:
            cur[last] = value
    return out


# ----- the file -----------------------------------------------------------------------------------

def test_split_rows_and_request_specs():
    assert split_rows(120, 200, 4) == [(120, 140), (140, 160), (160, 180), (180, 200)]
    assert split_rows(0, 3, 1) == [(0, 3)]
    assert request_specs({"split": {"source": "tofu:forget05", "rows": [120, 200], "parts": 4}}) == [
        ("tofu:forget05", (120, 200), 4)]
    assert request_specs(["tofu:forget01", {"source": "x.jsonl", "rows": [0, 5]}]) == [
        ("tofu:forget01", None, 1), ("x.jsonl", (0, 5), 1)]


@pytest.mark.parametrize("changes, msg", [
    ({"requests": {"split": {"source": "tofu:forget01", "rows": [0, 5], "parts": 2}}}, "do not cut into 2 equal requests"),
    ({"requests": {"split": {"source": "tofu:forget01", "rows": [20, 60], "parts": 2}}}, "which has 40 rows"),
    ({"requests": {"split": {"source": "tofu:forget01", "rows": [4, 4], "parts": 1}}}, "give 0 <= start < end"),
    ({"requests": {"split": {"source": "tofu:forget01", "parts": 0}}}, "split.parts=0"),
    ({"requests": {"split": {"source": "tofu:forget01", "rows": [0, 4], "parts": 2, "size": 3}}}, "unknown key 'size'"),
    ({"requests": {"split": {"source": "tofu:forget01", "rows": [0], "parts": 1}}}, "give [start, end]"),
    ({"requests": []}, "non-empty list"),
    ({"requests": [3]}, "requests[0]: give a forget source"),
    ({"method": "nosuch"}, "unknown unlearning method 'nosuch'"),
    ({"method": "sft"}, "unknown unlearning method 'sft'"),
    ({"base__data__forget": "tofu:forget01"}, "the requests are the forget sets"),
    ({"base__npo": {"beta": 0.1}}, "config section 'npo' is for method npo"),
    ({"base__method": "npo"}, "goes at the top level"),
    ({"grid": {}}, "unknown top-level key 'grid'"),
    ({"eval__nosuch": 1}, "unknown config key eval.nosuch"),
    ({"eval__forget_items": "all"}, "eval.forget_items='all': choose one of requests, split"),
    ({"eval__retain_model": "tiny-random", "eval__retain_records": "x"}, "retain_model and retain_records both"),
    ({"requests": ["tofu:retain99"]}, "is not a TOFU forget split; set eval.forget_split"),
    ({"requests": [{"source": "tofu:retain99", "rows": [0, 2]}], "eval__forget_split": "forget01"},
     "questions are not in tofu:forget01_perturbed"),
    ({"requests": ["muse-news:forget"]}, "MUSE-News requests are not supported"),
    ({"eval__retain_records": "/nonexistent/records.jsonl"}, "eval.retain_records"),
])
def test_bad_sequence_file_exit_2_before_any_work(tmp_path, capsys, changes, msg):
    out = tmp_path / "out"
    assert main(["sequence", "--config", str(write(tmp_path, with_(SPEC, **changes))), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert msg in err, err
    assert not out.exists()


def test_refuses_a_foreign_output_folder(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["sequence", "--config", str(write(tmp_path, SPEC)), "--output", str(out)]) == 2
    assert "holds no sequence.yaml of an earlier sequence" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_dry_run_lists_requests_and_their_eval_items(tmp_path, capsys):
    spec = with_(SPEC, requests={"split": {"source": "tofu:forget05", "rows": [120, 200], "parts": 4}})
    assert main(["sequence", "--config", str(write(tmp_path, spec)), "--output", str(tmp_path / "o"), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["forget_split"] == "forget05"
    assert [r["rows"] for r in plan["requests"]] == [[120, 140], [140, 160], [160, 180], [180, 200]]
    assert [r["eval_items"] for r in plan["requests"]] == [20] * 4  # one TOFU author each, all found in forget05
    # forget_items=requests: the forget split holds the 80 request rows whatever max_examples; the rest are cut to 4
    assert plan["eval_items"] == {"forget": 80, "forget_para": 80, "retain": 4, "real_authors": 4, "world_facts": 4,
                                  "holdout": 4}
    assert not (tmp_path / "o").exists()


# ----- per-request numbers, by hand ---------------------------------------------------------------

def rec(split, index, question, rouge, nll=1.0, para=1.0, pert=(1.0, 1.0)):
    return {"split": split, "index": index, "question": question, "rougeL_recall": rouge,
            "nll": nll, "para_nll": para, "pert_nll": list(pert)}


def test_per_request_numbers_by_hand():
    ln2 = math.log(2.0)
    records = [
        rec("forget", 0, "A?", 1.0),                                   # R = exp(1 - 1) = 1 -> min(R, 1/R) = 1
        rec("forget", 1, "B?", 0.5, pert=(1 + ln2, 1 + ln2)),         # R = exp(1 - (1 + ln 2)) = 0.5 -> 0.5
        rec("forget", 2, "C?", 0.0, pert=(1 - ln2, 1 - ln2)),         # R = 2 -> 0.5
        rec("forget", 3, "D?", 0.25),                                  # R = 1 -> 1
        rec("forget", 4, "E?", 0.9),                                   # in no request: never counted
        rec("forget_para", 0, "A, said otherwise?", 0.5), rec("forget_para", 1, "B'?", 0.5),
        rec("forget_para", 2, "C'?", 0.0), rec("forget_para", 3, "D'?", 0.75), rec("forget_para", 4, "E'?", 0.1),
        rec("retain", 0, "A?", 0.0),                                   # another split asking the same: ignored
    ]
    # request 2 names a question the evaluation does not hold ("Z?"): it just has no item
    groups = item_groups([r for r in records if r["split"] == "forget"], [["A?", "B?"], ["C?", "D?", "Z?"]])
    assert groups == [[0, 1], [2, 3]]

    s = step_scores(records, groups, 1, "pmc-unlearn")
    r1, r2 = s["requests"]
    # request 1: ROUGE-L (1 + 0.5) / 2 = 0.75, paraphrased (0.5 + 0.5) / 2 = 0.5, UQ 100 (2 - 0.75 - 0.5) / 2 = 37.5,
    # truth ratio (1 + 0.5) / 2 = 0.75
    assert r1 == {"request": 1, "n_items": 2, "forget_rougeL_recall": 0.75, "forget_para_rougeL_recall": 0.5,
                  "unlearn_quality": 37.5, "forget_truth_ratio": pytest.approx(0.75)}
    # request 2: (0 + 0.25) / 2 = 0.125, (0 + 0.75) / 2 = 0.375, UQ 100 (2 - 0.5) / 2 = 75, truth ratio (0.5 + 1) / 2
    assert r2["forget_rougeL_recall"] == 0.125 and r2["forget_para_rougeL_recall"] == 0.375
    assert r2["unlearn_quality"] == 75.0 and r2["forget_truth_ratio"] == pytest.approx(0.75)
    assert s["so_far"] == {k: v for k, v in r1.items() if k != "request"}  # after request 1: its items only

    s2 = step_scores(records, groups, 2, "pmc-unlearn")
    # all four items: ROUGE-L 1.75 / 4 = 0.4375, paraphrased 1.75 / 4 = 0.4375, UQ 100 (2 - 0.875) / 2 = 56.25,
    # truth ratio (1 + 0.5 + 0.5 + 1) / 4 = 0.75
    assert s2["so_far"]["n_items"] == 4 and s2["so_far"]["forget_rougeL_recall"] == 0.4375
    assert s2["so_far"]["unlearn_quality"] == 56.25 and s2["so_far"]["forget_truth_ratio"] == pytest.approx(0.75)
    assert step_scores(records, groups, 0, "pmc-unlearn")["so_far"] is None  # nothing unlearned yet

    empty = step_scores(records, [[]], 1, "pmc-unlearn")["requests"][0]
    assert empty == {"request": 1, "n_items": 0, "forget_rougeL_recall": None, "forget_para_rougeL_recall": None,
                     "unlearn_quality": None, "forget_truth_ratio": None}


# ----- two requests on tiny-random ----------------------------------------------------------------

@pytest.fixture(scope="module")
def seq_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seq")
    cfg = write(tmp, SPEC)
    out = tmp / "out"
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PMC_UNLEARN_EVAL_CACHE", str(tmp / "evcache"))
        with contextlib.redirect_stdout(buf):
            assert main(["sequence", "--config", str(cfg), "--output", str(out)]) == 0
    return tmp, cfg, out, buf.getvalue()


def lines_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "sequence.jsonl").read_text().splitlines()]


def test_two_requests_chain_their_models(seq_run):
    tmp, _, out, printed = seq_run
    for name in ("sequence.jsonl", "sequence.png", "sequence.svg", "sequence.yaml", "sequence_manifest.json",
                 ".pmc-unlearn-sequence", "data/request-1.jsonl", "data/request-2.jsonl", "request-0/eval/summary.json"):
        assert (out / name).stat().st_size > 0, name
    lines = lines_of(out)
    assert [x["request"] for x in lines] == [0, 1, 2] and all(x["status"] == "done" for x in lines)
    assert [x["rows"] for x in lines] == [None, [0, 2], [2, 4]]

    # every request trained on its own rows, written as files: forget01's rows 0-1, then 2-3
    from pmc_unlearn.data import load_rows

    f01 = load_rows("tofu:forget01")
    for k, (a, b) in ((1, (0, 2)), (2, (2, 4))):
        rows = [json.loads(x) for x in (out / f"data/request-{k}.jsonl").read_text().splitlines()]
        assert [r["question"] for r in rows] == [r["question"] for r in f01[a:b]]
        cfg = yaml.safe_load((out / f"request-{k}/run/config.yaml").read_text())
        assert cfg["data"]["forget"] == str((out / f"data/request-{k}.jsonl").resolve())
        assert cfg["data"]["retain"] == "tofu:retain99" and cfg["method"] == "pmc" and cfg["train"]["max_steps"] == 1
        man = json.loads((out / f"request-{k}/run/manifest.json").read_text())
        assert man["status"] == "completed" and man["steps"] == 1
    # request 1 from the start model, request 2 from request 1's model
    assert yaml.safe_load((out / "request-1/run/config.yaml").read_text())["model"]["name"] == "tiny-random"
    assert (yaml.safe_load((out / "request-2/run/config.yaml").read_text())["model"]["name"]
            == str((out / "request-1/run/model").resolve()))
    assert lines[2]["started_from"] == str((out / "request-1/run/model").resolve())
    assert lines[0]["model"] == "tiny-random" and lines[1]["train"]["steps"] == 1 and lines[2]["train"]["train_s"] > 0

    # each evaluation: the 4 request rows as forget items, 2 per request; its numbers match its records
    from pmc_unlearn.evaluation.records import read_records

    for x in lines:
        assert [r["n_items"] for r in x["requests"]] == [2, 2]
        assert (x["so_far"] is None) == (x["request"] == 0)
        recs = [r for r in read_records(out / x["eval_dir"] / "records.jsonl") if r["split"] == "forget"]
        assert sorted(r["index"] for r in recs) == [0, 1, 2, 3]
        want = sum(r["rougeL_recall"] for r in recs if r["index"] in (0, 1)) / 2
        assert x["requests"][0]["forget_rougeL_recall"] == pytest.approx(want)
        summary = json.loads((out / x["eval_dir"] / "summary.json").read_text())
        assert x["summary"]["utility"] == pytest.approx(summary["utility"]) and x["summary"]["forget_quality"] is None
        assert {"unlearn_quality", "model_utility", "forget_rougeL_recall"} <= set(x["summary"])

    man = json.loads((out / "sequence_manifest.json").read_text())
    assert man["status"] == "completed" and man["seed"] == 0 and man["forget_split"] == "forget01"
    assert man["method"] == "pmc" and "forget" not in man["base_config"]["data"] and man["precision"]["compute"]
    assert {"torch", "transformers"} <= set(man["versions"]) and man["hardware"]
    assert {"request 0 eval", "request 1 train", "request 1 eval", "request 2 train", "request 2 eval"} <= set(man["phases_s"])
    # the printed table: a row per request
    assert "ROUGE-L r2" in printed and "tofu:forget01 [2, 4)" in printed and "2 of 2 requests done" in printed


def test_report_shows_the_sequence(seq_run, tmp_path):
    from pmc_unlearn.report import build_report, gather

    _, _, out, _ = seq_run
    data = gather([out])
    assert len(data.sequences) == 1 and len(data.sequences[0]["lines"]) == 3
    assert [m.label for m in data.models] == ["request-0", "request-1", "request-2"]
    assert [m.role for m in data.models] == ["target", "unlearned", "unlearned"]
    res = build_report([out], tmp_path / "r" / "report.html")
    assert "sequence" in res["sections"]
    page = res["html"].read_text()
    assert '<section id="sequence">' in page and "Sequential requests" in page and "tofu:forget01 [2, 4)" in page
    md = res["md"].read_text()
    assert "## Sequential requests" in md and "sequence_0.png" in md
    assert (res["md"].parent / "report_files" / "sequence_0.png").read_bytes()[:4] == b"\x89PNG"
    # a folder holding a sequence among other things is found one level down, as a demo would be
    assert gather([out.parent]).sequences[0]["_path"] == str(out)


def test_rerun_skips_finished_requests_and_resumes_a_crashed_one(seq_run, capsys, monkeypatch):
    tmp, cfg, out, _ = seq_run
    monkeypatch.setenv("PMC_UNLEARN_EVAL_CACHE", str(tmp / "evcache"))
    watched = ["request-0/request.json", "request-1/request.json", "request-1/run/manifest.json",
               "request-2/request.json", "request-2/run/manifest.json", "request-2/eval/records.jsonl"]
    stamps = {f: (out / f).stat().st_mtime_ns for f in watched}

    # 1. rerun: nothing trained or evaluated again
    assert main(["sequence", "--config", str(cfg), "--output", str(out)]) == 0
    assert stamps == {f: (out / f).stat().st_mtime_ns for f in watched}
    assert len(lines_of(out)) == 3

    # 2. request 2's process died during training (after its checkpoint): it resumes, 0 and 1 stay as they are
    man_path = out / "request-2/run/manifest.json"
    man = json.loads(man_path.read_text())
    man["status"] = "running"
    man_path.write_text(json.dumps(man))
    rec_path = out / "request-2/request.json"
    rec = json.loads(rec_path.read_text())
    rec["status"] = "running"
    rec_path.write_text(json.dumps(rec))
    import shutil

    shutil.rmtree(out / "request-2/run/model")
    assert main(["sequence", "--config", str(cfg), "--output", str(out)]) == 0
    man = json.loads(man_path.read_text())
    assert man["status"] == "completed" and man["resumes"] == 1
    assert (out / "request-2/run/model/config.json").exists()
    assert json.loads(rec_path.read_text())["status"] == "done"
    for f in watched[:3]:
        assert stamps[f] == (out / f).stat().st_mtime_ns, f

    # 3. another learning rate: request 1 would differ, so the folder is refused (nothing written)
    spec = with_(SPEC, base__train__lr=2.0e-3)
    capsys.readouterr()
    assert main(["sequence", "--config", str(write(tmp, spec)), "--output", str(out)]) == 2
    assert "request-1 there was unlearned from another config" in capsys.readouterr().err
    assert yaml.safe_load((out / "sequence.yaml").read_text())["base"]["train"]["lr"] == 1.0e-3


# ----- the shipped example files ------------------------------------------------------------------

def test_example_sequence_file_is_valid_on_tiny_random(tmp_path, capsys):
    """configs/sequence-example.yaml, with the model and data paths it names replaced by tiny-random and
    TOFU sources: 4 requests of one author each, evaluated on exactly their 80 rows."""
    spec = yaml.safe_load((ROOT / "configs" / "sequence-example.yaml").read_text())
    spec["base"]["model"]["name"] = "tiny-random"
    spec["base"]["data"]["retain"] = "tofu:retain99"
    spec["eval"]["retain_model"] = "tiny-random"
    assert main(["sequence", "--config", str(write(tmp_path, spec)), "--output", str(tmp_path / "o"), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["method"] == "pmc" and plan["forget_split"] == "forget05"
    assert [r["rows"] for r in plan["requests"]] == [[120, 140], [140, 160], [160, 180], [180, 200]]
    assert plan["eval_items"]["forget"] == 80 and plan["eval_items"]["retain"] == 40


def test_sizes_sweep_file_is_valid_on_tiny_random(tmp_path, capsys):
    """configs/sweep-sizes.yaml (forget01 -> forget05 -> forget10, each from the same target) passes the
    sweep's validation with its model replaced by tiny-random."""
    spec = yaml.safe_load((ROOT / "configs" / "sweep-sizes.yaml").read_text())
    spec["base"]["model"]["name"] = "tiny-random"
    assert main(["sweep", "--config", str(write(tmp_path, spec)), "--output", str(tmp_path / "o"), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert sorted(p["forget_split"] for p in plan["points"] if p["label"].startswith("pmc")) == [
        "forget01", "forget05", "forget10"]
