"""Faults a hostile user or a bad day brings: damaged checkpoints, pickles, divergence, foreign
folders, locks, concurrent appends, a full disk, and a table of bad inputs.

Every run is tiny-random PMC with the FAST settings (4 optimizer steps, a checkpoint after each);
one uninterrupted run (`ref`) is the yardstick every resumed run must match bit for bit.
"""

import errno
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FAST
from pmc_unlearn import rundir
from pmc_unlearn.cli import main

BASE = ["unlearn", "--model", "tiny-random", "--forget", "tofu:forget01", "--retain", "tofu:retain99"]
ARGS = [*BASE, *FAST, "train.keep_checkpoints=2"]  # 4 steps; checkpoints step-000003 and step-000004 kept


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def one_line(err: str) -> str:
    """stderr of a failed command: exactly one message line (beside progress bars), no traceback; returns it."""
    assert "Traceback" not in err, err
    msgs = [seg for seg in re.split(r"[\r\n]", err) if seg.startswith("pmc-unlearn ")]
    assert len(msgs) == 1, err
    return msgs[0]


def status(run: Path) -> str:
    return json.loads((run / "manifest.json").read_text())["status"]


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main([*ARGS, "--output", str(out)]) == 0
    assert [p.name for p in rundir.checkpoint_dirs(out)] == ["step-000003", "step-000004"]
    return out


def crashed_copy(ref: Path, dest: Path, drop: tuple[str, ...] = ()) -> Path:
    """The reference run as a crash would leave it after its last checkpoint: no model, status running."""
    shutil.copytree(ref, dest)
    shutil.rmtree(dest / "model")
    for name in drop:
        shutil.rmtree(dest / "checkpoints" / name)
    man = json.loads((dest / "manifest.json").read_text())
    (dest / "manifest.json").write_text(json.dumps({**man, "status": "running"}))
    return dest


