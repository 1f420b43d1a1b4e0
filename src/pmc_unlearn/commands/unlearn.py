"""`pmc-unlearn unlearn`: run PMC (or a baseline) on a forget set and save the model and logs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pmc_unlearn.errors import UserError


def add_common(p: argparse.ArgumentParser, primary_flag: str, primary_help: str) -> None:
    p.add_argument("--config", help="YAML config file (sections: model, data, train, <method>)")
    p.add_argument("--model", help="model to start from: folder, hub id, smollm2-135m or tiny-random")
    p.add_argument(primary_flag, dest="primary", help=primary_help)
    p.add_argument("--output", help="output folder (required unless --resume or --dry-run)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--dry-run", action="store_true", help="validate config, data and model path, print the plan, write nothing")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    p.add_argument("--protocol", metavar="NAME[:VARIANT]",
                   help="apply a published run's settings (configs/protocol-NAME.yaml): pmc-paper (the PMC authors' "
                        "run; variant phi-1.5 or llama-3.2-3b-instruct, else chosen by the model's type); --config, "
                        "flags and overrides still win. See docs/reproduce.md")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.lr=1e-5 pmc.n_samples=5")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, "--forget", "forget set: tofu:<split>, a local file, or a hub dataset")
    p.add_argument("--method", help="unlearning method (default pmc)")
    p.add_argument("--retain", help="retain set: tofu:<split>, a local file, or a hub dataset")


def resolve(args, method: str | None, primary_key: str = "data.forget", defaults: dict | None = None,
            command: str = "unlearn"):
    """The run config from --config, the flags (`primary_key`: where the primary data flag goes) and overrides."""
    from pmc_unlearn.config import load_config
    from pmc_unlearn.sections import set_dotted

    extra: dict[str, dict] = {}
    if args.model:
        extra.setdefault("model", {})["name"] = args.model
    if args.primary:
        set_dotted(extra, primary_key, args.primary)
    if getattr(args, "retain", None):
        extra.setdefault("data", {})["retain"] = args.retain
    if args.resume:
        if args.config or extra or args.overrides or method or getattr(args, "protocol", None):
            raise UserError("--resume DIR continues a run with its own config.yaml; drop the other flags and overrides")
        cfg_path = Path(args.resume).expanduser() / "config.yaml"
        if not cfg_path.is_file():
            raise UserError(f"--resume {args.resume}: no config.yaml there; pass the output folder of an earlier run")
        return load_config(cfg_path)
    if getattr(args, "protocol", None):
        method, defaults = apply_protocol(args, command, method, extra, defaults)
    return load_config(args.config, args.overrides, method=method, extra=extra, defaults=defaults)


def apply_protocol(args, command: str, method: str | None, extra: dict, defaults: dict | None):
    """(method, defaults) with the protocol's settings as the layer above the built-in defaults.

    The variant follows the model the run starts from (flag, --config file or override) unless
    named. The settings are printed (stderr); config.yaml records the resolved values and the
    protocol's name.
    """
    import sys

    from pmc_unlearn import protocol
    from pmc_unlearn.config import load_config
    from pmc_unlearn.sections import deep_merge

    start = load_config(args.config, args.overrides, method=method, extra=extra, defaults=defaults)
    proto = protocol.load(args.protocol, command, start.model.name)
    settings = dict(proto.settings)
    pmethod = settings.pop("method", None)
    if pmethod and method and method != pmethod:
        raise UserError(f"--protocol {args.protocol}: it is a {pmethod} run; drop --method {method}")
    print(proto.describe(), file=sys.stderr)
    merged = deep_merge(defaults or {}, settings)
    merged["protocol"] = proto.label
    return method or pmethod, merged


def print_help_config(method: str | None) -> int:
    import dataclasses

    from pmc_unlearn.config import DataConfig, ModelConfig, TrainConfig
    from pmc_unlearn.methods import METHOD_CONFIGS
    from pmc_unlearn.sections import config_help

    parts = [config_help(ModelConfig, "model"), config_help(DataConfig, "data"), config_help(TrainConfig, "train")]
    for name, cls in METHOD_CONFIGS.items():
        if (method is None or name == method) and dataclasses.fields(cls):
            parts.append(config_help(cls, name))
    print("\n\n".join(parts))
    return 0


def execute(args, cfg, defaults_note: str = "") -> int:
    from pmc_unlearn import rundir
    from pmc_unlearn.methods import METHODS
    from pmc_unlearn.models import check_causal_lm
    from pmc_unlearn.trainer import Plan, check_lengths, load_data, train

    out = Path(args.resume or args.output or "").expanduser()
    if not args.resume and not args.output and not args.dry_run:
        raise UserError("--output DIR is required (or --resume DIR, or --dry-run)")
    if not args.dry_run:
        rundir.prepare_output(out, resume=bool(args.resume))  # cheap checks first: nothing is written yet
    method = METHODS[cfg.method](cfg.method_cfg)
    primary, retain = load_data(cfg, method)
    check_causal_lm(cfg.model.name)
    check_lengths(cfg, primary, retain)
    if args.dry_run:
        from pmc_unlearn.data import is_text_row

        if any(is_text_row(r) for r in primary + retain):  # text sources: the plan counts chunks
            from pmc_unlearn.models import load_tokenizer
            from pmc_unlearn.trainer import chunk_rows

            primary, retain = chunk_rows(cfg, method, load_tokenizer(cfg.model.name), primary, retain)
        plan = Plan(len(primary), 1, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.epochs,
                    cfg.train.max_steps, cfg.train.warmup_epochs, cfg.train.step_count)
        print(json.dumps({"config": cfg.to_dict(), "plan": {
            "forget_questions": len(primary), "retain_pairs": len(retain), "micro_batches": len(plan.micro_schedule()),
            "optimizer_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
            "warmup_steps": plan.warmup_steps}}, indent=2))
        return 0
    result = train(cfg, out, resume=bool(args.resume), check_output=True)
    print(f"done in {result.get('wall_time_s', 0):.1f} s: model in {out / 'model'}, logs in {out / 'log.jsonl'}")
    return 0


def run(args) -> int:
    if args.help_config:
        return print_help_config(args.method)
    cfg = resolve(args, args.method)
    if cfg.method == "sft":
        raise UserError("--method sft is plain fine-tuning; use `pmc-unlearn finetune`")
    return execute(args, cfg)
