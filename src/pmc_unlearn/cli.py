"""Command-line entry point: `pmc-unlearn <command> ...`.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
they are imported lazily so `pmc-unlearn --help` stays fast. Bad input (`UserError`) becomes a
one-line message on stderr and exit code 2; a diverged run or a failed write (full disk) a
one-line message and exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pmc_unlearn.cpu import check_env, configure_env  # noqa: E402  (imports no torch)

# Before torch is imported: a short OpenMP spin (pmc_unlearn.cpu explains the trade-off; the
# thread count then follows the machine's load), unless the user chose a wait policy.
configure_env()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pmc_unlearn.errors import OutputWriteError, TrainingDiverged, UserError  # noqa: E402

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "unlearn": ("pmc_unlearn.commands.unlearn", "unlearn a forget set (PMC or a baseline)"),
    "finetune": ("pmc_unlearn.commands.finetune", "fine-tune a model on QA data (TOFU target/retain models)"),
    "eval": ("pmc_unlearn.evaluation.cli", "evaluate a model on TOFU (both metric families)"),
    "sweep": ("pmc_unlearn.commands.sweep", "run a grid of unlearn + eval points (resumable) and plot Pareto fronts"),
    "sequence": ("pmc_unlearn.commands.sequence", "unlearning requests one after another, evaluated after each (resumable)"),
    "demo": ("pmc_unlearn.commands.demo", "the whole story on a small model: fine-tune, unlearn (PMC, baselines), evaluate, report"),
    "report": ("pmc_unlearn.commands.report", "an HTML + Markdown report comparing runs, evaluations or demo folders"),
    "attack": ("pmc_unlearn.attacks.cli", "attack a model: does forgotten knowledge leak (sampling, prefill, relearning, ...)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pmc-unlearn", description="Make language models forget: PMC and baselines.")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(_module=mod)
        importlib.import_module(mod).add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # torchao (used by the quantization attack) is imported by transformers on every model load
    # and warns about CUDA-only extensions it cannot load on a CPU: harmless, so quiet.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not args.command:
        parser.print_help()
        return 2
    try:
        check_env()  # PMC_UNLEARN_THREADS and the like, before any output exists
        return int(importlib.import_module(args._module).run(args) or 0)
    except UserError as e:
        print(f"pmc-unlearn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"pmc-unlearn {args.command}: training diverged: {e}", file=sys.stderr)
        return 1
    except OutputWriteError as e:
        print(f"pmc-unlearn {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a write the machine refused anywhere else (a full disk): one line too
        from pmc_unlearn.rundir import WRITE_ERRNOS, write_failed

        if e.errno not in WRITE_ERRNOS:
            raise
        print(f"pmc-unlearn {args.command}: error: {write_failed(e, '.')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pmc-unlearn {args.command}: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
