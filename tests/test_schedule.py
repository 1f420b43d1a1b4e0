"""The learning-rate schedule: warm-up, linear decay, and decay over a time budget (hand-worked numbers)."""

from __future__ import annotations

import pytest

from pmc_unlearn.trainer import linear_schedule


def test_warmup_then_linear_decay():
    f = linear_schedule(2, 10)
    # warm-up: 0/2, 1/2; then (10 - s) / (10 - 2): 8/8 at s=2, 4/8 at s=6, 0 at s=10 and after
    assert [f(s) for s in (0, 1, 2, 6, 10, 12)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0, 0.0])


def test_time_budget_decays_whichever_ends_first():
    used = {"t": 0.0}
    f = linear_schedule(0, 100, lambda: used["t"])
    used["t"] = 0.25  # a quarter of the time, 10 of 100 steps: the time leads -> 0.75
    assert f(10) == pytest.approx(0.75)
    used["t"] = 0.1  # a tenth of the time, half of the steps: the steps lead -> 0.5
    assert f(50) == pytest.approx(0.5)
    used["t"] = 1.2  # past the budget: 0, never negative
    assert f(1) == 0.0
    # warm-up is counted in steps whatever the clock says
    g = linear_schedule(4, 100, lambda: 0.9)
    assert g(2) == pytest.approx(0.5)
