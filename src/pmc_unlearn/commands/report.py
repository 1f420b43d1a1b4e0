"""`pmc-unlearn report RUN_DIR [RUN_DIR ...] --output FILE`: one HTML report (and report.md) from any runs.

Accepts demo folders, sequence folders (sequence.jsonl), training run folders (manifest.json /
log.jsonl / model/) and evaluation folders (summary.json / records.jsonl), in any mix; see
pmc_unlearn.report.gather.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="demo folder, sequence folder, run folder (unlearn/finetune output) or evaluation folder (eval output)")
    p.add_argument("--output", default="report.html", help="the HTML file to write (report.md goes beside it)")
    p.add_argument("--examples", type=int, default=None, help="forget and retain questions shown side by side (default 3)")
    p.add_argument("--title", default="Unlearning report", help="the report's title")
    p.add_argument("--force", action="store_true",
                   help="overwrite the .html, the .md beside it and the images folder even when they were not "
                        "written by pmc-unlearn report")


def run(args: argparse.Namespace) -> int:
    from pmc_unlearn.errors import UserError
    from pmc_unlearn.report import build_report

    if args.examples is not None and args.examples < 0:
        raise UserError(f"--examples {args.examples}: must be 0 or more")
    out = build_report(args.runs, args.output, examples=args.examples, title=args.title, force=args.force)
    print(f"wrote {out['html']} and {out['md']} ({len(out['models'])} models: {', '.join(out['models'])})")
    return 0
