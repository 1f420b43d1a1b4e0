"""End-to-end runs of `pmc-unlearn unlearn` on tiny-random: outputs, bad input, resume, privacy."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import FAST
from pmc_unlearn.cli import main

BASE = ["unlearn", "--model", "tiny-random", "--forget", "tofu:forget01", "--retain", "tofu:retain99"]


def weights(run: Path):
    return load_file(str(run / "model" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] == wb[k]).all(), f"{k} differs"


def test_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    assert main([*BASE, "--output", str(out), *FAST]) == 0
    for name in ("config.yaml", "manifest.json", "log.jsonl", "samples.jsonl", "model/config.json",
                 "model/model.safetensors", "model/tokenizer.json"):
        assert (out / name).exists(), name
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "completed" and man["seed"] == 0 and man["versions"]["torch"]
    assert {"load_model", "setup", "train", "save"} <= set(man["phases_s"])
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, len(lines) + 1))
    for key in ("train/loss", "train/collapse_nll", "train/retain_nll", "sample/score_mean", "sample/score_min",
                "sample/score_max", "sample/unresolved", "perf/samples_per_s", "perf/tokens_per_s"):
        assert key in lines[-1], key
    assert "sample/truncated_frac" in lines[0]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"index", "text", "score", "chosen"} <= set(samples[0])
    chosen = [s for s in samples if s["chosen"]]
    # one chosen candidate per (step, question) that was sampled, and it has the lowest score
    for c in chosen:
        group = [s["score"] for s in samples if s["step"] == c["step"] and s["index"] == c["index"]]
        assert c["score"] == min(group)
    assert list((out / "checkpoints").iterdir())
    assert "train/checkpoint" in man["phases_s"]
    # the weights moved
    from pmc_unlearn.models import load_model

    base = load_model("tiny-random").model.state_dict()
    after = weights(out)
    assert any(not (after[k] == base[k]).all() for k in after if k in base)


def test_dry_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "dry"
    assert main([*BASE, "--output", str(out), "--dry-run", "train.max_steps=3"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["optimizer_steps"] == 3 and plan["forget_questions"] == 40
    assert not out.exists()


@pytest.mark.parametrize("args, msg", [
    (["--forget", "missing.json"], "missing.json: file not found"),
    (["pmc.retain_weight=-1"], "pmc.retain_weight"),
    (["pmc.top_p=1.2"], "pmc.top_p"),
    (["pmc.n_samples=0"], "pmc.n_samples"),
    (["train.nosuch=1"], "unknown config key"),
    (["--model", "/nonexistent/model"], "path not found"),
    (["--forget", "tofu:idontknow"], "no column 'question'"),
])
def test_bad_input_exit_2_and_no_output(tmp_path, capsys, args, msg):
    out = tmp_path / "bad"
    assert main([*BASE, "--output", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
    assert not out.exists()


def test_empty_forget_and_not_causal_lm(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert main([*BASE, "--forget", str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "o")]) == 2
    assert "empty" in capsys.readouterr().err
    from transformers import BertConfig

    d = tmp_path / "bert"
    BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(d)
    assert main([*BASE, "--model", str(d), "--output", str(tmp_path / "o2")]) == 2
    assert "not a causal language model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_refuses_to_overwrite_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*BASE, "--output", str(out), *FAST, "train.epochs=1"]) == 0
    assert main([*BASE, "--output", str(out), *FAST]) == 2
    assert "already holds a finished run" in capsys.readouterr().err


def test_privacy_forget_answers_never_used(tmp_path):
    """PMC needs only the questions: real answers, other text, or no answers give identical weights."""
    from pmc_unlearn.data import load_qa

    rows = load_qa("tofu:forget01")[:6]
    variants = {
        "real": rows,
        "other": [{"question": r["question"], "answer": "Something else entirely, " * 3} for r in rows],
        "none": [{"question": r["question"]} for r in rows],
    }
    outs = {}
    for name, data in variants.items():
        f = tmp_path / f"{name}.jsonl"
        f.write_text("\n".join(json.dumps(r) for r in data))
        outs[name] = tmp_path / f"run-{name}"
        assert main([*BASE, "--forget", str(f), "--output", str(outs[name]), *FAST]) == 0
    assert_same_weights(outs["real"], outs["other"])
    assert_same_weights(outs["real"], outs["none"])


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "pmc_unlearn", *args]


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    args = [*BASE, *FAST, "train.epochs=4"]
    full = tmp_path / "full"
    assert main([*args[:1], *args[1:], "--output", str(full)]) == 0
    crashed = tmp_path / "crashed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cli(*args, "--output", str(crashed)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill between steps: as soon as the second checkpoint is complete
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (crashed / "checkpoints" / "step-000002" / "state.json").exists():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (crashed / "model").exists()
    assert json.loads((crashed / "manifest.json").read_text())["status"] == "running"
    assert main(["unlearn", "--resume", str(crashed)]) == 0
    assert_same_weights(full, crashed)
    man = json.loads((crashed / "manifest.json").read_text())
    assert man["resumes"] == 1 and man["status"] == "completed"
    steps = [json.loads(x)["step"] for x in (crashed / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "log.jsonl has duplicate steps after resume"


def test_nan_loss_stops_with_clear_message(tmp_path, capsys):
    out = tmp_path / "nan"
    rc = main([*BASE, "--output", str(out), *FAST, "train.lr=1e30", "train.max_grad_norm=0", "train.epochs=6"])
    assert rc == 1
    err = capsys.readouterr().err
    # caught at the loss, or earlier at the gradients or the weights (before a step could poison them)
    assert ("loss is" in err or "gradient norm is" in err or "weights are non-finite" in err) and "checkpoint" in err
    assert json.loads((out / "manifest.json").read_text())["status"] == "diverged"
    assert not (out / "model").exists()


def test_lora_writes_adapter_and_merged(tmp_path):
    out = tmp_path / "lora"
    assert main([*BASE, "--output", str(out), *FAST, "train.epochs=1", "model.lora=true", "model.lora_r=4"]) == 0
    assert (out / "model" / "adapter" / "adapter_config.json").exists()
    assert (out / "model" / "model.safetensors").exists()
    from pmc_unlearn.models import load_model

    load_model(str(out / "model"))  # the merged copy loads as a plain causal LM


def test_two_processes_end_with_equal_weights(tmp_path):
    """DDP on CPU (gloo) through accelerate: both ranks hold the same weights at the end."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "pmc_unlearn", *BASE, "--output", str(out), *FAST]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})  # gloo on CPU, GPU or not
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.loads((out / "manifest.json").read_text())
    assert man["processes"] == 2
    fps = man["rank_fingerprints"]
    assert len(fps) == 2 and fps[0] == fps[1]


def test_save_every_minus_one_writes_no_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main([*BASE, "--output", str(out), *FAST, "train.save_every=-1"]) == 0
    assert (out / "model" / "model.safetensors").exists()
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "completed" and "train/checkpoint" not in man["phases_s"]
