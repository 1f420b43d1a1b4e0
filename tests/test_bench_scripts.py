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


@pytest.fixture(scope="module")
def pmc_step():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_pmc_step", BENCH / "pmc_step.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


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
    assert r["phases"]["sampling (incl. references)"] > 0  # the timed sampler was the one PMC used
    assert {"load_model", "train"} <= set(r["phases"])
    assert 0 <= r["unresolved"] <= 2