def rechecksum(ck: Path) -> None:
    """Rewrite checksums.json to match the folder, as someone forging a checkpoint would."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": rundir.sha256_file(p)}
             for p in sorted(ck.iterdir()) if p.name != rundir.CHECKSUMS}
    (ck / rundir.CHECKSUMS).write_text(json.dumps({"format": rundir.FORMAT, "files": files}))


def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_bit(f: Path) -> None:
    b = bytearray(f.read_bytes())
    b[len(b) * 2 // 3] ^= 0x10  # in the tensor data, past the header
    f.write_bytes(bytes(b))


def nan_weights(ck: Path) -> None:
    t = load_file(str(ck / "model.safetensors"))
    k = sorted(t)[0]
    t[k] = t[k].clone()
    t[k].view(-1)[0] = float("nan")
    save_file(t, str(ck / "model.safetensors"))
    rechecksum(ck)  # the checksums match: only the finite check can catch it


# ----- checkpoints: the format round-trips, damaged ones are named and skipped ----------------------

def test_state_codec_round_trips_optimizer_rng_and_nested_values():
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}},
                     "param_groups": [{"params": [0], "betas": (0.9, 0.999), "lr": 1e-3, "foreach": None}]}}
    named: dict = {}
    doc = json.loads(json.dumps(rundir.pack_state(state, named)))  # through JSON, as on disk
    back = rundir.unpack_state(doc, named)
    assert torch.equal(back["torch"], state["torch"])
    assert back["python"] == state["python"] and isinstance(back["python"][1], tuple)
    assert back["numpy"][0] == "MT19937" and back["numpy"][1].dtype == np.uint32
    assert (back["numpy"][1] == state["numpy"][1]).all() and back["numpy"][2:] == state["numpy"][2:]
    assert list(back["opt"]["state"]) == [0] and back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], torch.ones(2, 2))
    with pytest.raises(TypeError, match="not object"):
        rundir.pack_state({"x": object()}, {})


def test_checkpoint_holds_tensors_and_json_only(ref):
    ck = rundir.checkpoint_dirs(ref)[-1]
    names = sorted(p.name for p in ck.iterdir())
    assert names == ["checksums.json", "method.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "rng.json", "rng.safetensors", "scheduler.json", "state.json"]
    listed = json.loads((ck / "checksums.json").read_text())["files"]
    assert sorted(listed) == [n for n in names if n != "checksums.json"]
    assert listed["model.safetensors"]["bytes"] == (ck / "model.safetensors").stat().st_size
    rundir.verify_checkpoint(ck)


DAMAGE = {
    "model-truncated": (lambda ck: truncate(ck / "model.safetensors"), "model.safetensors has"),
    "optimizer-truncated": (lambda ck: truncate(ck / "optimizer.safetensors"), "optimizer.safetensors has"),
    "rng-truncated": (lambda ck: truncate(ck / "rng.safetensors"), "rng.safetensors has"),
    "method-truncated": (lambda ck: truncate(ck / "method.json"), "method.json has"),
    "state-empty": (lambda ck: (ck / "state.json").write_text(""), "state.json has 0 bytes"),
    "model-bit-flip": (lambda ck: flip_bit(ck / "model.safetensors"), "model.safetensors does not match its sha256"),
    "no-checksums": (lambda ck: (ck / "checksums.json").unlink(), "incomplete"),
    "nan-weights": (nan_weights, "non-finite weights"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_named_and_set_aside(ref, tmp_path, caplog, case):
    """The newest checkpoint damaged in each way: resume picks the previous one and says why in one line."""
    damage, named = DAMAGE[case]
    run = crashed_copy(ref, tmp_path / "run")
    damage(run / "checkpoints" / "step-000004")
    caplog.set_level("INFO")
    path, tensors, state = rundir.load_resume_checkpoint(run)
    assert path.name == "step-000003" and state["step"] == 3
    warned = [r.getMessage() for r in caplog.records if "newest intact checkpoint" in r.getMessage()]
    assert len(warned) == 1 and "resuming from step-000003" in warned[0] and named in warned[0], warned
    assert (run / "checkpoints" / "damaged-step-000004").is_dir()  # set aside, not deleted
    assert [p.name for p in rundir.step_dirs(run)] == ["step-000003"]


@pytest.mark.parametrize("case", ["rng-truncated", "model-bit-flip"])
def test_resume_past_a_damaged_checkpoint_ends_like_the_uninterrupted_run(ref, tmp_path, caplog, case):
    run = crashed_copy(ref, tmp_path / "run")
    DAMAGE[case][0](run / "checkpoints" / "step-000004")
    caplog.set_level("INFO")
    assert main(["unlearn", "--resume", str(run)]) == 0
    assert any("resuming from step-000003" in r.getMessage() for r in caplog.records)
    assert same_weights(ref, run), "resumed from step 3, the run must end where the uninterrupted one did"
    assert status(run) == "completed"
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_no_intact_checkpoint_is_a_clear_error_and_nothing_runs(ref, tmp_path, capsys):
    run = crashed_copy(ref, tmp_path / "run", drop=("step-000003",))
    truncate(run / "checkpoints" / "step-000004" / "model.safetensors")
    log_before = (run / "log.jsonl").read_text()
    assert main(["unlearn", "--resume", str(run)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "step-000004" in line and "model.safetensors" in line and "no intact checkpoint" in line
    assert not (run / "model").exists() and (run / "log.jsonl").read_text() == log_before


class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("plant", ["old-format-rng.pt", "pickle-as-rng.safetensors"])
def test_planted_pickle_is_never_loaded(ref, tmp_path, capsys, plant):
    run = crashed_copy(ref, tmp_path / "run", drop=("step-000003",))
    ck = run / "checkpoints" / "step-000004"
    marker = tmp_path / "code-ran"
    if plant == "old-format-rng.pt":  # a checkpoint as earlier versions wrote it: torch.save pickles
        for name in ("optimizer.safetensors", "rng.safetensors", "optimizer.json", "rng.json", "scheduler.json",
                     "checksums.json"):
            (ck / name).unlink()
        torch.save({"rng": Payload(marker)}, ck / "rng.pt")
        torch.save({}, ck / "optimizer.pt")
        torch.save({}, ck / "scheduler.pt")
        expect = "old pickle format"
    else:  # a pickle where a safetensors file belongs, with checksums forged to match
        torch.save({"rng": Payload(marker)}, ck / "rng.safetensors")
        rechecksum(ck)
        expect = "rng.safetensors is not a valid safetensors file"
    assert main(["unlearn", "--resume", str(run)]) == 2
    line = one_line(capsys.readouterr().err)
    assert expect in line, line
    assert not marker.exists(), "the pickle ran"
    assert not (run / "model").exists()
    import pickle

    pickle.loads(pickle.dumps(Payload(marker)))  # the payload does work when unpickled (so the test can fail)
    assert marker.exists()


# ----- divergence: checked before a step can poison the weights, and after it ------------------------

def _named_checkpoint(line: str) -> Path | None:
    if "no checkpoint was written yet" in line:
        return None
    return Path(line.split("last good checkpoint (finite weights): ")[1].split(";")[0])


@pytest.mark.parametrize("extra", [["train.lr=1e6"], ["train.lr=1e6", "train.max_grad_norm=0"]], ids=["clipped", "unclipped"])
def test_huge_lr_diverges_and_every_checkpoint_is_finite(tmp_path, capsys, extra):
    out = tmp_path / "run"
    rc = main([*BASE, *FAST, "train.epochs=6", "train.keep_checkpoints=20", *extra, "--output", str(out)])
    assert rc == 1
    line = one_line(capsys.readouterr().err)
    assert "training diverged" in line
    assert status(out) == "diverged" and not (out / "model").exists()
    for ck in rundir.checkpoint_dirs(out):  # every checkpoint written has finite weights (loads and verifies)
        tensors, _ = rundir.load_checkpoint(ck)
        assert rundir.all_finite(tensors["model"])
    named = _named_checkpoint(line)
    if named is not None:
        assert named == rundir.checkpoint_dirs(out)[-1] and rundir.all_finite(load_file(str(named / "model.safetensors")))


def test_final_step_is_checked(tmp_path, capsys):
    """lr 1e39 overflows float32 in the update: every weight non-finite after the one and only step."""
    out = tmp_path / "run"
    rc = main([*BASE, *FAST, "train.lr=1e39", "train.warmup_epochs=0", "train.max_steps=1", "--output", str(out)])
    assert rc == 1
    line = one_line(capsys.readouterr().err)
    assert "weights are non-finite after optimizer step 1" in line and "no checkpoint was written yet" in line
    assert status(out) == "diverged" and not (out / "model").exists() and not rundir.checkpoint_dirs(out)


class InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradients would poison the weights."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_non_finite_gradient_stops_before_the_step(tmp_path, capsys, monkeypatch):
    from pmc_unlearn.methods.pmc import PMC

    real = PMC.loss

    def loss(self, ctx, model, prep):
        value, logs = real(self, ctx, model, prep)
        return (InfGrad.apply(value) if ctx.step == 2 else value), logs

    monkeypatch.setattr(PMC, "loss", loss)
    out = tmp_path / "run"
    assert main([*ARGS, "--output", str(out)]) == 1
    line = one_line(capsys.readouterr().err)
    assert "gradient norm is" in line and "weights not updated" in line
    named = _named_checkpoint(line)
    assert named is not None and named.name == "step-000002"
    assert rundir.all_finite(load_file(str(named / "model.safetensors")))
    assert status(out) == "diverged"


# ----- folders and files the user owns ------------------------------------------------------------

def test_demo_refuses_a_foreign_folder_and_keeps_its_files(tmp_path, capsys):
    root = tmp_path / "mine"
    files = {"runs/target/my_model_notes.txt": "notes", "runs/pmc/keep.txt": "keep", "eval/retain/results.csv": "a,b",
             "data/target.jsonl": '{"question": "mine?"}\n'}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    assert main(["demo", "--profile", "test", "--output", str(root), "--no-progress"]) == 2
    assert "holds no demo" in one_line(capsys.readouterr().err)
    assert {rel: (root / rel).read_text() for rel in files} == files
    assert sorted(p.name for p in root.iterdir()) == ["data", "eval", "runs"]


def test_demo_keeps_user_files_in_a_stage_it_must_redo(tmp_path):
    """In the demo's own folder, a stage to redo that holds a file the demo did not write: refused, kept."""
    import io

    from pmc_unlearn import demo as D
    from pmc_unlearn.errors import UserError

    root = tmp_path / "demo"
    d = D.Demo(D.load_profile("test", ["unlearn.npo=null"]), root, progress=False, stream=io.StringIO())
    stages = {s.name: s for s in d.build()}
    pmc = stages["unlearn/pmc"].dir
    pmc.mkdir(parents=True)
    (pmc / "stage.json").write_text(json.dumps({"key": "an-older-key", "status": "done"}))
    (pmc / "model").mkdir()
    (pmc / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="keep.txt was not written by the demo"):
        d.run()
    assert (pmc / "keep.txt").read_text() == "mine" and (pmc / "model").is_dir()
    assert not (root / "runs" / "target").exists(), "nothing ran"
    with pytest.raises(UserError, match="keep.txt"):
        D.STORE.clear(pmc, "unlearn")
    (pmc / "keep.txt").unlink()
    D.STORE.clear(pmc, "unlearn")  # only the stage's own files left: removed
    assert list(pmc.iterdir()) == []


