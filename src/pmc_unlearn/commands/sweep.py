"""`pmc-unlearn sweep`: a grid of unlearn + eval points from one YAML file; resumable; Pareto plots.

See pmc_unlearn.sweep for the file format and docs/methods.md for an example.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pmc_unlearn.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="sweep file (YAML: base, grid, methods, points, eval)")
    p.add_argument("--output", required=True, help="sweep folder; rerunning the command there resumes it")
    p.add_argument("--devices", default="auto",
                   help="auto (one worker process per GPU when there are several, else run here), cpu, "
                        "or CUDA device indices like 0,1 (one worker each)")
    p.add_argument("--dry-run", action="store_true", help="validate every point and list them; write nothing")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # k/n: run every n-th point from k (set by the parent)


def _worker(spec: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UserError(f"--worker {spec}: expected k/n") from None
    if not 0 <= k < n:
        raise UserError(f"--worker {spec}: expected 0 <= k < n")
    return k, n


def run(args) -> int:
    from pmc_unlearn.sweep import check_output, load_sweep, parse_devices, run_sweep

    worker = _worker(args.worker) if args.worker else None
    devices = parse_devices(args.devices)
    sweep = load_sweep(args.config)  # validates every point before anything is written
    out = Path(args.output).expanduser()
    if args.dry_run:
        print(json.dumps({"points": [{"id": p.id, "label": p.label, "forget_split": p.forget_split} for p in sweep.points],
                          "eval": sweep.eval_dict, "devices": devices or "this process"}, indent=2))
        return 0
    check_output(out)
    records = run_sweep(sweep, out, devices=devices, worker=worker)
    if worker is None:
        done = sum(r.get("status") == "done" for r in records)
        failed = sum(r.get("status") == "diverged" for r in records)
        print(f"{done} of {len(sweep.points)} points done{f', {failed} diverged' if failed else ''}: "
              f"{out / 'points.jsonl'}, {out / 'pareto.png'}, {out / 'pareto.svg'}")
    return 0
