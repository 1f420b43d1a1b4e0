"""`run_attacks`: run any subset of the attacks against one model and write attacks.json.

Order: validate every input (UserError, nothing written) -> load the model and compare it with
what attacks.json already holds -> per attack: skip it when its section is already there with
the same settings (unless `overwrite`), else run it and rewrite attacks.json and
attacks_records.jsonl (atomically) before the next one, so a killed run resumes per attack.
Layout of both files: docs/attacks.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pmc_unlearn.errors import UserError
from pmc_unlearn.formatting import PromptFormat
from pmc_unlearn.pipeline import Stage, digest, run_stages
from pmc_unlearn.precision import WEIGHT_DTYPES, Precision, check_run_args, default_device, resolve_dtype
from pmc_unlearn.provenance import git_hash, json_safe, version_fields, write_json_atomic, write_jsonl_atomic

log = logging.getLogger(__name__)

ATTACK_NAMES = ("sampling", "prefill", "paraphrase", "relearning", "quantization", "least_likely")
ATTACKS_FILE = "attacks.json"
RECORDS_FILE = "attacks_records.jsonl"
SCHEMA_VERSION = 1
DTYPES = WEIGHT_DTYPES  # auto: bfloat16 where the device runs it natively (pmc_unlearn.precision)


def attack_module(name: str):
    return importlib.import_module(f"pmc_unlearn.attacks.{name}")


def parse_attacks(spec: str | Sequence[str] | None) -> list[str]:
    """'all', 'sampling,prefill' or a list -> attack names in the canonical order, validated."""
    if spec is None:
        return list(ATTACK_NAMES)
    names = [x.strip() for x in (spec.split(",") if isinstance(spec, str) else spec) if x and x.strip()]
    if names == ["all"]:
        return list(ATTACK_NAMES)
    if not names:
        raise UserError(f"--attacks {spec!r}: name at least one of {', '.join(ATTACK_NAMES)} (or all)")
    bad = [n for n in names if n not in ATTACK_NAMES]
    if bad:
        raise UserError(f"--attacks: unknown attack '{bad[0]}'; choose from {', '.join(ATTACK_NAMES)} (comma-separated) or all")
    return [n for n in ATTACK_NAMES if n in names]


def build_settings(names: Sequence[str], settings: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """Each attack's Settings from defaults and `settings` ({attack: {key: value}}, values may be strings)."""
    from pmc_unlearn.sections import build_section

    settings = dict(settings or {})
    for sec in settings:
        if sec not in ATTACK_NAMES:
            raise UserError(f"unknown settings section '{sec}'; known: {', '.join(ATTACK_NAMES)}")
        if sec not in names:
            raise UserError(f"settings for '{sec}' were given but {sec} is not among the attacks run "
                            f"({', '.join(names)}); add it to --attacks or drop the settings")
    return {n: build_section(attack_module(n).Settings, n, dict(settings.get(n, {}))) for n in names}


def settings_help(names: Sequence[str] = ATTACK_NAMES) -> str:
    from pmc_unlearn.sections import config_help

    return "\n\n".join(config_help(attack_module(n).Settings, n) for n in names)


def _write_json(path: Path, obj: Any) -> None:
    write_json_atomic(path, json_safe(obj), ensure_ascii=False)


def read_attacks(path: str | Path) -> dict:
    """attacks.json as a dict ({} when missing); UserError when it is not ours."""
    path = Path(path)
    if path.is_dir():
        path = path / ATTACKS_FILE
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg}); pass --overwrite to start it again") from e
    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION or not isinstance(doc.get("attacks"), dict):
        raise UserError(f"{path}: not an attacks.json of this version; choose another --output or pass --overwrite")
    return doc


def read_attack_records(path: str | Path) -> list[dict]:
    from pmc_unlearn.evaluation.records import read_records

    path = Path(path)
    return read_records(path / RECORDS_FILE if path.is_dir() else path)


def _write_records(path: Path, keep: list[dict], new: list[dict]) -> None:
    write_jsonl_atomic(path, [json_safe(r) for r in [*keep, *new]])


def _model_folder(name: str) -> str | None:
    """A save_pretrained folder with the model's weights (for relearning), or None (a copy is saved)."""
    from pmc_unlearn.models import SMOLLM2_ALIAS, TINY_ALIAS, smollm2_folder

    if name == TINY_ALIAS:
        return None
    if name == SMOLLM2_ALIAS:
        return str(smollm2_folder())
    p = Path(name).expanduser()
    return str(p) if p.is_dir() else None


