"""`pmc-unlearn demo`: fine-tune a target and a retain model on a few TOFU authors, unlearn with PMC
and baselines, evaluate, attack, and write a report. Stages are cached and resume; see docs/demo.md.

Kept light at import time (argparse only): `pmc-unlearn --help` imports every command module.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default",
                   help="quick (2 TOFU authors, short runs), default (5 authors, more steps), muse-quick (MUSE-News "
                        "articles, docs/muse.md), or a YAML profile file; measured times in docs/demo.md")
    p.add_argument("--output", default="demo_out", help="demo folder (created; a rerun reuses finished stages)")
    p.add_argument("--plan", action="store_true", help="print the profile and the stages with their keys, run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (stage lines are still printed)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="profile overrides, e.g. unlearn.pmc.train.epochs=6 evaluate.forget=20")


def run(args: argparse.Namespace) -> int:
    from pmc_unlearn.demo import plan, run_demo

    if args.plan:
        print(json.dumps(plan(args.profile, args.overrides), indent=2, default=str))
        return 0
    try:
        demo = run_demo(args.profile, args.output, args.overrides, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"pmc-unlearn demo: interrupted; run the same command again to resume (finished stages are kept in "
              f"{args.output})")
        return 130
    failed = [s["name"] for s in demo["stages"] if s.get("status") == "failed"]
    _print_headline(args.output)
    if failed:
        print(f"note: optional stages failed: {', '.join(failed)} (see their stage.json)")
    return 0


def _print_headline(output: str) -> None:
    from pmc_unlearn.report.gather import gather
    from pmc_unlearn.report.render import HEADLINE, fmt

    from pmc_unlearn.report.render import MUSE

    data = gather([output])
    muse = any(k in m.summary for m in data.models for k, _ in MUSE)  # a muse-news demo: MUSE's columns
    heads = [(k, "pct") for k, _ in MUSE] if muse else [(k, f) for k, _, f in HEADLINE[:4]]
    cols = ["model", *[k for k, _ in heads], "train_s"]
    print("  ".join(f"{c:>16}" for c in cols))
    for m in data.models:
        vals = [m.label + ("*" if m.is_pmc else ""), *[fmt(m.metric(k), f) for k, f in heads], fmt(m.train_time_s, "s")]
        print("  ".join(f"{v:>16}" for v in vals))
