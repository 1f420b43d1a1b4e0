"""The benchmark scripts' variants still run against the library (they are not imported anywhere else).

`bench/pmc_step.py`'s straightforward path loads the model itself; when the library's defaults
changed (model.dtype became `auto`) it broke without any test noticing. These run each variant
in-process on tiny-random for 2 questions and 4 new tokens and check the facts it reports.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    """bench/NAME.py as a module (bench/ on sys.path while it loads: the scripts import `_common`)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def pmc_step():
    return _load("pmc_step")


def _spec(variant: str) -> dict:
    return {"variant": variant, "model": "tiny-random", "questions": 2, "max_new_tokens": 4,
            "eval": "none", "eval_examples": 2, "eval_tokens": 4}


def test_simple_variant_runs_one_epoch(pmc_step):
    r = pmc_step.run_simple(_spec("simple"))
    assert r["wall_s"] > 0 and r["phases"]["sampling"] >= 0
    assert r["unresolved"] is not None and 0 <= r["unresolved"] <= 2
    assert next(r["model"].model.parameters()).dtype.is_floating_point


@pytest.mark.parametrize("variant", ["ours-fast", "ours-static"])
def test_trainer_variants_run_one_epoch(pmc_step, variant, tmp_path):
    r = pmc_step.run_ours(_spec(variant), tmp_path)
    assert r["wall_s"] > 0
    assert r["phases"]["sampling (incl. references)"] >= 0  # timed (rounded to 0.1 s: a tiny run may show 0.0)
    assert {"load_model", "train"} <= set(r["phases"])
    assert 0 <= r["unresolved"] <= 2


def test_fronts_and_dominators_hand_worked():
    fr = _load("fronts")

    def row(method, label, uq, u):
        return {"method": method, "label": f"sweep: {label}", "unlearn_quality": uq, "utility": u, "n_seeds": 1}

    rows = [row("base", "start", 44, 57),
            row("pmc", "a", 76, 51), row("pmc", "b", 82, 43), row("pmc", "c", 80, 42),  # c: dominated by b (same method)
            row("npo", "x", 87, 45), row("npo", "y", 97, 36), row("gd", "z", 76, 51)]
    f = fr.fronts(rows)
    assert [r["label"] for r in f["pmc"]] == ["sweep: a", "sweep: b"]  # sorted by UQ; c is off the front
    assert [r["label"] for r in f["npo"]] == ["sweep: x", "sweep: y"] and "base" not in f
    # b (82, 43) is dominated by npo x (87, 45); a (76, 51) only ties gd z, which is not domination
    assert [d["label"] for d in fr.dominators(f["pmc"][1], rows)] == ["sweep: x"]
    assert fr.dominators(f["pmc"][0], rows) == []
    text = fr.front_report(rows)
    assert "| b | 82.0 / 43.0 | x (87.0 / 45.0, 1) |" in text and "| a | 76.0 / 51.0 | none |" in text