def test_sweep_refuses_a_foreign_folder_and_keeps_its_files(tmp_path, capsys):
    import yaml

    out = tmp_path / "busy"
    (out / "points").mkdir(parents=True)
    (out / "points" / "mine.txt").write_text("mine")
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump({"base": {"model": {"name": "tiny-random"}, "data": {"forget": "tofu:forget01"},
                                            "train": {"max_steps": 1}}, "methods": {"ga": {}},
                                   "eval": {"max_examples": 1, "max_new_tokens": 4}}))
    assert main(["sweep", "--config", str(cfg), "--output", str(out)]) == 2
    assert "not empty" in one_line(capsys.readouterr().err)
    assert (out / "points" / "mine.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["points"]


def test_report_never_overwrites_a_file_it_did_not_write(tmp_path, capsys):
    from test_report import make_eval

    ev = tmp_path / "eval"
    make_eval(ev, "tiny", "fp1", 50.0, 0.5, 0.1, 0.4, ["true answer 0", "x", "y"])
    out = tmp_path / "site" / "README.html"
    out.parent.mkdir()
    (out.parent / "README.md").write_text("my own readme\n")
    assert main(["report", str(ev), "--output", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "README.md exists and was not written by pmc-unlearn report" in line and "--force" in line
    assert (out.parent / "README.md").read_text() == "my own readme\n" and not out.exists()
    (out.parent / "README.md").unlink()
    assert main(["report", str(ev), "--output", str(out)]) == 0
    assert main(["report", str(ev), "--output", str(out)]) == 0  # its own files: rewritten
    out.write_text("<html>the user's page</html>")
    assert main(["report", str(ev), "--output", str(out)]) == 2
    assert out.read_text() == "<html>the user's page</html>"
    assert main(["report", str(ev), "--output", str(out), "--force"]) == 0
    assert "pmc-unlearn report" in out.read_text()
    images = out.parent / "README_files"
    shutil.rmtree(images)
    images.mkdir()
    (images / "photo.png").write_bytes(b"mine")
    capsys.readouterr()
    assert main(["report", str(ev), "--output", str(out)]) == 2
    assert "README_files exists" in one_line(capsys.readouterr().err)


def test_report_md_escapes_model_answers(tmp_path):
    from test_report import make_eval

    from pmc_unlearn.report import build_report

    evil = "<script>alert(1)</script> **bold** [link](http://x.example) | `code` _u_ <img src=x onerror=alert(2)>"
    ev = tmp_path / "eval"
    make_eval(ev, "tiny", "fp1", 50.0, 0.5, 0.1, 0.4, [evil, "# heading\n- item", "1. list"])
    r = build_report([ev], tmp_path / "r.html", examples=3)
    md = r["md"].read_text()
    html_page = r["html"].read_text()
    for raw in ("<script>", "<img", "**bold**", "[link](", "`code`", "_u_"):
        assert raw not in md, raw
    assert "<script>" not in html_page and "<img src=x" not in html_page  # (as before: the HTML escapes too)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md and "\\*\\*bold\\*\\*" in md and "\\[link\\](" in md
    assert "\\`code\\`" in md and "\\_u\\_" in md and "\\| \\`code" in md
    assert "| # heading - item |" in md and "| 0.100 |" in md  # in a table cell no line starts: kept readable
    from pmc_unlearn.report.render import md_escape

    assert [md_escape(t) for t in ("# heading", "- item", "12. twelve", "  + x", "> quote", "a\nb")] == \
        ["\\# heading", "\\- item", "12\\. twelve", "  \\+ x", "&gt; quote", "a b"]


# ----- concurrency ----------------------------------------------------------------------------------

def test_lock_refuses_a_second_writer_and_takes_over_a_stale_one(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    out.mkdir()
    with rundir.OutputLock(out):  # another writer (this process, through a second open file)
        assert main([*ARGS, "--output", str(out)]) == 2
        line = one_line(capsys.readouterr().err)
        assert f"another pmc-unlearn process (pid {os.getpid()}) is writing there" in line
        assert rundir.folder_entries(out) == []
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / rundir.LOCK_FILE).write_text(f"{dead.pid} somehost\n")  # left behind by a process that died
    caplog.set_level("INFO")
    assert main([*ARGS, "train.max_steps=1", "--output", str(out)]) == 0
    assert any(f"stale lock of pid {dead.pid}" in r.getMessage() for r in caplog.records)
    assert not (out / rundir.LOCK_FILE).exists() and status(out) == "completed"


def test_two_runs_into_one_folder_one_refuses(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pmc_unlearn", *ARGS, "train.max_steps=2", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    assert any(s in refused for s in ("another pmc-unlearn process", "already holds a finished run",
                                      "folder is not empty", "holds an unfinished run")), refused
    assert "Traceback" not in refused
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and status(out) == "completed"


def _append_many(path: str, tag: int, n: int) -> None:
    from pmc_unlearn.evaluation.records import Appender

    app = Appender(Path(path))
    for i in range(n):  # batches of 3 records of ~12 kB: far more than one buffer, so a split write would tear
        app.write([{"tag": tag, "i": i, "j": j, "generation": f"{tag}-{i}-{j} " + "x" * 12000} for j in range(3)])


def test_concurrent_cache_appends_never_tear_a_record(tmp_path):
    path = tmp_path / "cache" / "records.jsonl"
    path.parent.mkdir()
    path.write_text('{"tag": -1, "i": 0, "j": 0, "generation": "cut off by a kill')  # a torn line from before
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), tag, 60)) for tag in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = path.read_text().splitlines()
    rows = []
    for ln in lines[1:]:
        rows.append(json.loads(ln))  # every line after the old torn one is a whole record
    assert len(rows) == 3 * 60 * 3
    assert {(r["tag"], r["i"], r["j"]) for r in rows} == {(t, i, j) for t in range(3) for i in range(60) for j in range(3)}
    assert all(r["generation"].startswith(f"{r['tag']}-{r['i']}-{r['j']} ") for r in rows)
    for k in range(0, len(rows), 3):  # each batch landed whole, its three records together
        assert len({(r["tag"], r["i"]) for r in rows[k:k + 3]}) == 1


