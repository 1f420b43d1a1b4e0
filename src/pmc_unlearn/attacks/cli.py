"""`pmc-unlearn attack`: run leakage attacks against a model and write attacks.json (docs/attacks.md).

Kept light at import time (argparse only): `pmc-unlearn --help` imports every command module.
"""

from __future__ import annotations

import argparse

ATTACK_NAMES = ("sampling", "prefill", "paraphrase", "relearning", "quantization", "least_likely")  # = api.ATTACK_NAMES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model alias (tiny-random, smollm2-135m), save_pretrained folder or hub id")
    p.add_argument("--forget-split", help="TOFU forget split: forget01, forget05 or forget10")
    p.add_argument("--output", help="folder for attacks.json, attacks_records.jsonl and relearning/ (created when missing)")
    p.add_argument("--attacks", default="all",
                   help=f"comma-separated subset of {','.join(ATTACK_NAMES)} (default: all)")
    p.add_argument("--max-examples", type=int, default=None,
                   help="only the first N forget questions (relearning: N trained and N measured rows)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="generation limit for every attack (200 as in eval)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate / forward batch")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="weights dtype when loading the model (auto: bfloat16 where the device runs it natively, "
                        "float32 elsewhere; the choice and why go into the summary)")
    p.add_argument("--plain-prompt", action="store_true",
                   help="use 'Question: ...\\nAnswer:' instead of the tokenizer's chat template (must match training)")
    p.add_argument("--system-prompt", default=None, help="system prompt for the chat template (default: the template's own)")
    p.add_argument("--overwrite", action="store_true",
                   help="rerun the chosen attacks even when attacks.json already has them (default: skip them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--help-settings", action="store_true", help="list every attack setting with its default and help")
    p.add_argument("settings", nargs="*", metavar="attack.key=value",
                   help="attack settings, e.g. sampling.k=4 prefill.prefixes='[\"Sure: \"]' relearning.max_steps=1")


def run(args: argparse.Namespace) -> int:
    import logging

    # transformers imports torchao when it is installed; on a CPU its CUDA-only extensions fail to
    # load with harmless warnings (and torch warns about its enums): keep them off the terminal.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)

    from pmc_unlearn.attacks.api import parse_attacks, run_attacks, settings_help
    from pmc_unlearn.sections import parse_overrides
    from pmc_unlearn.errors import UserError

    if args.help_settings:
        print(settings_help())
        return 0
    missing = [f for f, v in (("--model", args.model), ("--forget-split", args.forget_split), ("--output", args.output)) if not v]
    if missing:
        raise UserError(f"{', '.join(missing)} required (see pmc-unlearn attack --help)")
    names = parse_attacks(args.attacks)
    fmt = None
    if args.plain_prompt or args.system_prompt is not None:
        from pmc_unlearn.evaluation.suite import EVAL_FORMAT
        from pmc_unlearn.formatting import PromptFormat

        fmt = PromptFormat(use_chat_template=not args.plain_prompt, system_prompt=args.system_prompt,
                           max_length=EVAL_FORMAT.max_length)
    doc = run_attacks(
        args.model, args.forget_split, args.output, attacks=names, settings=parse_overrides(args.settings),
        max_examples=args.max_examples, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        dtype=args.dtype, fmt=fmt, overwrite=args.overwrite, progress=not args.no_progress,
    )

    def f(v) -> str:
        return "null" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    for n in names:
        h = doc["attacks"][n]["headline"]
        print(f"{n}: {h['metric']}={f(h['value'])} ({h['reference_name']}: {f(h['reference'])})")
    print(f"written to {args.output}/attacks.json")
    return 0
