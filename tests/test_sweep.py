"""`pmc-unlearn sweep`: grid expansion, validation before any work, a small run with plots, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pmc_unlearn.cli import main
from pmc_unlearn.plots import pareto_front
from pmc_unlearn.sweep import parse_sweep

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "model": {"name": "tiny-random"},
    "data": {"forget": "tofu:forget01", "retain": "tofu:retain99", "max_forget": 2},
    "train": {"epochs": 1, "batch_size": 2, "grad_accum": 1, "warmup_epochs": 0, "lr": 1.0e-3},
}
EVAL = {"max_examples": 1, "max_new_tokens": 4, "batch_size": 4}


def write(tmp_path: Path, spec: dict, name: str = "sweep.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


def test_pareto_front_by_hand():
    # (0.5, 0.5) is dominated by (1, 1); (1, 0.5) by (1, 1) too (equal x, lower y); the rest by nobody
    pts = [(1, 1), (2, 0), (0, 2), (0.5, 0.5), (1, 0.5)]
    assert pareto_front(pts) == [2, 0, 1]
    assert pareto_front([(1, 1), (1, 1)]) == [0, 1]  # duplicates both stay


def test_grid_expansion_and_block_override():
    raw = {
        "base": BASE,
        "grid": {"train.lr": [1e-5, 2e-5], "train.seed": [0, 1]},
        "methods": {
            "npo": {"grid": {"npo.beta": [0.1, 0.2]}},
            "ga": {"set": {"train.lr": 1e-6}},  # replaces the shared lr axis: 2 seeds, not 4 points
        },
        "points": [{"method": "simnpo", "simnpo.beta": 3.0}],
    }
    specs, base, ev = parse_sweep(raw, Path("x.yaml"))
    methods = [m for m, _, _, _ in specs]
    assert methods.count("npo") == 8 and methods.count("ga") == 2 and methods.count("simnpo") == 1
    assert {tuple(sorted(p.items())) for m, p, _, _ in specs if m == "ga"} == {
        (("train.lr", 1e-6), ("train.seed", 0)), (("train.lr", 1e-6), ("train.seed", 1))}
    assert all(not any(k.startswith("npo.") for k in p) for m, p, _, _ in specs if m != "npo")


def test_example_sweep_file_is_valid(capsys):
    assert main(["sweep", "--config", str(ROOT / "configs" / "sweep-example.yaml"), "--output", "/nonexistent/x",
                 "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["points"]) == 15


@pytest.mark.parametrize("spec, msg", [
    ({"methods": {"nosuch": {}}}, "unknown method 'nosuch'"),
    ({"methods": {"ga": {"set": {"npo.beta": 0.1}}}}, "npo.beta is for method npo, but this block is method ga"),
    ({"grid": {"npo.beta": [0.1]}, "methods": {"npo": {}}}, "method settings belong in methods.<name>"),
    ({"methods": {"npo": {"grid": {"npo.beta": [0.1, 0]}}}}, "point 'npo beta=0': npo.beta=0.0: must be > 0.0"),
    ({"methods": {"npo": {"grid": {"npo.beta": 0.1}}}}, "give a non-empty list"),
    ({"methods": {"ga": {"grid": {"train.lr": [1e-3, 0.001]}}}}, "has the same config as"),
    ({"methods": {"ga": {}}, "eval": {"retain_records": "/nonexistent/records.jsonl"}}, "eval.retain_records"),
    ({"methods": {"ga": {}}, "eval": {"nosuch": 1}}, "unknown config key eval.nosuch"),
    ({"methods": {"ga": {"set": {"data.forget": "tofu:idontknow"}}}, "eval": {"forget_split": "forget01"}},
     "no column 'question'"),
    ({"methods": {"ga": {"set": {"data.forget": "tofu:holdout01"}}}}, "set eval.forget_split"),
    ({"methods": {"ga": {}}, "base_": {}}, "unknown top-level key"),
    ({"base": {"npo": {"beta": 0.1}}, "methods": {"npo": {}}}, "not model/data/train"),
    ({"methods": {"ga": {}}, "seeds": [0, 0]}, "seeds: give a non-empty list of distinct integers"),
    ({"methods": {"ga": {"seeds": 3}}}, "methods.ga.seeds: give a non-empty list"),
    ({"methods": {"ga": {"set": {"train.seed": 1}, "seeds": [0, 1]}}}, "train.seed and seeds both given"),
])
def test_bad_sweep_file_exit_2_before_any_work(tmp_path, capsys, spec, msg):
    spec = {"base": BASE, **spec}
    out = tmp_path / "out"
    assert main(["sweep", "--config", str(write(tmp_path, spec)), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert msg in err, err
    assert not out.exists()


def test_sweep_runs_resumes_and_plots(tmp_path, capsys):
    spec = {
        "base": BASE,
        "methods": {"ga": {"grid": {"train.lr": [1.0e-3, 1.0e-2]}}, "npo": {"grid": {"npo.beta": [0.1, 0.5]}}},
        "eval": EVAL,
    }
    cfg = write(tmp_path, spec)
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(cfg), "--output", str(out), "--devices", "cpu"]) == 0
    for name in ("points.jsonl", "pareto.png", "pareto.svg", "sweep.yaml"):
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(x) for x in (out / "points.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["ga", "ga", "npo", "npo"]
    assert [r["params"] for r in rows] == [{"train.lr": 1e-3}, {"train.lr": 1e-2}, {"npo.beta": 0.1}, {"npo.beta": 0.5}]
    for r in rows:
        assert r["status"] == "done"
        assert r["config"]["method"] == r["method"] and ("npo" in r["config"]) == (r["method"] == "npo")
        assert {"unlearn_quality", "utility", "model_utility", "forget_quality"} <= set(r["summary"])
        assert r["summary"]["forget_quality"] is None  # no retain records: reported as null
        assert r["train"]["steps"] == 1 and r["train"]["train_s"] > 0
    assert rows[2]["config"]["npo"]["beta"] == 0.1
    assert rows[2]["train"]["method_info"]["reference_model_bytes"] > 0

    # rerun: every point is finished, nothing is trained or evaluated again
    stamps = {r["id"]: (out / "points" / r["id"] / "point.json").stat().st_mtime_ns for r in rows}
    assert main(["sweep", "--config", str(cfg), "--output", str(out)]) == 0
    assert stamps == {r["id"]: (out / "points" / r["id"] / "point.json").stat().st_mtime_ns for r in rows}

    # a point whose process died after its last checkpoint resumes from it, then is evaluated
    pid = rows[3]["id"]
    pdir = out / "points" / pid
    man_path = pdir / "run" / "manifest.json"
    man = json.loads(man_path.read_text())
    man["status"] = "running"
    man_path.write_text(json.dumps(man))
    (pdir / "point.json").unlink()
    import shutil

    shutil.rmtree(pdir / "run" / "model")
    assert main(["sweep", "--config", str(cfg), "--output", str(out)]) == 0
    man = json.loads(man_path.read_text())
    assert man["status"] == "completed" and man["resumes"] == 1
    assert json.loads((pdir / "point.json").read_text())["status"] == "done"
    assert len((out / "points.jsonl").read_text().splitlines()) == 4

    # a changed sweep file keeps the finished points and adds the new one
    spec["methods"]["npo"]["grid"]["npo.beta"].append(1.0)
    write(tmp_path, spec)
    assert main(["sweep", "--config", str(cfg), "--output", str(out)]) == 0
    rows2 = [json.loads(x) for x in (out / "points.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows2[:4]] == [r["id"] for r in rows] and rows2[4]["params"] == {"npo.beta": 1.0}
    assert stamps[rows[0]["id"]] == (out / "points" / rows[0]["id"] / "point.json").stat().st_mtime_ns


def test_refuses_a_foreign_output_folder(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something").write_text("x")
    cfg = write(tmp_path, {"base": BASE, "methods": {"ga": {}}, "eval": EVAL})
    assert main(["sweep", "--config", str(cfg), "--output", str(out)]) == 2
    assert "holds no sweep.yaml" in capsys.readouterr().err


def test_one_worker_process_per_device(tmp_path):
    """--devices 0,1 starts one worker per device (CUDA_VISIBLE_DEVICES set per worker; on a CPU
    machine both run on the CPU), each taking every second point; the parent writes the results."""
    spec = {"base": BASE, "methods": {"ga": {"grid": {"train.lr": [1.0e-3, 1.0e-2]}}}, "eval": EVAL}
    cfg = write(tmp_path, spec)
    out = tmp_path / "par"
    r = subprocess.run([sys.executable, "-m", "pmc_unlearn", "sweep", "--config", str(cfg), "--output", str(out),
                        "--devices", "0,1"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "points.jsonl").read_text().splitlines()]
    assert [x["status"] for x in rows] == ["done", "done"]
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert logs == ["worker-0.log", "worker-1.log"]
    for k, row in enumerate(rows):  # worker k ran point k
        assert row["id"] in (out / "logs" / f"worker-{k}.log").read_text()


def test_seeds_expand_every_setting():
    raw = {"base": BASE, "seeds": [0, 1, 2],
           "methods": {"ga": {"grid": {"train.lr": [1e-3, 1e-2]}}, "npo": {"seeds": [5]}},
           "points": [{"method": "simnpo", "seeds": [7, 8]}, {"method": "gd", "train.seed": 4}]}
    specs, _, _ = parse_sweep(raw, Path("x.yaml"))
    assert [(m, s) for m, _, _, s in specs] == [("ga", [0, 1, 2]), ("ga", [0, 1, 2]), ("npo", [5]),
                                                 ("simnpo", [7, 8]), ("gd", None)]


def test_mean_interval_and_seed_means_by_hand():
    from pmc_unlearn.plots import mean_interval, seed_means

    # [1, 2, 3]: mean 2, sd 1, se 1/sqrt(3) = 0.57735, t(0.975, 2) = 4.30265 -> half-width 2.48414
    m, h = mean_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(2.48414, abs=1e-5)
    assert mean_interval([5.0]) == (5.0, 0.0)
    pts = [{"method": "ga", "group": "ga lr=1", "seed": 0, "utility": 10.0, "forget_quality": None},
           {"method": "ga", "group": "ga lr=1", "seed": 1, "utility": 20.0, "forget_quality": None},
           {"method": "ga", "group": "ga lr=2", "seed": 0, "utility": 7.0},
           {"method": "npo", "label": "lonely", "utility": 3.0}]
    rows = seed_means(pts)
    assert [r["label"] for r in rows] == ["ga lr=1", "ga lr=2", "lonely"]
    # [10, 20]: mean 15, sd 7.0711, se 5, t(0.975, 1) = 12.7062 -> 63.531
    assert rows[0]["utility"] == 15.0 and rows[0]["utility_err"] == pytest.approx(63.531, abs=1e-3)
    assert rows[0]["n_seeds"] == 2 and rows[0]["seeds"] == [0, 1] and "forget_quality" not in rows[0]
    assert rows[1]["utility"] == 7.0 and "utility_err" not in rows[1] and rows[2]["n_seeds"] == 1


def test_sweep_with_two_seeds_draws_interval_bars(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from pmc_unlearn.plots import PARETO_PANELS, plot_pareto, seed_means
    from pmc_unlearn.sweep import flat_points

    spec = {"base": BASE, "seeds": [0, 1], "methods": {"ga": {}}, "eval": EVAL}
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(write(tmp_path, spec)), "--output", str(out), "--devices", "cpu"]) == 0
    rows = [json.loads(x) for x in (out / "points.jsonl").read_text().splitlines()]
    assert [(r["group"], r["seed"]) for r in rows] == [("ga", 0), ("ga", 1)]
    assert [r["config"]["train"]["seed"] for r in rows] == [0, 1] and rows[0]["id"] != rows[1]["id"]
    means = seed_means(flat_points(rows))
    assert len(means) == 1 and means[0]["n_seeds"] == 2 and "unlearn_quality_err" in means[0]
    fig, ax = plt.subplots()
    plot_pareto(ax, means, PARETO_PANELS[0])
    assert any(isinstance(c, ErrorbarContainer) for c in ax.containers)
    plt.close(fig)
    assert (out / "pareto.png").stat().st_size > 0