# ----- a full disk ----------------------------------------------------------------------------------

def _enospc(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(ref, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real = rundir._write_tensors

    def failing(path, tensors):
        calls["n"] += 1
        if "step-000003" in str(path) and path.name == "optimizer.safetensors":
            path.write_bytes(b"partial")
            raise _enospc(path)
        return real(path, tensors)

    monkeypatch.setattr(rundir, "_write_tensors", failing)
    out = tmp_path / "run"
    assert main([*ARGS, "--output", str(out)]) == 1
    line = one_line(capsys.readouterr().err)
    assert "No space left on device" in line and "step-000003 was not written" in line and "step-000002 is intact" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]  # no .tmp left
    rundir.load_checkpoint(out / "checkpoints" / "step-000002")
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "failed" and "No space left" in man["error"]
    monkeypatch.setattr(rundir, "_write_tensors", real)
    assert main(["unlearn", "--resume", str(out)]) == 0
    assert same_weights(ref, out) and status(out) == "completed"


def test_full_disk_during_a_log_write_keeps_the_lines_before(ref, tmp_path, capsys, monkeypatch):
    real = rundir.append_atomic

    def failing(path, data):
        if path.name == "log.jsonl" and b'"step": 3' in data:
            raise _enospc(path)
        return real(path, data)

    monkeypatch.setattr(rundir, "append_atomic", failing)
    out = tmp_path / "run"
    assert main([*ARGS, "--output", str(out)]) == 1
    assert "No space left on device" in one_line(capsys.readouterr().err)
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert status(out) == "failed"
    monkeypatch.setattr(rundir, "append_atomic", real)
    assert main(["unlearn", "--resume", str(out)]) == 0
    assert same_weights(ref, out)
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_append_cut_short_by_a_full_disk_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "records.jsonl"
    path.write_text('{"a": 1}\n')
    real = os.write

    def half_then_full(fd, data):
        real(fd, bytes(data[: len(data) // 2]))
        raise _enospc(path)

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError):
        rundir.append_atomic(path, b'{"b": 2}\n{"c": 3}\n')
    monkeypatch.setattr(os, "write", real)
    assert path.read_text() == '{"a": 1}\n'


def test_threads_variable_is_parsed_once_and_strictly():
    from pmc_unlearn.cpu import threads_from_env
    from pmc_unlearn.errors import UserError

    assert threads_from_env({}) is None and threads_from_env({"PMC_UNLEARN_THREADS": ""}) is None
    assert threads_from_env({"PMC_UNLEARN_THREADS": " 3 "}) == 3
    for bad in ("abc", "0", "-1", "1.5", "2x"):
        with pytest.raises(UserError, match="PMC_UNLEARN_THREADS"):
            threads_from_env({"PMC_UNLEARN_THREADS": bad})


def test_repeated_forget_questions_are_counted_and_explained(tmp_path, caplog):
    f = tmp_path / "dup.jsonl"
    rows = ["Who?", "Where?", "Who?", " Who? ", "Where?", "When?"]  # Who? 3 times, Where? twice: 3 extra copies
    f.write_text("".join(json.dumps({"question": q}) + "\n" for q in rows))
    caplog.set_level("WARNING")
    assert main([*BASE, "--forget", str(f), "--dry-run"]) == 0
    msg = next(r.getMessage() for r in caplog.records if "repeated questions" in r.getMessage())
    assert msg.startswith("forget set has 3 repeated questions") and "weighs k times" in msg


# ----- every bad input: exit 2, one line naming it, no traceback, no output folder -------------------

def _files(d: Path) -> None:
    d.mkdir()
    (d / "latin1.jsonl").write_bytes('{"question": "Où est né l\'auteur ?"}\n'.encode("latin-1"))
    (d / "latin1.json").write_bytes('[{"question": "Où ?"}]'.encode("latin-1"))
    (d / "latin1.csv").write_bytes('question\nOù ?\n'.encode("latin-1"))
    (d / "numbers.json").write_text("[1, 2, 3]")
    (d / "mixed.json").write_text('[{"question": "a?"}, 5]')
    (d / "notparquet.parquet").write_text("hello, not parquet")
    (d / "numline.jsonl").write_text('{"question": "a?"}\n42\n')
    (d / "huge.jsonl").write_text(json.dumps({"question": "why " * 25000}) + "\n")  # 100,000 characters
    (d / "tokens.jsonl").write_text(json.dumps({"question": "Why is the sky blue? " * 60}) + "\n")  # ~400 tokens
    (d / "noq.jsonl").write_text('{"query": "a?"}\n')  # (a `text` column would be a document source)
    (d / "emptyq.jsonl").write_text('{"question": "  "}\n')
    (d / "badjson.json").write_text("{not json")
    (d / "data.txt").write_text("a?")
    (d / "folder").mkdir()
    (d / "numanswer.jsonl").write_text('{"question": "a?", "answer": 5}\n')
    (d / "afile").write_text("a file")
    (d / "readonly").mkdir()
    (d / "readonly").chmod(0o555)


U = ["unlearn", "--model", "tiny-random", "--forget", "tofu:forget01", "--retain", "tofu:retain99", "--output", "{out}"]
BAD = [
    # numbers: finite, in range, integer where needed
    ("lr-nan", [*U, "train.lr=nan"], "train.lr=nan: must be a finite number"),
    ("lr-inf", [*U, "train.lr=inf"], "train.lr=inf: must be a finite number"),
    ("lr-zero", [*U, "train.lr=0"], "train.lr=0.0: must be > 0"),
    ("lr-negative", [*U, "train.lr=-1e-3"], "train.lr=-0.001: must be > 0"),
    ("epochs-nan", [*U, "train.epochs=nan"], "train.epochs=nan"),
    ("epochs-inf", [*U, "train.epochs=inf"], "train.epochs=inf"),
    ("epochs-zero", [*U, "train.epochs=0"], "train.epochs=0.0: must be > 0"),
    ("warmup-nan", [*U, "train.warmup_epochs=nan"], "train.warmup_epochs=nan"),
    ("max-steps-zero", [*U, "train.max_steps=0"], "train.max_steps=0"),
    ("max-steps-minus-two", [*U, "train.max_steps=-2"], "train.max_steps=-2: must be >= -1"),
    ("weight-decay-nan", [*U, "train.weight_decay=nan"], "train.weight_decay=nan"),
    ("grad-norm-nan", [*U, "train.max_grad_norm=nan"], "train.max_grad_norm=nan"),
    ("max-time-nan", [*U, "train.max_time_s=nan"], "train.max_time_s=nan"),
    ("max-time-inf", [*U, "train.max_time_s=inf"], "train.max_time_s=inf"),
    ("batch-zero", [*U, "train.batch_size=0"], "train.batch_size=0: must be >= 1"),
    ("batch-fraction", [*U, "train.batch_size=2.5"], "train.batch_size=2.5: expected int"),
    ("grad-accum-text", [*U, "train.grad_accum=abc"], "train.grad_accum='abc': expected int"),
    ("seed-nan", [*U, "train.seed=nan"], "train.seed='nan': expected int"),
    ("save-every-minus-two", [*U, "train.save_every=-2"], "train.save_every=-2"),
    ("max-length-small", [*U, "data.max_length=4"], "data.max_length=4: must be >= 8"),
    ("max-length-over-context", [*U, "data.max_length=100000"], "data.max_length=100000: over the context"),
    ("temperature-nan", [*U, "pmc.temperature=nan"], "pmc.temperature=nan"),
    ("top-p-inf", [*U, "pmc.top_p=inf"], "pmc.top_p=inf"),
    ("n-samples-nan", [*U, "pmc.n_samples=nan"], "pmc.n_samples='nan': expected int"),
    ("lora-dropout-nan", [*U, "model.lora_dropout=nan"], "model.lora_dropout=nan"),
    # data files: encoding, row shape, columns, size
    ("forget-latin1-jsonl", [*U, "--forget", "{d}/latin1.jsonl"], "latin1.jsonl: not UTF-8 text"),
    ("forget-latin1-json", [*U, "--forget", "{d}/latin1.json"], "latin1.json: not UTF-8 text"),
    ("forget-latin1-csv", [*U, "--forget", "{d}/latin1.csv"], "latin1.csv: not UTF-8 text"),
    ("retain-latin1", [*U, "--retain", "{d}/latin1.jsonl"], "latin1.jsonl: not UTF-8 text"),
    ("json-numbers", [*U, "--forget", "{d}/numbers.json"], "numbers.json: row 0 is int"),
    ("json-mixed", [*U, "--forget", "{d}/mixed.json"], "mixed.json: row 1 is int"),
    ("jsonl-number-line", [*U, "--forget", "{d}/numline.jsonl"], "numline.jsonl: row 1 is int"),
    ("not-parquet", [*U, "--forget", "{d}/notparquet.parquet"], "notparquet.parquet: not a readable Parquet file"),
    ("bad-json", [*U, "--forget", "{d}/badjson.json"], "badjson.json:1: not valid JSON"),
    ("huge-question", [*U, "--forget", "{d}/huge.jsonl"], "row 0's question has 100,000 characters"),
    ("question-over-max-length", [*U, "--forget", "{d}/tokens.jsonl"], "row 0's question is"),
    ("no-question-column", [*U, "--forget", "{d}/noq.jsonl"], "has no column 'question'"),
    ("empty-question", [*U, "--forget", "{d}/emptyq.jsonl"], "row 0 has an empty or missing question"),
    ("numeric-answer", [*U, "--method", "ga", "--forget", "{d}/numanswer.jsonl"], "row 0 has an empty or missing answer"),
    ("forget-folder", [*U, "--forget", "{d}/folder"], "is a folder"),
    ("forget-txt", [*U, "--forget", "{d}/data.txt"], "unknown data format '.txt'"),
    # output folders and the environment
    ("output-is-a-file", [*U[:-1], "{d}/afile"], "afile: is a file"),
    ("output-read-only", [*U[:-1], "{d}/readonly/out"], "readonly is not writable"),
    ("threads-abc", [*U], "PMC_UNLEARN_THREADS='abc'"),
    ("threads-zero", [*U], "PMC_UNLEARN_THREADS='0'"),
    ("no-output", U[:-2], "--output DIR is required"),
    ("resume-nothing", ["unlearn", "--resume", "{out}"], "no config.yaml there"),
    ("config-missing", [*U, "--config", "{d}/nope.yaml"], "nope.yaml: file not found"),
    ("unknown-method", [*U, "--method", "nosuch"], "--method nosuch: unknown method"),
    ("finetune-epochs-inf", ["finetune", "--model", "tiny-random", "--data", "tofu:forget01", "--output", "{out}",
                             "train.epochs=inf"], "train.epochs=inf"),
    # the other commands
    ("eval-batch-zero", ["eval", "--model", "tiny-random", "--forget-split", "forget01", "--output", "{out}",
                         "--batch-size", "0"], "--batch-size 0"),
    ("eval-new-tokens-zero", ["eval", "--model", "tiny-random", "--forget-split", "forget01", "--output", "{out}",
                              "--max-new-tokens", "0", "--no-forget-quality"], "--max-new-tokens 0"),
    ("eval-examples-zero", ["eval", "--model", "tiny-random", "--forget-split", "forget01", "--output", "{out}",
                            "--max-examples", "0"], "--max-examples 0"),
    ("demo-output-file", ["demo", "--profile", "test", "--output", "{d}/afile"], "afile: is a file"),
    ("demo-lr-nan", ["demo", "--profile", "test", "--output", "{out}", "unlearn.pmc.train.lr=nan"], "train.lr=nan"),
    ("demo-epochs-zero", ["demo", "--profile", "test", "--output", "{out}", "finetune.train.epochs=0"], "train.epochs=0.0"),
    ("demo-eval-zero", ["demo", "--profile", "test", "--output", "{out}", "evaluate.forget=0"], "evaluate.forget=0"),
    ("report-examples", ["report", "{d}", "--output", "{out}/r.html", "--examples", "-1"], "--examples -1"),
    ("report-not-html", ["report", "{d}", "--output", "{out}/r.txt"], "give a .html file name"),
    ("sweep-lr-nan", ["sweep", "--config", "{d}/sweep.yaml", "--output", "{out}"], "train.lr=nan"),
    ("attack-temperature-nan", ["attack", "--model", "tiny-random", "--forget-split", "forget01", "--output", "{out}",
                                "sampling.temperature=nan"], "sampling.temperature=nan: must be a finite number"),
    ("attack-batch-zero", ["attack", "--model", "tiny-random", "--forget-split", "forget01", "--output", "{out}",
                           "--batch-size", "0"], "--batch-size 0"),
]


@pytest.mark.parametrize("case, argv, msg", BAD, ids=[c[0] for c in BAD])
def test_bad_input_exit_2_one_line_no_output(tmp_path, capsys, monkeypatch, case, argv, msg):
    d = tmp_path / "in"
    _files(d)
    (d / "sweep.yaml").write_text("base: {model: {name: tiny-random}, data: {forget: tofu:forget01}, train: {lr: .nan}}\n"
                                  "methods: {ga: {}}\n")
    out = tmp_path / "out"
    if case.startswith("threads-"):
        monkeypatch.setenv("PMC_UNLEARN_THREADS", case.removeprefix("threads-").replace("zero", "0"))
    if case == "output-read-only" and os.geteuid() == 0:  # root writes anywhere: let the folder say no as it would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == d / "readonly" else real(p, mode, **kw))
    before = sorted(p.name for p in d.iterdir())
    rc = main([a.format(d=d, out=out) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("pmc-unlearn "), err
    assert msg in err, err
    assert not out.exists(), "an output folder was created"
    assert sorted(p.name for p in d.iterdir()) == before and not (d / "readonly" / "out").exists()
    assert (d / "afile").read_text() == "a file"
