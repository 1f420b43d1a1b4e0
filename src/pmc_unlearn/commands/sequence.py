"""`pmc-unlearn sequence`: unlearning requests one after another, each from the model the previous
one produced, with an evaluation after each; resumable; per-request forgetting curves.

See pmc_unlearn.sequence for the file format and docs/sequence.md for an example.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="sequence file (YAML: base, method, requests, eval)")
    p.add_argument("--output", required=True, help="sequence folder; rerunning the command there resumes it")
    p.add_argument("--dry-run", action="store_true", help="validate the file, data and models, list the requests; write nothing")


def run(args) -> int:
    import dataclasses

    from pmc_unlearn.sequence import format_table, load_sequence, run_sequence

    plan = load_sequence(args.config)  # validates everything before anything is written
    out = Path(args.output).expanduser()
    if args.dry_run:
        print(json.dumps({"method": plan.method, "start_model": plan.base.model.name, "forget_split": plan.forget_split,
                          "requests": [{**r.info(), "eval_items": len(g)} for r, g in zip(plan.requests, plan.groups)],
                          "eval_items": {s.name: len(s.items) for s in plan.suite}, "eval": dataclasses.asdict(plan.eval)},
                         indent=2))
        return 0
    lines = run_sequence(plan, out, ["pmc-unlearn", "sequence", "--config", str(args.config), "--output", str(out)])
    print(format_table(lines))
    print(f"{len(lines) - 1} of {len(plan.requests)} requests done: {out / 'sequence.jsonl'}, {out / 'sequence.png'}, "
          f"{out / 'sequence.svg'}")
    return 0
