"""`pmc-unlearn finetune`: the TOFU protocol's first step, on the same loop as unlearning.

The *target* model is the base model fine-tuned on `tofu:full` (or a subset); the *retain*
model is the same recipe on the retain split only. The recipe (`methods.sft.FINETUNE_DEFAULTS`)
follows TOFU's except learning rate and batch; the training data is the config key `sft.data`
(`--data`).
"""

from __future__ import annotations

import argparse

from pmc_unlearn.commands.unlearn import add_common, execute, print_help_config, resolve


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, "--data", "training data: tofu:full, tofu:retain90, a local file, or a hub dataset")


def run(args) -> int:
    if args.help_config:
        return print_help_config("sft")
    from pmc_unlearn.methods.sft import FINETUNE_DEFAULTS

    cfg = resolve(args, "sft", primary_key="sft.data", defaults=FINETUNE_DEFAULTS, command="finetune")
    return execute(args, cfg)
