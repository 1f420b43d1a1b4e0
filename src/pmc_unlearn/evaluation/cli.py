"""`pmc-unlearn eval`: evaluate a model on TOFU (both metric families, docs/evaluation.md) or on
MUSE-News (`--benchmark muse-news`: VerbMem, KnowMem, PrivLeak; docs/muse.md).

Kept light at import time (argparse only): `pmc-unlearn --help` imports every command module.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model alias (tiny-random, smollm2-135m), save_pretrained folder or hub id")
    p.add_argument("--benchmark", default="tofu", choices=("tofu", "muse-news"),
                   help="tofu (default) or muse-news (VerbMem, KnowMem forget/retain, PrivLeak; docs/muse.md)")
    p.add_argument("--forget-split", default=None, choices=("forget01", "forget05", "forget10"),
                   help="TOFU forget split (required with --benchmark tofu); the holdout split for MIA follows it")
    p.add_argument("--forget-texts", default=None,
                   help="muse-news only: the forget articles the model was trained on when it saw only part of "
                        "muse-news:forget (a text source); VerbMem and KnowMem-forget then run on the items they cover")
    p.add_argument("--output", required=True, help="folder for records.jsonl, summary.json, TOFU_EVAL.json, TOFU_SUMMARY.json")
    p.add_argument("--max-length", type=int, default=None,
                   help="muse-news only: tokens of each privleak text scored (default 2048; longer texts are cut and counted)")
    p.add_argument("--retain-records", default=None,
                   help="the retain model's results on the same forget split: our records.jsonl (or its run folder) "
                        "or open-unlearning's TOFU_EVAL.json; needed for forget_quality and privleak "
                        "(muse-news: the records.jsonl of its muse-news eval)")
    p.add_argument("--no-forget-quality", action="store_true",
                   help="run without --retain-records: forget_quality and privleak are reported as null, with a note")
    p.add_argument("--max-examples", type=int, default=None, help="only the first N examples of each split (smoke tests)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward/generate batch (results do not depend on it)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="greedy generation limit (default 200, as in both references)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="weights dtype when loading the model (auto: bfloat16 where the device runs it natively, "
                        "float32 elsewhere; the choice and why go into the summary)")
    p.add_argument("--retain-sample", default=None, choices=("perturbed", "rng400"),
                   help="retain sample for the PMC utility U: TOFU's retain_perturbed (default), or the PMC authors' 400 "
                        "rows drawn with default_rng(12345) from retainXX (retain99 for forget01, ...)")
    p.add_argument("--protocol", metavar="NAME[:VARIANT]",
                   help="a published evaluation's settings (configs/protocol-NAME.yaml); pmc-paper: --retain-sample "
                        "rng400 --max-new-tokens 200 (flags given explicitly still win)")
    p.add_argument("--convention", default="open-unlearning", choices=("open-unlearning", "pmc-unlearn"),
                   help="metric definitions (docs/metrics.md): open-unlearning's code (default; EM/ES/Min-K without the "
                        "closing EOS, int(0.4 T), +1e-10 in the truth ratio, ZLib on decoded tokens) or pmc-unlearn's "
                        "(every answer token, ceil(0.4 T), exact truth ratio, ZLib on the answer text)")
    p.add_argument("--plain-prompt", action="store_true",
                   help="use 'Question: ...\\nAnswer:' instead of the tokenizer's chat template (must match training)")
    p.add_argument("--system-prompt", default=None, help="system prompt for the chat template (default: the template's own)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="resamples for the 95%% intervals over questions of every headline number (<key>_ci in "
                        "summary.json; fixed seed 0); 0 turns them off")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the per-split record cache")
    p.add_argument("--overwrite", action="store_true", help="discard records.jsonl already in --output instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from pmc_unlearn.errors import UserError
    from pmc_unlearn.evaluation.api import evaluate
    from pmc_unlearn.evaluation.suite import EVAL_FORMAT
    from pmc_unlearn.formatting import PromptFormat

    if args.retain_records is not None and args.no_forget_quality:
        raise UserError("--retain-records and --no-forget-quality contradict each other; pass one of them")
    if args.max_examples is not None and args.max_examples < 1:
        raise UserError(f"--max-examples {args.max_examples}: must be at least 1 (or left out for every example)")
    if args.benchmark == "muse-news":
        return _run_muse(args)
    if args.forget_split is None:
        raise UserError("--forget-split is required with --benchmark tofu: choose forget01, forget05 or forget10")
    if args.forget_texts is not None or args.max_length is not None:
        raise UserError("--forget-texts and --max-length are for --benchmark muse-news; leave them out for TOFU")
    chosen = {"retain_sample": args.retain_sample, "max_new_tokens": args.max_new_tokens}
    settings = {"retain_sample": "perturbed", "max_new_tokens": 200}
    if args.protocol:
        import sys

        from pmc_unlearn import protocol

        proto = protocol.load(args.protocol, "eval", args.model)
        print(proto.describe(), file=sys.stderr)
        settings.update(proto.settings)
    settings.update({k: v for k, v in chosen.items() if v is not None})

    fmt = None  # evaluate() takes the format a model we trained saved (the one it learned with), else the default
    if args.plain_prompt or args.system_prompt is not None:
        fmt = PromptFormat(use_chat_template=not args.plain_prompt, system_prompt=args.system_prompt,
                           max_length=EVAL_FORMAT.max_length)
    s = evaluate(
        args.model, args.forget_split, args.output,
        retain_records=args.retain_records, require_forget_quality=not args.no_forget_quality,
        max_examples=args.max_examples, batch_size=args.batch_size, max_new_tokens=settings["max_new_tokens"],
        dtype=args.dtype, retain_sample=settings["retain_sample"], fmt=fmt, use_cache=not args.no_cache, bootstrap=args.bootstrap,
        overwrite=args.overwrite, progress=not args.no_progress, convention=args.convention,
    )

    from pmc_unlearn.provenance import rank_world

    if rank_world()[0] != 0:  # under accelerate launch only the main process reports
        return 0

    def f(k: str) -> str:
        v = s.get(k)
        return "null" if v is None else f"{v:.4g}"

    print(f"unlearn_quality={f('unlearn_quality')} utility={f('utility')} | forget_quality={f('forget_quality')} "
          f"model_utility={f('model_utility')} forget_truth_ratio={f('forget_truth_ratio')} | "
          f"mia_min_k_auc={f('mia_min_k_auc')} privleak={f('privleak')} | convention {s.get('convention')} | "
          f"written to {args.output}")
    if s.get("forget_quality_note"):
        print(f"note: {s['forget_quality_note']}")
    return 0


def _run_muse(args: argparse.Namespace) -> int:
    from pmc_unlearn.errors import UserError
    from pmc_unlearn.evaluation.muse import evaluate_muse

    for flag, bad in (("--forget-split", args.forget_split is not None), ("--plain-prompt", args.plain_prompt),
                      ("--system-prompt", args.system_prompt is not None), ("--retain-sample", args.retain_sample is not None),
                      ("--max-new-tokens", args.max_new_tokens is not None),
                      ("--protocol", getattr(args, "protocol", None) is not None)):
        if bad:
            raise UserError(f"{flag} is a TOFU option; MUSE-News uses raw-text prompts and its own limits "
                            "(128 tokens for VerbMem, 32 for KnowMem): leave it out with --benchmark muse-news")
    s = evaluate_muse(
        args.model, args.output, retain_records=args.retain_records, require_privleak=not args.no_forget_quality,
        max_examples=args.max_examples, forget_texts=args.forget_texts, batch_size=args.batch_size,
        **({"max_length": args.max_length} if args.max_length is not None else {}),
        dtype=args.dtype, use_cache=not args.no_cache, overwrite=args.overwrite, progress=not args.no_progress,
    )

    from pmc_unlearn.provenance import rank_world

    if rank_world()[0] != 0:  # under accelerate launch only the main process reports
        return 0

    def f(k: str) -> str:
        v, ci = s.get(k), s.get(f"{k}_ci")
        if v is None:
            return "null"
        return f"{v:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci and None not in ci else "")

    print(f"verbmem_forget={f('verbmem_forget')} knowmem_forget={f('knowmem_forget')} "
          f"knowmem_retain={f('knowmem_retain')} privleak={f('privleak')} | written to {args.output}")
    if s.get("privleak_note"):
        print(f"note: {s['privleak_note']}")
    return 0
