"""CPU threading policy: the pure parts with hand-worked numbers, the adapter on a fake clock."""

import pytest

from pmc_unlearn import cpu


def test_configure_env_sets_a_short_spin_unless_a_policy_is_set():
    env = {}
    cpu.configure_env(env)
    assert env == {"GOMP_SPINCOUNT": cpu.SPINCOUNT}
    for given in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}):
        env = dict(given)
        cpu.configure_env(env)
        assert env == given  # the user's choice stands


def test_others_cores():
    # 3.0 s busy on all cores over 2 s of wall time, 1.2 s of it ours: others used 0.9 cores
    assert cpu.others_cores(3.0, 1.2, 2.0) == pytest.approx(0.9)
    assert cpu.others_cores(1.0, 1.1, 1.0) == 0.0  # rounding in /proc/stat: never negative
    assert cpu.others_cores(1.0, 0.0, 0.0) == 0.0


@pytest.mark.parametrize("others,cores,max_threads,want", [
    (0.0, 2, 2, 2), (0.1, 2, 2, 2), (0.49, 2, 2, 2), (0.5, 2, 2, 1), (1.0, 2, 2, 1), (1.9, 2, 2, 1),
    (0.0, 8, 4, 4), (2.6, 8, 8, 5), (7.9, 8, 8, 1),
])
def test_choose_threads(others, cores, max_threads, want):
    assert cpu.choose_threads(others, cores, max_threads) == want


def test_adapter_follows_the_load(monkeypatch):
    import torch

    state = {"now": 100.0, "busy": 1000.0, "own": 10.0, "threads": 2}
    monkeypatch.setattr(cpu.time, "monotonic", lambda: state["now"])
    monkeypatch.setattr(cpu.time, "process_time", lambda: state["own"])
    monkeypatch.setattr(cpu, "_read_busy_s", lambda: state["busy"])
    monkeypatch.setattr(torch, "get_num_threads", lambda: state["threads"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: state.update(threads=n))
    monkeypatch.delenv("PMC_UNLEARN_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1})
    a = cpu._Adapter()
    assert a() is None  # first call: a baseline only

    def tick(dt, ours, others):
        state["now"] += dt
        state["own"] += ours * dt
        state["busy"] += (ours + others) * dt
        return a()

    assert tick(0.1, 2.0, 0.0) is None  # too soon to measure
    assert tick(1.0, 2.0, 1.0) == 1 and state["threads"] == 1  # someone took a core
    assert tick(1.0, 1.0, 1.0) == 1  # still there; our own use does not count
    assert tick(1.0, 1.0, 0.05) == 2 and state["threads"] == 2  # gone: both cores again


def test_adapter_leaves_a_fixed_thread_count_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    a = cpu._Adapter()
    assert a() is None and a.enabled is False
