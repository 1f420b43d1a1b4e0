"""`evaluate`: the whole TOFU evaluation of one model, as a function (the `eval` command calls it).

Order: validate every input (UserError, nothing written) -> load the model -> collect records
(resumable, cached) -> aggregate (pure) -> write records.jsonl, summary.json, TOFU_EVAL.json
and TOFU_SUMMARY.json into the output folder (main process only).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from pmc_unlearn.errors import UserError
from pmc_unlearn.evaluation import export, scores
from pmc_unlearn.evaluation import metrics as M
from pmc_unlearn.evaluation.intervals import tofu_intervals
from pmc_unlearn.evaluation.records import collect_records, read_records, split_key, write_records
from pmc_unlearn.evaluation.reference import check_reference, read_reference
from pmc_unlearn.evaluation.suite import (
    RNG400_SEED, RNG400_SIZE, GenSettings, holdout_for, prompt_format_for, retain_for, tofu_suite,
)
from pmc_unlearn.formatting import PromptFormat
from pmc_unlearn.precision import WEIGHT_DTYPES, Precision, check_run_args, default_device, resolve_dtype
from pmc_unlearn.provenance import barrier, git_hash, json_safe, launched_processes, rank_world, version_fields

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
RECORDS_FILE = "records.jsonl"
DTYPES = WEIGHT_DTYPES  # auto: bfloat16 where the device runs it natively (pmc_unlearn.precision)


def check_output(out: Path, overwrite: bool) -> None:
    """--output is a writable folder (or missing) whose records.jsonl, if any, this command wrote."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out}: is a file; pass a folder (it is created when missing)")
    from pmc_unlearn.rundir import check_writable

    check_writable(out)
    if overwrite:
        return
    rec = out / RECORDS_FILE
    if rec.exists():
        foreign = [r for r in read_records(rec) if "key" not in r or "split" not in r]
        if foreign:
            raise UserError(f"--output {out}: {RECORDS_FILE} there was not written by this command; "
                            "choose another --output or pass --overwrite")


def load_for_eval(model, dtype: str = "auto", device: str | None = None):
    """(LoadedModel in eval mode, its Precision): a name or folder loaded in the dtype `dtype` resolves to on
    this rank's device (accelerate launch), the GPU, or the CPU; a `models.LoadedModel` taken as it is."""
    from pmc_unlearn.models import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        precision, lm = Precision.of_model(model.model), model
    elif isinstance(model, str):
        if device is None and launched_processes() > 1:  # accelerate launch: this rank's device
            from accelerate import PartialState

            device = str(PartialState().device)
        device = device or default_device()
        precision = resolve_dtype(dtype, device, "--dtype")
        lm = load_model(model, dtype=precision.dtype, device=device)
    else:
        raise UserError(f"model {model!r}: pass a model name/folder or a models.LoadedModel")
    lm.model.eval()
    return lm, precision


