"""`--protocol pmc-paper`: the authors' step count, the protocol's settings, and docs/reproduce.md's
commands run end to end on tiny-random with tiny sizes."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from eval_fixtures import eval_cache  # noqa: F401  (fixture)

from pmc_unlearn import protocol
from pmc_unlearn.cli import main
from pmc_unlearn.errors import UserError
from pmc_unlearn.trainer import Plan

DOC = Path(__file__).resolve().parents[1] / "docs" / "reproduce.md"


# ----------------------------------------------------------------------------- step count

def test_authors_step_count_for_the_released_settings():
    # Phi-1.5: 40 x 400 // (16 x 4) = 16000 // 64 = 250 steps, warm-up max(1, 400 // 64) = 6;
    # 250 x 4 = 1000 micro-batches = 40 epochs of ceil(400 / 16) = 25
    phi = Plan(400, 1, 16, 4, 40.0, -1, 1.0, "authors")
    assert phi.total_steps == 250 and phi.warmup_steps == 6 and len(phi.micro_schedule()) == 1000
    assert phi.micro_schedule()[-1] == (39, 24, True)
    # our epoch count on the same settings: ceil(25 / 4) = 7 steps per epoch -> 280, warm-up 7
    ours = Plan(400, 1, 16, 4, 40.0, -1, 1.0)
    assert ours.total_steps == 280 and ours.warmup_steps == 7
    # Llama-3.2-3B: 30 x 400 // (8 x 2) = 750 steps, warm-up 400 // 16 = 25
    llama = Plan(400, 1, 8, 2, 30.0, -1, 1.0, "authors")
    assert llama.total_steps == 750 and llama.warmup_steps == 25


def test_authors_steps_straddle_epochs():
    # N = 9, batch 3, accumulation 2, 2 epochs: 3 micro-batches per epoch; 18 // 6 = 3 steps of 2 micro-batches,
    # the second step takes the last micro-batch of epoch 0 and the first of epoch 1
    p = Plan(9, 1, 3, 2, 2.0, -1, 1.0, "authors")
    assert p.micro_schedule() == [(0, 0, False), (0, 1, True), (0, 2, False), (1, 0, True), (1, 1, False), (1, 2, True)]
    # warm-up max(1, 9 // 6 = 1) = 1; none when warmup_epochs is 0; train.max_steps still caps
    assert p.warmup_steps == 1 and Plan(9, 1, 3, 2, 2.0, -1, 0.0, "authors").warmup_steps == 0
    assert Plan(9, 1, 3, 2, 2.0, 2, 1.0, "authors").total_steps == 2
    # a forget set smaller than batch x accumulation: 4 x 40 // 64 = 2 steps, warm-up max(1, 0) = 1
    small = Plan(40, 1, 16, 4, 4.0, -1, 1.0, "authors")
    assert small.total_steps == 2 and small.warmup_steps == 1


# ----------------------------------------------------------------------------- the protocol file

def test_protocol_variants_and_choice_by_model_type():
    phi = protocol.load("pmc-paper:phi-1.5", "unlearn", None)
    assert phi.settings["train"]["step_count"] == "authors" and phi.settings["train"]["max_grad_norm"] == 0.0
    assert phi.settings["pmc"]["retain_weight"] == 1.5 and phi.settings["data"]["use_chat_template"] is False
    assert phi.settings["data"]["max_length"] == 200 and phi.settings["pmc"]["max_new_tokens"] == 200
    # tiny-random is a Llama: the variant follows its model_type
    auto = protocol.load("pmc-paper", "unlearn", "tiny-random")
    assert auto.variant == "llama-3.2-3b-instruct"
    assert auto.settings["data"]["system_prompt"] == "You are a helpful assistant."
    assert protocol.load("pmc-paper", "eval", "tiny-random").settings == {"retain_sample": "rng400", "max_new_tokens": 200}
    with pytest.raises(UserError, match="unknown variant"):
        protocol.load("pmc-paper:gpt2", "unlearn", None)
    with pytest.raises(UserError, match="unknown protocol"):
        protocol.load("tofu", "unlearn", None)


def test_protocol_from_a_folder_of_another_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="pmc-paper:phi-1.5"):
        protocol.load("pmc-paper", "unlearn", str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi"}))
    assert protocol.load("pmc-paper", "finetune", str(tmp_path)).variant == "phi-1.5"


def test_dry_run_prints_the_plan_and_overrides_still_win(capsys):
    args = ["unlearn", "--protocol", "pmc-paper:phi-1.5", "--model", "tiny-random", "--dry-run"]
    assert main(args) == 0
    cap = capsys.readouterr()
    d = json.loads(cap.out)
    assert "protocol pmc-paper:phi-1.5 (unlearn) sets:" in cap.err and "step_count: authors" in cap.err
    assert d["config"]["protocol"] == "pmc-paper:phi-1.5" and d["config"]["method"] == "pmc"
    assert d["plan"]["optimizer_steps"] == 250 and d["plan"]["warmup_steps"] == 6
    assert main(args + ["train.epochs=4"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["optimizer_steps"] == 25  # 4 x 400 // 64
    assert main(args + ["--method", "npo"]) == 2
    assert "pmc run" in capsys.readouterr().err


# ----------------------------------------------------------------------------- docs/reproduce.md, on tiny-random

def reproduce_commands() -> tuple[dict[str, str], list[list[str]]]:
    """The variables and the pmc-unlearn commands of docs/reproduce.md's marked block."""
    text = DOC.read_text()
    block = text.split("<!-- reproduce:begin -->")[1].split("<!-- reproduce:end -->")[0]
    vars_, cmds = {}, []
    for line in block.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "```")):
            continue
        m = re.fullmatch(r"([A-Z]+)=(\S+)", line)
        if m:
            vars_[m.group(1)] = m.group(2)
            continue
        assert line.startswith("pmc-unlearn "), line
        cmds.append(shlex.split(line)[1:])
    return vars_, cmds


