"""The demo pipeline on tiny-random (hidden `test` profile): stages, caching, resume, report.

One demo folder goes through four runs: a full run, a rerun (every stage cached), a rerun after
an evaluation was cut short (it resumes from its records), and a rerun with a changed PMC
setting (only the PMC stages are redone). A slow test interrupts PMC training and resumes it.
"""

import io
import json
import re

import pytest
import yaml

from pmc_unlearn import demo as D
from pmc_unlearn import demo_base as B
from pmc_unlearn.errors import UserError


def stage_lines(text: str) -> dict[str, str]:
    """{stage: first word after the name} from the demo's stage lines (running/cached/resuming/done/...)."""
    out = {}
    for m in re.finditer(r"^\[demo \d+/\d+\] (\S+): (\w+)", text, re.M):
        out.setdefault(m.group(1), m.group(2))
    return out


def run(root, overrides=()):
    buf = io.StringIO()
    info = D.run_demo("test", root, list(overrides), progress=False, stream=buf)
    return info, buf.getvalue()


def test_profiles_load_and_validate(tmp_path):
    for name in ("quick", "default", "test"):
        p = D.load_profile(name)
        assert p["profile"] == name and p["unlearn"]["pmc"]
    p = D.load_profile("quick", ["unlearn.pmc.train.epochs=7", "evaluate.forget=5"])
    assert p["unlearn"]["pmc"]["train"]["epochs"] == 7 and p["evaluate"]["forget"] == 5
    with pytest.raises(UserError, match="unknown profile"):
        D.load_profile("nope")
    with pytest.raises(UserError, match="unknown profile section"):
        D.load_profile("quick", ["bogus.x=1"])
    with pytest.raises(UserError, match="authors.retain"):
        D.load_profile("quick", ["authors.retain=0"])
    with pytest.raises(UserError, match="evaluate.forget"):
        D.load_profile("quick", ["evaluate.forget=0"])
    f = tmp_path / "mine.yaml"
    f.write_text(yaml.safe_dump({k: v for k, v in D.load_profile("test").items() if k != "profile"}))
    assert D.load_profile(str(f))["model"] == "tiny-random"


def test_data_subset_and_suite(tmp_path):
    p = D.load_profile("default")
    data = D.prepare_data(p, tmp_path)
    target = [json.loads(x) for x in data.target_file.read_text().splitlines()]
    retain = [json.loads(x) for x in data.retain_file.read_text().splitlines()]
    n_retain = p["authors"]["retain"]
    assert data.forget_authors == [198, 199] and data.retain_authors == list(range(n_retain))
    assert len(retain) == 20 * n_retain and len(target) == 20 * n_retain + 40
    assert {r["author"] for r in target} == set(range(n_retain)) | {198, 199}
    # the utility questions are retain_perturbed rows of the retain authors, i.e. facts the target saw
    specs = {s.name: s for s in D.demo_suite("forget01", data.retain_eval_index, p["evaluate"])}
    seen = {r["question"] for r in target}
    assert specs["retain"].items and all(it.question in seen for it in specs["retain"].items)
    assert all(it.question in seen for it in specs["forget"].items)
    assert len(specs["forget"].items) == p["evaluate"]["forget"]
    assert specs["forget"].items[0].pert_answers and specs["retain"].items[0].pert_answers
    forget = [json.loads(x) for x in data.forget_file.read_text().splitlines()]
    assert len(forget) == 40 and {r["author"] for r in forget} == {198, 199}
    # quick: only forget01's first author, and the first `rows` questions of every author
    qp = D.load_profile("quick", ["authors.rows=7"])
    q = D.prepare_data(qp, tmp_path / "q")
    assert q.forget_authors == [198] and q.n_forget == 7
    qt = [json.loads(x) for x in q.target_file.read_text().splitlines()]
    qf = [json.loads(x) for x in q.forget_file.read_text().splitlines()]
    assert [r["tofu_full_row"] for r in qt] == list(range(7)) + list(range(198 * 20, 198 * 20 + 7))
    assert [r["tofu_full_row"] for r in qf] == list(range(198 * 20, 198 * 20 + 7))
    # the evaluation's forget items are exactly those 7 questions (with their paraphrases)
    qs = {s.name: s for s in D.demo_suite("forget01", q.retain_eval_index, qp["evaluate"], q.forget_eval_index)}
    assert [it.question for it in qs["forget"].items] == [r["question"] for r in qf]
    assert len(qs["forget_para"].items) == 7 and len(qs["retain"].items) == 7
    with pytest.raises(UserError, match="authors.rows"):
        D.load_profile("quick", ["authors.rows=21"])
    with pytest.raises(UserError, match="prompt"):
        D.load_profile("quick", ["prompt.system=x"])