def evaluate(
    model: str | object,
    forget_split: str,
    output_dir: str | Path | None = None,
    *,
    retain_records: str | Path | None = None,
    require_forget_quality: bool = True,
    max_examples: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 200,
    dtype: str = "auto",
    retain_sample: str = "perturbed",
    fmt: PromptFormat | None = None,
    default_fmt: PromptFormat | None = None,
    use_cache: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
    bootstrap: int = 1000,
    convention: str = M.DEFAULT_CONVENTION,
    specs: list | None = None,
    self_reference: bool = False,
    extra: dict | None = None,
) -> dict:
    """Evaluate a model (alias, folder, hub id, or a `models.LoadedModel`) on TOFU; returns summary.json's dict.

    `bootstrap` resamples (0: none) give every headline number a 95% interval over questions
    (`<key>_ci`; `evaluation.intervals`). Without `retain_records`, `require_forget_quality=True` raises UserError (forget quality needs
    the retain model); with False, forget_quality and privleak are null and a note says why.
    `fmt`: the prompt format; None takes the one saved beside a model folder we trained
    (pmc_unlearn_prompt.json), else `default_fmt` (e.g. the demo profile's format for the base model),
    else the evaluation's (`suite.prompt_format_for`).
    `convention` (open-unlearning or pmc-unlearn, docs/metrics.md) chooses the metric definitions;
    the records hold what both need, so the cache serves both, and summary.json says which was used.
    `specs`: the splits to evaluate (a subset of TOFU's, e.g. the demo's; default `suite.tofu_suite`).
    `self_reference`: the model is the retain model, its own records the reference (forget quality 1;
    needs `output_dir`). `extra`: fields added to the summary.
    """
    # 1. validate everything before any work
    if convention not in scores.CONVENTIONS:
        raise UserError(f"--convention {convention}: choose one of {', '.join(scores.CONVENTIONS)}")
    fmt = prompt_format_for(model, fmt, default=default_fmt)
    if bootstrap < 0:
        raise UserError(f"--bootstrap {bootstrap}: give 0 (no intervals) or a number of resamples such as 1000")
    check_run_args(batch_size, max_new_tokens, dtype)
    specs = specs if specs is not None else tofu_suite(forget_split, retain_sample, max_examples)
    if self_reference and (retain_records is not None or output_dir is None):
        raise ValueError("self_reference: the model's own records are the reference; give output_dir, no retain_records")
    forget_items = next(s for s in specs if s.name == M.FORGET).items
    reference = None
    if retain_records is not None:
        reference = read_reference(retain_records, convention)
        from pmc_unlearn.data import load_rows

        check_reference(reference, forget_split, forget_items, len(load_rows(f"tofu:{forget_split}_perturbed")))
    elif require_forget_quality:
        raise UserError("forget quality needs the retain model's records: pass --retain-records PATH "
                        "(records.jsonl of `pmc-unlearn eval` on the retain model, or open-unlearning's TOFU_EVAL.json), "
                        "or --no-forget-quality to report it as null")
    out = Path(output_dir).expanduser() if output_dir is not None else None
    if out is not None:
        check_output(out, overwrite)

    # 2. model
    t0 = time.time()
    from pmc_unlearn.models import fingerprint

    rank, _world = rank_world()
    lm, precision = load_for_eval(model, dtype, device)
    fp = fingerprint(lm.model)
    actual_dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    t_load = time.time() - t0

    gen = GenSettings(max_new_tokens)
    if out is not None and not overwrite:
        keys = {split_key(fp, s, gen, fmt, lm.tokenizer) for s in specs}
        other = {r.get("key") for r in read_records(out / RECORDS_FILE)} - keys
        if other:
            raise UserError(f"--output {out}: its {RECORDS_FILE} holds records of another model or other settings; "
                            "choose another --output or pass --overwrite")

    # 3. collect
    main = rank == 0
    if out is not None and main:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            (out / RECORDS_FILE).unlink(missing_ok=True)
    barrier(_world)
    t1 = time.time()
    records = collect_records(
        lm.model, lm.tokenizer, specs, fmt, gen, batch_size,
        records_path=(out / RECORDS_FILE) if out is not None else None,
        use_cache=use_cache, model_fingerprint=fp, progress=progress,
    )
    t_collect = time.time() - t1

    # 4. aggregate (pure)
    t2 = time.time()
    records = M.with_scores(records, convention)
    if self_reference and main:
        write_records(records, out / RECORDS_FILE)
        reference = read_reference(out / RECORDS_FILE, convention)
    summary = M.summarize(records, reference, require_forget_quality=False, convention=convention)
    summary.update(tofu_intervals(records, summary, reference, n_boot=bootstrap))
    t_agg = time.time() - t2
    summary.update({
        "model_name": lm.name,
        "model_fingerprint": fp,
        "forget_split": forget_split,
        "holdout_split": holdout_for(forget_split),
        "retain_sample": ("tofu:retain_perturbed (TOFU's 400 evaluation rows)" if retain_sample == "perturbed" else
                          f"tofu:{retain_for(forget_split)} rows default_rng({RNG400_SEED}).integers(0, n, "
                          f"{RNG400_SIZE}) (PMC authors' sample, with replacement)"),
        "max_examples": max_examples,
        **{f"n_examples_{s.name}": len(s.items) for s in specs},
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "batch_size": batch_size,
        "dtype": actual_dtype,
        "precision": precision.as_dict(),
        "device": str(next(lm.model.parameters()).device),
        "prompt_chat_template": fmt.use_chat_template and bool(getattr(lm.tokenizer, "chat_template", None)),
        "prompt_system": fmt.system_prompt,
        "prompt_max_length": fmt.max_length,
        "min_k": scores.MIN_K,
        "convention": convention,
        "time_load_s": round(t_load, 3),
        "time_collect_s": round(t_collect, 3),
        "time_aggregate_s": round(t_agg, 4),
        "git_commit": git_hash(),
        **version_fields(),
        **(extra or {}),
    })
    summary = json_safe(summary)

    # 5. write (main process only)
    if out is not None and main:
        write_records(records, out / RECORDS_FILE)
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        export.write_open_unlearning(records, summary, out)
        log.info("wrote %s, %s, TOFU_EVAL.json and TOFU_SUMMARY.json in %s", RECORDS_FILE, SUMMARY_FILE, out)
    return summary