# what "tiny sizes" adds to each documented command (the protocol's own settings stay in force otherwise)
TINY = {
    "finetune": ["data.max_forget=8", "train.batch_size=4", "train.grad_accum=1", "train.epochs=1",
                 "train.lr=1e-3", "train.save_every=-1"],
    "unlearn": ["data.max_forget=4", "train.batch_size=2", "train.grad_accum=1", "train.epochs=1",
                "train.lr=1e-3", "pmc.n_samples=2", "pmc.max_new_tokens=8", "train.save_every=-1"],
    "eval": ["--max-examples", "2", "--max-new-tokens", "8", "--no-progress"],
}


def test_reproduce_md_commands_run_on_tiny_random(tmp_path, capsys):
    vars_, cmds = reproduce_commands()
    assert vars_["P"] == "pmc-paper:phi-1.5" and vars_["MODEL"] == "microsoft/phi-1_5"
    assert [c[0] for c in cmds] == ["finetune", "eval", "unlearn", "eval"]
    vars_.update(MODEL="tiny-random", RUN=str(tmp_path / "run"))
    for cmd in cmds:
        args = [re.sub(r"\$([A-Z]+)", lambda m: vars_[m.group(1)], a) for a in cmd]
        assert main(args + TINY[args[0]]) == 0, args
    run = tmp_path / "run"
    ft = yaml.safe_load((run / "full" / "config.yaml").read_text())
    assert ft["protocol"] == "pmc-paper:phi-1.5" and ft["sft"]["data"] == "tofu:full"
    assert ft["train"]["lr"] == 1e-3 and ft["train"]["step_count"] == "authors"  # the tiny override wins
    un = yaml.safe_load((run / "pmc-s0" / "config.yaml").read_text())
    assert un["protocol"] == "pmc-paper:phi-1.5" and un["method"] == "pmc"
    assert un["data"]["forget"] == "tofu:forget10" and un["data"]["retain"] == "tofu:retain90"
    assert un["data"]["use_chat_template"] is False and un["data"]["max_length"] == 200
    assert un["train"]["max_grad_norm"] == 0.0 and un["pmc"]["retain_weight"] == 1.5 and un["pmc"]["temperature"] == 1.25
    man = json.loads((run / "pmc-s0" / "manifest.json").read_text())
    # 1 epoch x 4 questions // (2 x 1) = 2 steps, warm-up max(1, 4 // 2) = 2
    assert man["plan"]["optimizer_steps"] == 2 and man["plan"]["warmup_steps"] == 2
    log = [json.loads(x) for x in (run / "pmc-s0" / "log.jsonl").read_text().splitlines()]
    # no clipping (max_grad_norm 0, above); the norm is still measured and logged, since every step's
    # gradients are checked finite before the optimizer uses them (tests/test_faults.py)
    assert log and all(x["train/grad_norm"] == x["train/grad_norm"] for x in log)
    for ev in ("eval-full", "eval-pmc-s0"):
        s = json.loads((run / ev / "summary.json").read_text())
        assert "default_rng(12345)" in s["retain_sample"] and s["n_examples_retain_sample"] == 2
        assert s["prompt_chat_template"] is False and s["max_new_tokens"] == 8
        assert s["unlearn_quality"] is not None and s["utility"] is not None
    assert "protocol pmc-paper:phi-1.5 (eval) sets:" in capsys.readouterr().err


def test_reproduce_md_llama_variant_plan(capsys):
    # the Llama row's settings, as docs/reproduce.md tells to set them, on the plan alone
    assert main(["unlearn", "--protocol", "pmc-paper:llama-3.2-3b-instruct", "--model", "tiny-random", "--dry-run"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["plan"]["optimizer_steps"] == 750 and d["plan"]["warmup_steps"] == 25
    assert d["config"]["data"]["system_prompt"] == "You are a helpful assistant." and d["config"]["pmc"]["n_samples"] == 20