def test_demo_stages_cache_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("PMC_UNLEARN_EVAL_CACHE", str(tmp_path / "evcache"))
    root = tmp_path / "demo"
    one = ["unlearn.npo=null"]  # PMC alone keeps this test short; the baselines' stages are the same code

    # 1. a full run
    info, text = run(root, one)
    names = [s["name"] for s in info["stages"]]
    assert names == ["finetune/target", "finetune/retain", "unlearn/pmc", "eval/retain", "eval/target", "eval/base", "eval/pmc"]
    assert all(s["status"] == "done" for s in info["stages"]) and set(stage_lines(text).values()) == {"running"}
    assert any("gd: turned off" in n for n in info["notes"]) and any("attacks: disabled" in n for n in info["notes"])
    for name in ("base", "target", "retain", "pmc"):
        s = json.loads((root / "eval" / name / "summary.json").read_text())
        assert s["n_examples_forget"] == 2 and s["n_examples_retain"] == 2
        assert s["forget_quality"] is not None and "retain_split_note" in s
    assert json.loads((root / "eval/retain/summary.json").read_text())["forget_quality"] == pytest.approx(1.0)
    assert not (root / "runs/pmc/checkpoints").exists()  # removed once the model is saved
    page = (root / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and '<tr class="pmc">' in page
    assert (root / "report.md").exists() and (root / "demo.json").exists()

    # 2. nothing changed: every stage is cached
    info, text = run(root, one)
    assert set(stage_lines(text).values()) == {"cached"}
    assert all(s["status"] == "cached" for s in info["stages"])

    # 3. an evaluation cut short (state "running", no summary yet) resumes from its records
    st = json.loads((root / "eval/pmc/stage.json").read_text())
    (root / "eval/pmc/stage.json").write_text(json.dumps({**st, "status": "running"}))
    (root / "eval/pmc/summary.json").unlink()
    n_records = len((root / "eval/pmc/records.jsonl").read_text().splitlines())
    info, text = run(root, one)
    assert {k for k, v in stage_lines(text).items() if v != "cached"} == {"eval/pmc"}
    assert stage_lines(text)["eval/pmc"] == "resuming"
    assert len((root / "eval/pmc/records.jsonl").read_text().splitlines()) == n_records

    # 4. a PMC setting changed: only PMC's training and evaluation are redone
    info, text = run(root, [*one, "unlearn.pmc.pmc.n_samples=3"])
    lines = stage_lines(text)
    assert {k for k, v in lines.items() if v != "cached"} == {"unlearn/pmc", "eval/pmc"}, lines


@pytest.mark.slow
def test_demo_resumes_interrupted_training(tmp_path, monkeypatch):
    """Ctrl-C during PMC training; the next run continues PMC from its checkpoint."""
    monkeypatch.setenv("PMC_UNLEARN_EVAL_CACHE", str(tmp_path / "evcache"))
    root = tmp_path / "demo"
    from pmc_unlearn.methods.pmc import PMC

    real_prepare, calls = PMC.prepare, {"n": 0}

    def interrupting(self, ctx, idx, ridx):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_prepare(self, ctx, idx, ridx)

    monkeypatch.setattr(PMC, "prepare", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run(root)
    monkeypatch.setattr(PMC, "prepare", real_prepare)
    assert json.loads((root / "runs/pmc/stage.json").read_text())["status"] == "interrupted"
    assert (root / "runs/pmc/checkpoints").exists()
    info, text = run(root)
    lines = stage_lines(text)
    assert lines["finetune/target"] == "cached" and lines["finetune/retain"] == "cached"
    assert lines["unlearn/pmc"] == "resuming"
    man = json.loads((root / "runs/pmc/manifest.json").read_text())
    assert man["resumes"] == 1 and man["status"] == "completed"
    assert [json.loads(x)["step"] for x in (root / "runs/pmc/log.jsonl").read_text().splitlines()] == [1, 2]
    assert all(s["status"] in ("done", "cached") for s in info["stages"])
    assert "unlearn/npo" in [s["name"] for s in info["stages"]]


def test_demo_refuses_an_unknown_method_before_any_work(tmp_path):
    """Every name under `unlearn` is a method of the registry: a typo is an error, not a silently skipped stage."""
    with pytest.raises(UserError, match="unlearn.npoo: unknown unlearning method"):
        D.run_demo("test", tmp_path / "d", ["unlearn.npoo={train: {epochs: 1}}"], progress=False, stream=io.StringIO())
    assert not (tmp_path / "d").exists()
    with pytest.raises(UserError, match="unlearn.sft: unknown unlearning method"):
        D.Demo(D.load_profile("test", ["unlearn.sft={}"]), tmp_path / "e").build()


def test_demo_profile_sections_are_typed_config_sections(tmp_path):
    """The demo's own sections report a bad value with the run config's messages (one dialect)."""
    with pytest.raises(UserError, match=r"authors.rows=21: must be <= 20"):
        D.load_profile("quick", ["authors.rows=21"])
    with pytest.raises(UserError, match=r"unknown config key attacks.nmes; known keys in 'attacks'"):
        D.load_profile("quick", ["attacks.nmes=[sampling]"])
    with pytest.raises(UserError, match=r"report.examples='x': expected int"):
        D.load_profile("quick", ["report.examples=x"])
    with pytest.raises(UserError, match=r"evaluate.max_new_tokens is missing"):
        D.load_profile("quick", ["evaluate={forget: 2}"])
    with pytest.raises(UserError, match=r"section.key=value \(e.g. unlearn.pmc.train.epochs=6\)"):
        D.load_profile("quick", ["unlearn.pmc.train.epochs"])
    # the run-config sections inside a profile: load_config's own message
    with pytest.raises(UserError, match=r"train.lr='fast': expected float"):
        D.run_demo("test", tmp_path / "d", ["finetune.train.lr=fast"], progress=False, stream=io.StringIO())
    assert not (tmp_path / "d").exists()


def test_demo_plan_cli(capsys):
    from pmc_unlearn.cli import main

    assert main(["demo", "--profile", "quick", "--plan"]) == 0
    plan = json.loads(capsys.readouterr().out)
    names = [s["name"] for s in plan["stages"]]
    assert names[:3] == ["finetune/target", "finetune/retain", "unlearn/pmc"] and "eval/retain" in names
    assert all(s["key"] or s.get("skip") for s in plan["stages"])
    assert main(["demo", "--profile", "nope", "--plan"]) == 2


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        D.Demo(D.load_profile("test"), tmp_path).build()
    assert (tmp_path / "mine.txt").exists()


def test_base_model_row_is_optional():
    """evaluate.base: the shipped profiles leave the untuned model out (one evaluation fewer); the test profile keeps it."""
    names = lambda prof, over=(): [s["name"] for s in D.plan(prof, list(over))["stages"]]  # noqa: E731
    assert "eval/base" in names("test")
    assert "eval/base" not in names("test", ["evaluate.base=false"])
    for prof in ("quick", "default"):
        got = names(prof)
        assert "eval/base" not in got and {"eval/retain", "eval/target", "eval/pmc"} <= set(got)
    with pytest.raises(UserError, match="evaluate.base"):
        D.load_profile("test", ["evaluate.base=maybe"])


def test_stage_estimates_follow_the_precision(monkeypatch):
    """The ETA's first estimates use the rate table of the precision that will run, scaled by a matmul probe."""
    from pmc_unlearn import precision as P

    monkeypatch.setattr(B, "matmul_gflops", lambda bf16, size=1024, reps=3: B.REF_GFLOPS["bf16" if bf16 else "fp32"])
    est = {}
    for native in (True, False):
        monkeypatch.setattr(P, "cpu_native_bf16", lambda native=native: native)
        est[native] = {s["name"]: s["est_s"] for s in D.plan("default")["stages"]}
    # fp32 per-unit rates are larger than bf16's, so every training and evaluation stage is estimated longer
    for name in ("finetune/target", "unlearn/pmc", "eval/target"):
        assert est[False][name] > est[True][name], name
    # a machine half as fast as the table's is estimated twice as long
    monkeypatch.setattr(B, "matmul_gflops", lambda bf16, size=1024, reps=3: B.REF_GFLOPS["fp32"] / 2)
    slow = {s["name"]: s["est_s"] for s in D.plan("default")["stages"]}
    assert slow["finetune/target"] == pytest.approx(2 * est[False]["finetune/target"], abs=1)