def run_attacks(
    model: str | object,
    forget_split: str,
    output_dir: str | Path,
    *,
    attacks: str | Sequence[str] | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    max_examples: int | None = None,
    max_new_tokens: int = 200,
    batch_size: int = 8,
    dtype: str = "auto",
    fmt: PromptFormat | None = None,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> dict:
    """Run `attacks` (default: all six) on `model`; write and return attacks.json's dict.

    `model`: an alias (tiny-random, smollm2-135m), a save_pretrained folder, a hub id, or a
    `models.LoadedModel`. `settings`: {attack: {key: value}} over each attack's defaults
    (`pmc-unlearn attack --help-settings`). `fmt`: the prompt format; None takes the one saved
    beside a model folder we trained (pmc_unlearn_prompt.json), else the evaluation's.
    """
    from pmc_unlearn.evaluation.suite import FORGET_SPLITS, prompt_format_for
    from pmc_unlearn.models import LoadedModel, check_causal_lm, fingerprint, load_model

    # 1. validate everything before any work
    names = parse_attacks(attacks)
    if forget_split not in FORGET_SPLITS:
        raise UserError(f"--forget-split {forget_split}: choose one of {', '.join(FORGET_SPLITS)}")
    if max_examples is not None and max_examples < 1:
        raise UserError(f"--max-examples {max_examples}: must be at least 1 (or left out for every example)")
    check_run_args(batch_size, max_new_tokens, dtype)
    objs = build_settings(names, settings)
    if output_dir is None:
        raise UserError("--output DIR is required (attacks.json and the relearning runs go there)")
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out}: is a file; pass a folder (it is created when missing)")
    if isinstance(model, str):
        check_causal_lm(model)
    elif not isinstance(model, LoadedModel):
        raise UserError(f"model {model!r}: pass a model name/folder or a models.LoadedModel")
    fmt = prompt_format_for(model, fmt)
    if device is None:
        device = default_device()
    if isinstance(model, LoadedModel):
        device = str(next(model.model.parameters()).device)
        precision = Precision.of_model(model.model)
    else:
        precision = resolve_dtype(dtype, device, "--dtype")
    run_settings = {"forget_split": forget_split, "max_examples": max_examples, "max_new_tokens": max_new_tokens,
                    "dtype": precision.dtype, "prompt_format": dataclasses.asdict(fmt)}
    doc = _read_or_empty(out) if overwrite else read_attacks(out / ATTACKS_FILE)
    if doc and doc.get("run_settings") != run_settings:
        if not overwrite:
            raise UserError(f"--output {out}: its {ATTACKS_FILE} was written with other run settings "
                            f"({_diff(doc.get('run_settings') or {}, run_settings)}); choose another --output or pass --overwrite")
        doc = {}
    if not overwrite:
        for n in names:
            sec = doc.get("attacks", {}).get(n) if doc else None
            if sec is not None and sec.get("settings") != json_safe(dataclasses.asdict(objs[n])):
                raise UserError(f"--output {out}: its {n} section was run with other settings "
                                f"({_diff(sec.get('settings') or {}, dataclasses.asdict(objs[n]))}); "
                                "choose another --output or pass --overwrite to run it again")

    # 2. model
    t0 = time.time()
    if isinstance(model, LoadedModel):
        lm, folder = model, None
    else:
        lm, folder = load_model(model, dtype=precision.dtype, device=device), _model_folder(model)
    lm.model.eval()
    fp = fingerprint(lm.model)
    t_load = time.time() - t0
    if doc and doc.get("model_fingerprint") != fp:
        if not overwrite:
            raise UserError(f"--output {out}: its {ATTACKS_FILE} holds results of another model "
                            f"(fingerprint {doc.get('model_fingerprint')}, this one {fp}); choose another --output or pass --overwrite")
        doc = {}

    from pmc_unlearn.attacks.common import AttackContext, Timer, load_items
    from pmc_unlearn.sampling import Completion

    forget_source = f"tofu:{forget_split}_perturbed"
    ctx = AttackContext(lm.model, lm.tokenizer, fmt, forget_split, load_items(forget_source), max_examples,
                        max_new_tokens, batch_size, out, precision.dtype, device, lm.name, folder, progress)
    for n in names:
        check = getattr(attack_module(n), "check", None)
        if check is not None:
            check(ctx, objs[n])

    # 3. run, writing after each attack
    out.mkdir(parents=True, exist_ok=True)
    rec_path = out / RECORDS_FILE
    old_records = read_attack_records(rec_path) if doc else []
    if not doc:
        doc = {"schema_version": SCHEMA_VERSION, "attacks": {}}
        _write_records(rec_path, [], [])
    else:  # the greedy answers of the unattacked model are reused, not recomputed
        by_index = {it.index: it for it in ctx.forget_items}
        for r in old_records:
            it = by_index.get(r.get("index"))
            if r.get("attack") == "baseline" and it is not None and r.get("question") == it.question:
                ctx._baseline[it.index] = Completion(r["generation"], r.get("n_tokens", 0), r.get("hit_limit", False))
    doc.update({
        "schema_version": SCHEMA_VERSION,
        "model_name": lm.name, "model_fingerprint": fp, "forget_split": forget_split, "forget_source": forget_source,
        "run_settings": run_settings, "n_forget_examples": len(ctx.forget_items), "max_examples": max_examples,
        "max_new_tokens": max_new_tokens, "batch_size": batch_size, "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "precision": precision.as_dict(),
        "device": str(next(lm.model.parameters()).device),
        "prompt_chat_template": ctx.chat, "prompt_system": fmt.system_prompt, "prompt_max_length": fmt.max_length,
        "recall": "ROUGE-L recall (rouge_score RougeScorer(['rougeL'], use_stemmer=True), target = ground truth) of greedy "
                  "generations (prompt alone, cut at EOS) unless an attack says otherwise",
        "records_file": RECORDS_FILE, "time_load_s": round(t_load, 3), "git_commit": git_hash(), **version_fields(),
    })
    doc.setdefault("attacks", {})
    attacks_file = out / ATTACKS_FILE
    _write_json(attacks_file, doc)

    records = {"old": old_records}

    def run_one(n: str) -> dict:
        had_baseline = set(ctx._baseline)
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with Timer() as t:
            res = attack_module(n).run(ctx, objs[n])
        sec = {"settings": dataclasses.asdict(objs[n]), "time_s": round(t.s, 3), "started_at": started,
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "n_examples": res.n_examples,
               "headline": res.headline, "metrics": res.metrics, **res.extra}
        doc["attacks"][n] = sec
        new = [{"attack": n, **r} for r in res.records]
        drop = {n}
        if set(ctx._baseline) != had_baseline:  # the baseline was computed during this attack
            drop.add("baseline")
            base = ctx.baseline()
            from pmc_unlearn.attacks.pure import mean
            from pmc_unlearn.rewards import rougeL_recall

            brecs = [{"attack": "baseline", "index": it.index, "question": it.question, "answer": it.answer,
                      "generation": base[it.index].text, "n_tokens": base[it.index].n_tokens,
                      "hit_limit": base[it.index].hit_limit,
                      "rougeL_recall": rougeL_recall(it.answer, base[it.index].text)} for it in ctx.forget_items]
            doc["baseline"] = {"what": "greedy answers of the unattacked model to the attacked forget questions",
                               "forget_rougeL_recall": mean([r["rougeL_recall"] for r in brecs]),
                               "n_examples": len(brecs),
                               "hit_limit_frac": mean([float(r["hit_limit"]) for r in brecs])}
            new += brecs
        kept = [r for r in records["old"] if r.get("attack") not in drop]
        _write_records(rec_path, kept, new)
        records["old"] = kept + new
        doc["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _write_json(attacks_file, doc)
        h = res.headline
        return {"note": f"{h['metric']} = {_fmt(h['value'])} ({h['reference_name']}: {_fmt(h['reference'])})"}

    # one pipeline stage per attack; the key is its settings, a section already in attacks.json is cached
    stages = [Stage(n, "attack", None, digest(json_safe(dataclasses.asdict(objs[n]))), lambda resume, n=n: run_one(n),
                    est_s=1.0) for n in names]
    run_stages(stages, AttackSections(doc, overwrite), label="attacks", say=lambda line: log.info("%s", line))
    return json_safe(doc)


class AttackSections:
    """The attack suite's stage store: the sections of attacks.json (none with `overwrite`)."""

    def __init__(self, doc: dict, overwrite: bool):
        self.doc = doc
        self.overwrite = overwrite

    def read(self, st: Stage) -> dict[str, Any]:
        sec = None if self.overwrite else self.doc["attacks"].get(st.name)
        return {} if sec is None else {"key": digest(sec.get("settings")), "status": "done", "time_s": sec.get("time_s")}

    def begin(self, st: Stage, resume: bool, rec: dict[str, Any]) -> None:
        pass  # (run_one writes the section and the records when the attack is done)

    def end(self, st: Stage, rec: dict[str, Any]) -> None:
        pass


def _read_or_empty(out: Path) -> dict:
    """With --overwrite, a broken or foreign attacks.json is started again rather than refused."""
    try:
        return read_attacks(out / ATTACKS_FILE)
    except UserError:
        return {}


def _fmt(v) -> str:
    return "null" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _diff(a: Mapping, b: Mapping) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in keys[:3]) or "unknown difference"
