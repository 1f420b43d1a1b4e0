"""Precision decided per device (pmc_unlearn.precision): `auto` follows native bf16; explicit bf16 warns once.

The probe (`precision.cpu_native_bf16`) is patched to play a CPU with native bf16 (AVX512-BF16 or
AMX) and one without (AVX2 only), whatever this machine is.
"""

import json
import logging

import pytest
import torch

from conftest import FAST
from pmc_unlearn import precision as P
from pmc_unlearn.cli import main
from pmc_unlearn.errors import UserError

BASE = ["unlearn", "--model", "tiny-random", "--forget", "tofu:forget01", "--retain", "tofu:retain99"]


@pytest.fixture()
def cpu_kind(monkeypatch):
    """cpu_kind(True/False): make the CPU report native bf16 or not; the slowdown probe returns 120."""

    def set_kind(native: bool):
        monkeypatch.setattr(P, "cpu_native_bf16", lambda: native)
        monkeypatch.setattr(P, "bf16_slowdown", lambda device="cpu", size=128, reps=5: 120.0)
        monkeypatch.setattr(P, "_warned", set())

    return set_kind


def test_auto_follows_native_bf16(cpu_kind):
    cpu_kind(False)
    assert P.resolve_bf16("auto", "cpu").bf16 is False
    assert P.resolve_dtype("auto", "cpu").dtype == "float32"
    assert "emulated" in P.resolve_bf16("auto", "cpu").reason
    cpu_kind(True)
    assert P.resolve_bf16("auto", "cpu").bf16 is True
    assert P.resolve_dtype("auto", "cpu").dtype == "bfloat16"
    assert "native" in P.resolve_bf16("auto", "cpu").reason
    # training weights stay float32 master weights on every device
    assert P.resolve_dtype("auto", "cpu", training=True).dtype == "float32"


def test_explicit_settings_are_kept(cpu_kind):
    cpu_kind(True)
    assert P.resolve_bf16(False, "cpu").bf16 is False
    assert P.resolve_bf16("false", "cpu").bf16 is False
    assert P.resolve_dtype("float32", "cpu").dtype == "float32"
    cpu_kind(False)
    assert P.resolve_bf16(True, "cpu").bf16 is True  # runs, slowly, as asked
    assert P.resolve_dtype("bfloat16", "cpu").dtype == "bfloat16"
    with pytest.raises(UserError, match="train.bf16='maybe'"):
        P.resolve_bf16("maybe", "cpu")
    with pytest.raises(UserError, match="choose one of auto, float32, bfloat16"):
        P.resolve_dtype("float16", "cpu")


def test_explicit_bf16_on_emulating_cpu_warns_once_with_the_slowdown(cpu_kind, caplog):
    cpu_kind(False)
    with caplog.at_level(logging.WARNING, logger="pmc_unlearn.precision"):
        P.resolve_bf16(True, "cpu", "train.bf16")
        P.resolve_dtype("bfloat16", "cpu", "--dtype")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "\n" not in warnings[0] and "120x slower" in warnings[0] and "train.bf16" in warnings[0]


def test_no_warning_where_bf16_is_native(cpu_kind, caplog):
    cpu_kind(True)
    with caplog.at_level(logging.WARNING, logger="pmc_unlearn.precision"):
        P.resolve_bf16(True, "cpu")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_slowdown_probe_measures_a_ratio():
    r = P.bf16_slowdown("cpu", size=32, reps=2)
    assert r > 0 and r == r  # a finite positive ratio (its size depends on the CPU)


def test_config_accepts_auto_and_booleans():
    from pmc_unlearn.config import load_config

    assert load_config(overrides=["train.bf16=auto"]).train.bf16 == "auto"
    assert load_config(overrides=["train.bf16=true"]).train.bf16 is True
    assert load_config(overrides=["train.bf16=false"]).train.bf16 is False
    assert load_config().train.bf16 == "auto" and load_config().model.dtype == "auto"
    with pytest.raises(UserError, match="model.dtype='float16'"):
        load_config(overrides=["model.dtype=float16"])


@pytest.mark.parametrize("native", [False, True])
def test_training_and_its_sampler_follow_auto(tmp_path, cpu_kind, monkeypatch, native):
    """The manifest records the decision; the loop's autocast and PMC's sampler get it."""
    from pmc_unlearn import sampling

    cpu_kind(native)
    seen = []
    real = dict(sampling.SAMPLERS)

    def spy(name):
        def make(tok, batch_rows=64, bf16=False):
            seen.append(bf16)
            return real[name](tok, batch_rows=batch_rows, bf16=bf16)
        return make

    monkeypatch.setattr(sampling, "SAMPLERS", {k: spy(k) for k in real})  # PMC builds its sampler from these
    out = tmp_path / "run"
    assert main([*BASE, "--output", str(out), *FAST, "train.epochs=1", "train.save_every=-1"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["precision"]["compute"]["bf16"] is native
    assert man["precision"]["compute"]["setting"] == "auto"
    assert man["precision"]["weights"]["dtype"] == "float32"
    assert seen == [native]


class Loaded(Exception):
    """Raised by the patched loader: the test only needs the dtype the command chose."""


def _spy_loader(monkeypatch, module):
    def fake(name, dtype="float32", seed=0, device="cpu"):
        raise Loaded(dtype)

    monkeypatch.setattr(module, "load_model", fake)


@pytest.mark.parametrize("native,want", [(False, "float32"), (True, "bfloat16")])
def test_evaluation_and_attacks_load_the_resolved_dtype(cpu_kind, monkeypatch, tmp_path, native, want):
    import pmc_unlearn.models as models
    from pmc_unlearn.attacks import run_attacks
    from pmc_unlearn.evaluation.api import evaluate

    cpu_kind(native)
    _spy_loader(monkeypatch, models)
    with pytest.raises(Loaded, match=want):
        evaluate("tiny-random", "forget01", None, require_forget_quality=False, max_examples=1, device="cpu")
    with pytest.raises(Loaded, match=want):
        run_attacks("tiny-random", "forget01", tmp_path / "att", attacks="prefill", max_examples=1, device="cpu")


def test_evaluation_summary_records_the_precision(cpu_kind):
    from pmc_unlearn.evaluation.api import evaluate

    cpu_kind(False)
    s = evaluate("tiny-random", "forget01", None, require_forget_quality=False, max_examples=1, batch_size=4,
                 max_new_tokens=4, device="cpu", use_cache=False, progress=False)
    assert s["dtype"] == "float32"
    assert s["precision"]["setting"] == "auto" and s["precision"]["bf16"] is False
    assert "emulated" in s["precision"]["reason"]


def test_demo_profile_dtype_auto_resolves(cpu_kind):
    from pmc_unlearn.demo import load_profile

    for name in ("quick", "default"):
        assert load_profile(name)["evaluate"]["dtype"] == "auto"
    cpu_kind(False)
    assert P.resolve_dtype(load_profile("default")["evaluate"]["dtype"], "cpu").dtype == "float32"


def test_cuda_reports_its_own_support():
    ok, why = P.native_bf16("cuda")
    assert ok == bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert why.startswith("CUDA")
