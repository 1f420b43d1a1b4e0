"""`pmc-unlearn demo`: the whole unlearning story on a small model, as cached, resumable stages.

The pipeline (one folder per stage under the demo folder, each with a `stage.json`):

    data/                 the TOFU subset: target.jsonl (retain + forget authors), retain.jsonl
    runs/target           fine-tune the base model on retain + forget authors   (the model to unlearn)
    runs/retain           fine-tune the base model on the retain authors only   (the gold standard)
    eval/retain           evaluate the retain model (its forget truth ratios are forget quality's reference)
    eval/target, eval/base
    runs/pmc  -> eval/pmc   unlearn the forget authors from the target with PMC
    runs/npo  -> eval/npo   ... and with the baselines, when registered in `methods.METHODS`
    runs/gd   -> eval/gd
    attacks/<model>       the attack suite (`pmc_unlearn.attacks.run_attacks`), when importable
    report.html, report.md

Caching: every stage has a key, a hash of its own resolved settings and of the keys of the
stages it reads (a fine-tune's key covers its config and the bytes of its data; an evaluation's
covers the model stage's key, the evaluation settings and the retain model's evaluation key). A
stage whose `stage.json` holds the same key and status "done" is skipped; a different key
removes what the stage wrote (`STAGE_OUTPUTS`) and redoes it, and so every stage downstream of it
(their keys change too); a stage folder holding anything else stops the demo before any stage
runs. The demo writes only into a folder it created or found empty (`DEMO_MARKER`). An interrupted stage (same key, status "running") resumes: training from its last
checkpoint (`trainer.train(..., resume=True)`), evaluation from its records.jsonl.

Evaluation ("utility" on a subset). TOFU's utility splits assume a model fine-tuned on all 200
authors; a model fine-tuned on a few authors knows nothing of `tofu:retain_perturbed` in general.
The demo therefore takes its retain authors from the first authors of TOFU, whose rows *are*
`tofu:retain_perturbed`'s (TOFU authors 0-19, with their paraphrased and perturbed answers), and
evaluates the retain split only on those rows: questions the target model learned beside the
forget authors. Utility then asks "did unlearning keep the facts it should keep?", with both
metric families intact (truth ratios need the perturbed answers). Real authors and world facts
measure general knowledge as in TOFU. The forget split is TOFU's own (`forget01_perturbed`, its
paraphrases and perturbed answers), and the holdout split for membership inference too.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from pmc_unlearn.errors import UserError
from pmc_unlearn.precision import default_device, resolve_bf16, resolve_dtype

log = logging.getLogger(__name__)

DEMO_VERSION = 1  # bump when a stage's meaning changes: every cached stage is redone
PROFILES = ("quick", "default", "muse-quick")  # shown in --help; "test"/"muse-test" (tiny-random) are for the tests
PROFILE_KEYS = {"description", "model", "prompt", "authors", "finetune", "unlearn", "evaluate", "attacks", "report",
                "benchmark", "muse"}
PROMPT_KEYS = {"use_chat_template", "system_prompt"}
EVAL_KEYS = {"max_new_tokens", "batch_size", "forget", "retain", "real_authors", "world_facts", "holdout", "dtype", "base",
             "convention"}
EVAL_DTYPES = ("auto", "float32", "bfloat16")
EVAL_CONVENTIONS = ("open-unlearning", "pmc-unlearn")  # evaluation.scores.CONVENTIONS (not imported: no torch here)
BASELINES = ("npo", "gd")
STAGE_FILE = "stage.json"
DEMO_FILE = "demo.json"
DEMO_MARKER = ".pmc-unlearn-demo"  # written into a folder the demo created or found empty: the demo owns it
# What each kind of stage writes in its folder (top-level names; subfolders listed here are the
# stage's own). A stage is redone only by removing these: any other file there is the user's.
STAGE_OUTPUTS = {
    "finetune": {"config.yaml", "manifest.json", "log.jsonl", "samples.jsonl", "checkpoints", "model"},
    "unlearn": {"config.yaml", "manifest.json", "log.jsonl", "samples.jsonl", "checkpoints", "model"},
    "eval": {"records.jsonl", "summary.json", "TOFU_EVAL.json", "TOFU_SUMMARY.json"},
    "attacks": {"attacks.json", "attacks_records.jsonl", "relearning"},
}
AUTHOR_SIZE = 20


# ----------------------------------------------------------------------------- profiles

def profile_path(name: str) -> Path:
    """A profile name (quick, default, test) or a YAML file."""
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise UserError(f"--profile {name}: file not found")
        return p
    f = Path(str(resources.files("pmc_unlearn") / "configs" / f"demo-{name}.yaml"))
    if not f.exists():
        raise UserError(f"--profile {name}: unknown profile; choose one of {', '.join(PROFILES)} or pass a YAML file")
    return f


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"override {dotted}: '{k}' is not a section")
        cur = nxt
    cur[keys[-1]] = value


def load_profile(name: str = "default", overrides: list[str] | None = None) -> dict[str, Any]:
    """The profile as a dict, with `a.b.c=value` overrides applied (values parsed as YAML)."""
    path = profile_path(name)
    try:
        prof = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--profile {name}: not valid YAML ({e})") from e
    if not isinstance(prof, dict):
        raise UserError(f"--profile {name}: expected a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override '{item}': write it as section.key=value (e.g. unlearn.pmc.train.epochs=6)")
        k, v = item.split("=", 1)
        try:
            val = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise UserError(f"override '{item}': not a valid value") from e
        if k.split(".")[0] not in PROFILE_KEYS:
            raise UserError(f"override '{item}': unknown profile section '{k.split('.')[0]}'; "
                            f"known: {', '.join(sorted(PROFILE_KEYS))}")
        _set_dotted(prof, k.strip(), val)
    prof["profile"] = path.stem.removeprefix("demo-")
    validate_profile(prof)
    return prof


def validate_profile(p: dict[str, Any]) -> None:
    unknown = set(p) - PROFILE_KEYS - {"profile"}
    if unknown:
        raise UserError(f"demo profile: unknown key '{sorted(unknown)[0]}'; known: {', '.join(sorted(PROFILE_KEYS))}")
    bench = p.get("benchmark", "tofu")
    if bench == "muse-news":  # the MUSE-News demo (demo_muse.py)
        from pmc_unlearn.demo_muse import validate_muse_profile

        return validate_muse_profile(p)
    if bench != "tofu":
        raise UserError(f"benchmark={bench!r}: choose tofu (the default) or muse-news")
    for sec in ("authors", "finetune", "unlearn", "evaluate"):
        if not isinstance(p.get(sec), dict):
            raise UserError(f"demo profile: section '{sec}' is missing or not a mapping")
    nf = p["authors"].get("forget")
    if nf is not None and (not isinstance(nf, int) or nf < 1):
        raise UserError(f"authors.forget={nf!r}: the number of forget-split authors to use (>= 1), or leave it out for all")
    rows = p["authors"].get("rows", AUTHOR_SIZE)
    if not isinstance(rows, int) or not 1 <= rows <= AUTHOR_SIZE:
        raise UserError(f"authors.rows={rows!r}: questions per author, 1 to {AUTHOR_SIZE} (each TOFU author has {AUTHOR_SIZE})")
    pr = p.get("prompt") or {}
    if not isinstance(pr, dict) or set(pr) - PROMPT_KEYS:
        raise UserError(f"demo profile: prompt takes {', '.join(sorted(PROMPT_KEYS))} "
                        f"(got {sorted(pr) if isinstance(pr, dict) else pr!r})")
    if "system_prompt" in pr and not (pr["system_prompt"] is None or isinstance(pr["system_prompt"], str)):
        raise UserError(f"prompt.system_prompt={pr['system_prompt']!r}: a string, '' for an empty system turn, "
                        "or null for the chat template's default")
    n = p["authors"].get("retain")
    if not isinstance(n, int) or not 1 <= n <= 20:
        raise UserError(f"authors.retain={n!r}: give the number of retain authors, 1 to 20 (TOFU authors 0..19 "
                        "are the ones tofu:retain_perturbed evaluates)")
    if p["authors"].get("forget_split") not in ("forget01", "forget05", "forget10"):
        raise UserError(f"authors.forget_split={p['authors'].get('forget_split')!r}: choose forget01, forget05 or forget10")
    if "pmc" not in p["unlearn"]:
        raise UserError("demo profile: unlearn.pmc is missing (the demo is about PMC)")
    bad = set(p["evaluate"]) - EVAL_KEYS
    if bad:
        raise UserError(f"evaluate.{sorted(bad)[0]}: unknown key; known: {', '.join(sorted(EVAL_KEYS))}")
    dt = p["evaluate"].get("dtype", "auto")
    if dt not in EVAL_DTYPES:
        raise UserError(f"evaluate.dtype={dt!r}: choose one of {', '.join(EVAL_DTYPES)}")
    if not isinstance(p["evaluate"].get("base", True), bool):
        raise UserError(f"evaluate.base={p['evaluate']['base']!r}: true (evaluate the base model too) or false")
    conv = p["evaluate"].get("convention", EVAL_CONVENTIONS[0])
    if conv not in EVAL_CONVENTIONS:
        raise UserError(f"evaluate.convention={conv!r}: choose one of {', '.join(EVAL_CONVENTIONS)}")
    for k in EVAL_KEYS - {"dtype", "base", "convention"}:
        v = p["evaluate"].get(k)
        if not isinstance(v, int) or v < 1:
            raise UserError(f"evaluate.{k}={v!r}: must be a positive integer")


# ----------------------------------------------------------------------------- data

@dataclass
class DemoData:
    """The TOFU subset of a demo: files written under data/ and the evaluation items."""

    target_file: Path
    retain_file: Path
    forget_file: Path  # the forget rows (question, answer): PMC reads the questions, the baselines the answers too
    retain_authors: list[int]
    forget_authors: list[int]
    retain_eval_index: list[int]  # rows of tofu:retain_perturbed that belong to the retain authors
    forget_eval_index: list[int]  # rows of tofu:<forget split>_perturbed that are the forget rows
    digest: str  # hash of the files' bytes
    n_forget: int  # forget questions


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def prepare_data(profile: dict[str, Any], root: Path) -> DemoData:
    """Write data/target.jsonl and data/retain.jsonl (question, answer, author) for the profile."""
    from pmc_unlearn.data import load_rows

    full = load_rows("tofu:full")
    fsplit = profile["authors"]["forget_split"]
    frows = load_rows(f"tofu:{fsplit}")
    n_authors = profile["authors"].get("forget")
    if n_authors is not None:  # only the first N authors of the forget split (20 rows each, in order)
        frows = frows[: n_authors * AUTHOR_SIZE]
    rows = profile["authors"].get("rows", AUTHOR_SIZE)  # the first `rows` questions of every author
    frows = [r for k, r in enumerate(frows) if k % AUTHOR_SIZE < rows]
    forget_q = {r["question"] for r in frows}
    forget_idx = [i for i, r in enumerate(full) if r["question"] in forget_q]
    forget_authors = sorted({i // AUTHOR_SIZE for i in forget_idx})
    retain_authors = list(range(profile["authors"]["retain"]))
    clash = set(retain_authors) & set(forget_authors)
    if clash:
        raise UserError(f"authors.retain={len(retain_authors)}: overlaps the {fsplit} authors {sorted(clash)}; use fewer")
    retain_idx = [a * AUTHOR_SIZE + j for a in retain_authors for j in range(rows)]

    def row(i: int) -> dict:
        return {"question": full[i]["question"], "answer": full[i]["answer"], "author": i // AUTHOR_SIZE, "tofu_full_row": i}

    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    target = [row(i) for i in sorted(retain_idx + forget_idx)]
    retain = [row(i) for i in retain_idx]
    _write_jsonl(d / "target.jsonl", target)
    _write_jsonl(d / "retain.jsonl", retain)
    forget = [row(i) for i in forget_idx]
    _write_jsonl(d / "forget.jsonl", forget)
    fp_rows = load_rows(f"tofu:{fsplit}_perturbed")
    fpos = {r["question"]: k for k, r in enumerate(fp_rows)}
    missing = [r["question"] for r in forget if r["question"] not in fpos]
    if missing:
        raise UserError(f"tofu:{fsplit}_perturbed lacks {len(missing)} forget question(s), e.g. {missing[0]!r}")
    forget_eval_idx = [fpos[r["question"]] for r in forget]
    author_of = {r["question"]: r["author"] for r in retain}
    rp = load_rows("tofu:retain_perturbed")
    by_author: dict[int, list[int]] = {}
    for i, r in enumerate(rp):
        if r["question"] in author_of:
            by_author.setdefault(author_of[r["question"]], []).append(i)
    # round-robin over the retain authors, so a cut (evaluate.retain) covers all of them
    cols = [by_author[a] for a in sorted(by_author)]
    eval_idx = [c[k] for k in range(max(map(len, cols), default=0)) for c in cols if k < len(c)]
    h = hashlib.sha256()
    for f in ("target.jsonl", "retain.jsonl", "forget.jsonl"):
        h.update((d / f).read_bytes())
    return DemoData(d / "target.jsonl", d / "retain.jsonl", d / "forget.jsonl", retain_authors, forget_authors,
                    eval_idx, forget_eval_idx, h.hexdigest()[:16], len(forget))


# ----------------------------------------------------------------------------- evaluation on the subset

def demo_suite(forget_split: str, retain_index: list[int], sizes: dict[str, int], forget_index: list[int] | None = None):
    """TOFU's evaluation splits, cut to the profile's sizes; the retain split keeps only the retain authors' rows,
    the forget split (and its paraphrases) only the forget rows (`forget_index`, all when None).

    Items keep their index in the TOFU file they come from (and the split's source string), so
    records are shared with full evaluations through the evaluation cache.
    """
    from pmc_unlearn.evaluation import metrics as M
    from pmc_unlearn.evaluation.suite import tofu_suite

    specs = tofu_suite(forget_split, "perturbed", None)
    limit = {M.FORGET: sizes["forget"], M.FORGET_PARA: sizes["forget"], M.RETAIN: sizes["retain"],
             M.REAL_AUTHORS: sizes["real_authors"], M.WORLD_FACTS: sizes["world_facts"], M.HOLDOUT: sizes["holdout"]}
    for s in specs:
        if s.name == M.RETAIN:  # the retain authors' rows, in the order given (round-robin over authors)
            by_index = {it.index: it for it in s.items}
            items = [by_index[i] for i in retain_index if i in by_index]
        elif s.name in (M.FORGET, M.FORGET_PARA) and forget_index is not None:
            by_index = {it.index: it for it in s.items}
            items = [by_index[i] for i in forget_index if i in by_index]
        else:
            items = s.items
        s.items = items[: limit.get(s.name, len(items))]
    return specs


def evaluate_subset(model: str, specs, out: Path, *, reference: Path | str | None, self_reference: bool = False,
                    max_new_tokens: int = 48, batch_size: int = 16, dtype: str = "auto", progress: bool = True,
                    notes: dict[str, Any] | None = None, default_fmt=None,
                    convention: str = "open-unlearning") -> dict[str, Any]:
    """Collect records for `specs` (resuming from out/records.jsonl), aggregate, write summary.json.

    `reference` is the retain model's records (forget quality, PrivLeak); `self_reference` uses
    this model's own records (the retain model itself: forget quality 1 by definition). `dtype`
    is the weights' type during evaluation (auto: bfloat16 where the CPU runs it natively, about 2x
    faster there, as open-unlearning evaluates; float32 elsewhere; the records are cached per
    weights, so the two never mix).
    `default_fmt` is the prompt format of a model that saved none (the base model); the
    evaluation's default when None. `convention`: the metric definitions (docs/metrics.md).
    """
    from pmc_unlearn.evaluation import metrics as M
    from pmc_unlearn.evaluation.api import _versions
    from pmc_unlearn.evaluation.records import collect_records, write_records
    from pmc_unlearn.evaluation.reference import read_reference
    from pmc_unlearn.evaluation.suite import GenSettings, prompt_format_for
    from pmc_unlearn.models import fingerprint, load_model

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    precision = resolve_dtype(dtype, "cpu", "evaluate.dtype")
    lm = load_model(model, dtype=precision.dtype)
    lm.model.eval()
    fp = fingerprint(lm.model)
    fmt = prompt_format_for(model, default=default_fmt)  # the format it was trained with, if it saved one
    t_load = time.time() - t0
    t1 = time.time()
    records = collect_records(lm.model, lm.tokenizer, specs, fmt, GenSettings(max_new_tokens), batch_size,
                                records_path=out / "records.jsonl", model_fingerprint=fp, progress=progress)
    t_collect = time.time() - t1
    records = M.with_scores(records, convention)
    write_records(records, out / "records.jsonl")
    ref = (read_reference(out / "records.jsonl", convention) if self_reference
           else (read_reference(reference, convention) if reference else None))
    summary = M.summarize(records, ref, require_forget_quality=False, convention=convention)
    from pmc_unlearn.evaluation.intervals import tofu_intervals

    summary.update(tofu_intervals(records, summary, ref))
    summary.update({
        "model_name": model, "model_fingerprint": fp, "forget_split": specs[0].source.removeprefix("tofu:").removesuffix("_perturbed"),
        **{f"n_examples_{s.name}": len(s.items) for s in specs},
        "max_new_tokens": max_new_tokens, "decoding": "greedy", "batch_size": batch_size,
        "dtype": precision.dtype, "precision": precision.as_dict(),
        "prompt_chat_template": fmt.use_chat_template, "prompt_system": fmt.system_prompt,
        "time_load_s": round(t_load, 3), "time_collect_s": round(t_collect, 3),
        **(notes or {}), **_versions(),
    })
    from pmc_unlearn.evaluation.export import json_clean

    summary = json_clean(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------- stages

def check_output(root: Path) -> None:
    """Refuse a folder the demo does not own: a file, an unwritable place, or a non-empty folder without its marker."""
    from pmc_unlearn import rundir

    rundir.check_writable(root)
    if rundir.folder_entries(root) and not owns(root):
        raise UserError(f"--output {root}: folder is not empty and holds no demo ({DEMO_MARKER}); choose a new folder "
                        "(the demo writes only into folders it created)")


def owns(root: Path) -> bool:
    """The demo created this folder (its marker), or an earlier version did (demo.json)."""
    return (root / DEMO_MARKER).is_file() or (root / DEMO_FILE).is_file()


def claim(root: Path) -> None:
    """Create the demo folder and mark it as the demo's (check_output first)."""
    from pmc_unlearn import rundir

    rundir.make_folder(root)
    if not (root / DEMO_MARKER).exists():
        (root / DEMO_MARKER).write_text("pmc-unlearn demo folder: stages here are rewritten by `pmc-unlearn demo`\n")


def foreign_files(d: Path, kind: str) -> list[str]:
    """Entries of a stage folder that the stage did not write (its outputs, stage.json, temporary files, the lock)."""
    from pmc_unlearn.rundir import folder_entries

    mine = STAGE_OUTPUTS.get(kind, set()) | {STAGE_FILE}
    return [n for n in folder_entries(d) if n not in mine and not n.endswith(".tmp") and not n.startswith(".tmp-")]


def clear_stage(d: Path, kind: str) -> None:
    """Remove what a stage wrote in `d` (to redo it); refuse when `d` holds anything else."""
    other = foreign_files(d, kind)
    if other:
        raise UserError(f"demo: {d / other[0]} was not written by the demo, and the stage in {d} must be redone; "
                        "move it out of the demo folder and run again")
    if not d.is_dir():
        return
    for p in d.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stage:
    name: str  # e.g. "unlearn/pmc"
    kind: str  # finetune | unlearn | eval | attacks
    dir: Path
    key: str
    run: Callable[[bool], dict[str, Any]]  # resume -> info stored in stage.json
    est_s: float
    needs: list[str] = field(default_factory=list)  # stages that must be done first
    optional: bool = False  # a failure is noted, the demo goes on
    skip_reason: str | None = None  # set when the stage cannot run in this build


def read_stage(d: Path) -> dict[str, Any]:
    try:
        return json.loads((d / STAGE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def _fmt_s(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


# Rough seconds per unit of work on a 2-core CPU for the stage-line ETA, per precision, with the
# 1024^3 matmul rate (GFLOP/s) of the machine they were measured on. At the start the estimates are
# scaled by that rate over this machine's (`matmul_gflops`); after each stage, by how the finished
# stages compared with their estimates.
_RATES = {
    # Zen 4 (AVX-512 bf16), bf16 autocast training and bf16 evaluation
    "bf16": {"train_example": 0.35, "sample_token": 0.0035, "gen_token": 0.004, "nll_seq": 0.07, "fixed": 6.0},
    # AVX2 without native bf16, fp32 training and evaluation (fitted to the quick and default runs in
    # docs/demo.md: an AVX-512 Xeon restricted to AVX2, 143 GFLOP/s fp32)
    "fp32": {"train_example": 0.72, "sample_token": 0.008, "gen_token": 0.005, "nll_seq": 0.09, "fixed": 8.0},
}
_REF_GFLOPS = {"bf16": 410.0, "fp32": 143.0}


def matmul_gflops(bf16: bool, size: int = 1024, reps: int = 3) -> float:
    """This machine's rate for one [size, size] matmul in bf16 or fp32 (best of `reps`), GFLOP/s."""
    import torch

    dt = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(size, size).to(dt), torch.randn(size, size).to(dt)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / max(best, 1e-9) / 1e9


def speed_scale(bf16: bool) -> float:
    """How much longer than the rate table's machine this one should take (clipped to 0.25-8)."""
    kind = "bf16" if bf16 else "fp32"
    return min(8.0, max(0.25, _REF_GFLOPS[kind] / matmul_gflops(bf16)))


class Demo:
    """Builds the stage list for a profile and runs it (see the module docstring)."""

    def __init__(self, profile: dict[str, Any], root: Path, progress: bool = True, stream=None):
        self.p = profile
        self.root = Path(root)
        self.progress = progress
        self.stream = stream or sys.stderr
        self.stages: list[Stage] = []
        self.notes: list[str] = []

    # ----- building -----------------------------------------------------------------------------
    def _cfg(self, method: str, sections: dict, model: str, forget: str, retain: str | None):
        from pmc_unlearn.commands.finetune import FINETUNE_DEFAULTS
        from pmc_unlearn.config import load_config

        extra = _deep_merge(sections, {"model": {"name": model}, "data": {"forget": forget, **({"retain": retain} if retain else {})}})
        return load_config(None, None, method=method, extra=extra,
                           defaults=FINETUNE_DEFAULTS if method == "sft" else None)

    def _prompt_sections(self) -> dict:
        """The profile's prompt settings as config sections (data.system_prompt, data.use_chat_template)."""
        return {"data": dict(self.p.get("prompt") or {})}

    def _prompt_format(self):
        """The prompt format of models without a saved one (the base model): the profile's."""
        from pmc_unlearn.evaluation.suite import EVAL_FORMAT
        from pmc_unlearn.formatting import PromptFormat

        pr = self.p.get("prompt") or {}
        return PromptFormat(pr.get("use_chat_template", True), pr.get("system_prompt"), EVAL_FORMAT.max_length)

    def _normal(self, cfg) -> dict:
        """The resolved config with paths inside the demo folder made relative (keys do not depend on where it lives)."""
        d = cfg.to_dict()
        # the precision that will run here, not the setting: `auto` differs between machines
        d["train"]["bf16"] = resolve_bf16(cfg.train.bf16, default_device()).bf16
        root = str(self.root.resolve())
        for sec in ("model", "data"):
            for k, v in d[sec].items():
                if isinstance(v, str) and v.startswith(root):
                    d[sec][k] = os.path.relpath(v, root)
        return d

    def _check_configs(self) -> None:
        """Resolve the fine-tuning and PMC configs (placeholder data paths): bad settings fail before any output."""
        from pmc_unlearn.methods import METHODS

        data = str(self.root / "data" / "x.jsonl")
        self._cfg("sft", _deep_merge(self._prompt_sections(), self.p["finetune"]), self.p["model"], data, None)
        for m, sections in self.p["unlearn"].items():
            if m == "pmc" and m in METHODS:  # (a baseline's bad settings only skip it, with a note)
                self._cfg(m, _deep_merge(self._prompt_sections(), dict(sections or {})), data, data, data)

    def _unlearn_wanted(self, m: str, sections, d: Path, stages: list[Stage]) -> bool:
        """Whether method `m` gets an unlearning stage: not when the profile turns it off (a note) or
        this build lacks it (a skipped stage, so a later build with the method runs it)."""
        from pmc_unlearn.methods import METHODS

        if sections is False or (sections is None and m != "pmc"):
            self.notes.append(f"{m}: turned off in the profile (unlearn.{m}: null)")
            return False
        if m not in METHODS:
            note = (f"{m}: not available in this build (pmc_unlearn.methods.METHODS has "
                    f"{', '.join(sorted(METHODS))}); skipped")
            stages.append(Stage(f"unlearn/{m}", "unlearn", d, "", lambda resume: {}, 0.0, optional=True, skip_reason=note))
            return False
        return True

    def build(self) -> list[Stage]:
        check_output(self.root)
        self._check_configs()  # every stage's config, before anything is written
        claim(self.root)
        p, root = self.p, self.root.resolve()
        data = prepare_data(p, root)
        self.data = data
        base = p["model"]
        ev = p["evaluate"]
        specs = demo_suite(p["authors"]["forget_split"], data.retain_eval_index,
                           {**ev, "forget": min(ev["forget"], data.n_forget)}, data.forget_eval_index)
        self.specs = specs
        suite_key = digest([(s.name, s.source, [it.index for it in s.items]) for s in specs])
        n_target = sum(1 for _ in data.target_file.open())
        n_retain = sum(1 for _ in data.retain_file.open())
        stages: list[Stage] = []

        dev = default_device()
        self.eval_dtype = resolve_dtype(ev.get("dtype", "auto"), "cpu", "evaluate.dtype").dtype
        speeds: dict[bool, float] = {}

        def rate(bf16: bool) -> tuple[dict[str, float], float]:
            if bf16 not in speeds:
                speeds[bf16] = speed_scale(bf16) if dev == "cpu" else 0.25
            return _RATES["bf16" if bf16 else "fp32"], speeds[bf16]

        def train_est(cfg, n_rows: int, sampling: bool = False) -> float:
            t = cfg.train
            r, k = rate(resolve_bf16(t.bf16, dev).bf16)
            n = min(n_rows, cfg.data.max_forget or n_rows)
            ex = n * t.epochs if t.max_steps < 0 else min(n * t.epochs, t.max_steps * t.batch_size * t.grad_accum)
            est = r["fixed"] + ex * r["train_example"] * (2 if cfg.method != "sft" else 1)
            if sampling:
                m = cfg.method_cfg
                est += ex * m.n_samples * m.max_new_tokens * r["sample_token"] + n * m.max_new_tokens * r["sample_token"]
            return est * k

        def eval_est() -> float:
            r, k = rate(self.eval_dtype == "bfloat16")
            n_gen = sum(len(s.items) for s in specs if s.generate)
            n_nll = sum(len(s.items) * (1 + (1 if s.items and s.items[0].para_answer else 0) +
                                        len(s.items[0].pert_answers or []) if s.items else 0) for s in specs if s.nll)
            return (r["fixed"] + n_gen * ev["max_new_tokens"] * r["gen_token"] + n_nll * r["nll_seq"]) * k

        # fine-tuning: target and retain model
        ft = p["finetune"]
        models: dict[str, tuple[str, str | None]] = {"base": (base, None)}  # name -> (model path, producing stage)
        for name, f, n in (("target", data.target_file, n_target), ("retain", data.retain_file, n_retain)):
            cfg = self._cfg("sft", _deep_merge(self._prompt_sections(), ft), base, str(f), None)
            key = digest({"v": DEMO_VERSION, "cfg": self._normal(cfg), "data": data.digest})
            d = root / "runs" / name
            stages.append(Stage(f"finetune/{name}", "finetune", d, key, self._train_runner(cfg, d), train_est(cfg, n)))
            models[name] = (str(d / "model"), f"finetune/{name}")

        # unlearning methods (PMC first; baselines when registered)
        keys = {s.name: s.key for s in stages}
        unlearned: list[str] = []
        for m, sections in p["unlearn"].items():
            d = root / "runs" / m
            name = f"unlearn/{m}"
            if not self._unlearn_wanted(m, sections, d, stages):
                continue
            sections = _deep_merge(self._prompt_sections(), dict(sections or {}))
            try:
                cfg = self._cfg(m, sections, models["target"][0], str(data.forget_file), str(data.retain_file))
            except UserError as e:
                if m == "pmc":
                    raise
                stages.append(Stage(name, "unlearn", d, "", lambda resume: {}, 0.0, optional=True,
                                    skip_reason=f"{m}: the profile's settings do not fit this method ({e}); skipped"))
                continue
            key = digest({"v": DEMO_VERSION, "cfg": self._normal(cfg), "target": keys["finetune/target"], "data": data.digest})
            stages.append(Stage(name, "unlearn", d, key, self._train_runner(cfg, d),
                                train_est(cfg, data.n_forget, sampling=(m == "pmc")),
                                needs=["finetune/target"], optional=(m != "pmc")))
            models[m] = (str(d / "model"), name)
            unlearned.append(m)
            keys[name] = key

        # evaluation: the retain model first (its records are forget quality's reference)
        from pmc_unlearn.evaluation.records import SCHEMA_VERSION

        eval_common = {"v": DEMO_VERSION, "records_schema": SCHEMA_VERSION, "suite": suite_key,
                       "max_new_tokens": ev["max_new_tokens"]}
        # The dtype that will run here, not the setting: `auto` differs between machines.
        if self.eval_dtype != "float32":  # (float32 keys stay as they were before the option)
            eval_common["dtype"] = self.eval_dtype
        eval_common["convention"] = ev.get("convention", EVAL_CONVENTIONS[0])
        if p.get("prompt"):  # the base model is evaluated with the profile's prompt format
            eval_common["prompt"] = p["prompt"]
        # the base model's row is optional (evaluate.base): the report's target check then compares
        # the target with the retain model, which never saw the forget authors either
        order = ["retain", "target"] + (["base"] if ev.get("base", True) else []) + unlearned
        eval_keys: dict[str, str] = {}
        by_name = {s.name: s for s in stages}
        for mname in order:
            path, producer = models[mname]
            upstream = keys.get(producer) if producer else f"alias:{path}"
            ref = None if mname == "retain" else eval_keys["retain"]
            key = digest({**eval_common, "model": upstream, "reference": ref})
            d = root / "eval" / mname
            needs = ([producer] if producer else []) + ([] if mname == "retain" else ["eval/retain"])
            opt_ = bool(producer and by_name[producer].optional)
            stages.append(Stage(f"eval/{mname}", "eval", d, key,
                                self._eval_runner(path, d, None if mname == "retain" else root / "eval" / "retain" / "records.jsonl",
                                                  self_reference=(mname == "retain"), role=mname),
                                eval_est(), needs=needs, optional=opt_))
            eval_keys[mname] = key
            keys[f"eval/{mname}"] = key

        # attacks on the target and the unlearned models
        at = p.get("attacks") or {}
        if at.get("enabled", True):
            wanted = at.get("models") or ["target"] + unlearned
            for mname in [x for x in ["target"] + unlearned if x in wanted]:
                path, producer = models[mname]
                akey = {"v": DEMO_VERSION, "model": keys[producer], "attacks": at}
                if self.eval_dtype != "float32":
                    akey["dtype"] = self.eval_dtype
                key = digest(akey)
                d = root / "attacks" / mname
                stages.append(Stage(f"attacks/{mname}", "attacks", d, key, self._attack_runner(path, d, mname),
                                    rate(self.eval_dtype == "bfloat16")[0]["fixed"] + len(at.get("names") or [1] * 6) * eval_est() / 4
                                    * at.get("max_examples", 20) / max(1, ev["forget"]),
                                    needs=[producer], optional=True))
        else:
            self.notes.append("attacks: disabled by the profile (attacks.enabled: false)")
        self.stages = stages
        return stages

    # ----- runners --------------------------------------------------------------------------------
    def _train_runner(self, cfg, d: Path) -> Callable[[bool], dict]:
        def run(resume: bool) -> dict:
            from pmc_unlearn.trainer import train

            man = train(cfg, d, resume=resume, command=["pmc-unlearn", "demo", f"--profile={self.p['profile']}"])
            # The final model is saved: checkpoints only served resuming (1-2 GB each for a 135M model).
            shutil.rmtree(d / "checkpoints", ignore_errors=True)
            return {"wall_time_s": man.get("wall_time_s"), "steps": man.get("steps"), "phases_s": man.get("phases_s")}

        return run

    def _eval_runner(self, model: str, d: Path, reference: Path | None, self_reference: bool, role: str):
        def run(resume: bool) -> dict:
            ev = self.p["evaluate"]
            s = evaluate_subset(model, self.specs, d, reference=reference, self_reference=self_reference,
                                max_new_tokens=ev["max_new_tokens"], batch_size=ev["batch_size"],
                                dtype=self.eval_dtype, progress=self.progress,
                                default_fmt=self._prompt_format(),
                                convention=ev.get("convention", EVAL_CONVENTIONS[0]),
                                notes={"demo_role": role, "retain_split_note": (
                                    f"tofu:retain_perturbed rows of the retain author(s) {self.data.retain_authors} "
                                    "(TOFU author indices), facts the target learned beside the forget authors")})
            return {k: s.get(k) for k in ("unlearn_quality", "utility", "forget_quality", "model_utility",
                                          "forget_rougeL_recall", "retain_rougeL_recall", "time_collect_s")}

        return run

    def _attack_runner(self, model: str, d: Path, role: str):
        def run(resume: bool) -> dict:
            return run_attack_suite(model, d, self.p["authors"]["forget_split"], self.p.get("attacks") or {},
                                    self.p["evaluate"]["batch_size"], self.progress,
                                    dtype=self.eval_dtype)

        return run

    # ----- running --------------------------------------------------------------------------------
    def _data_info(self) -> dict[str, Any]:
        return {"retain_authors": self.data.retain_authors, "forget_authors": self.data.forget_authors,
                "target_rows": sum(1 for _ in self.data.target_file.open()),
                "retain_rows": sum(1 for _ in self.data.retain_file.open()),
                "retain_eval_rows": len([s for s in self.specs if s.name == "retain"][0].items)}

    def _line(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)

    def run(self) -> dict[str, Any]:
        from pmc_unlearn.rundir import OutputLock

        check_output(self.root)
        if not self.stages:
            self._check_configs()  # bad settings: an error before the folder exists
        claim(self.root)
        with OutputLock(self.root):  # (build() writes data/: under the lock too)
            return self._run()

    def _run(self) -> dict[str, Any]:
        t_start = time.time()
        if not self.stages:
            self.build()
        for st in self.stages:  # stages to redo must not hold the user's files: refuse before any work
            meta = read_stage(st.dir)
            if not st.skip_reason and not (meta.get("key") == st.key and meta.get("status") in
                                           ("done", "running", "failed", "interrupted")):
                other = foreign_files(st.dir, st.kind)
                if other:
                    raise UserError(f"demo: {st.dir / other[0]} was not written by the demo, and stage {st.name} must "
                                    "be redone there; move it out of the demo folder and run again")
        stages = self.stages
        status: dict[str, str] = {}
        ratio_num = ratio_den = 0.0  # measured vs estimated time of stages that ran here
        demo = {"profile": self.p["profile"], "profile_settings": {k: v for k, v in self.p.items() if k != "profile"},
                "demo_version": DEMO_VERSION, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "load_avg_start": list(os.getloadavg()), "stages": [], "notes": list(self.notes),
                "data": self._data_info()}
        from pmc_unlearn.rundir import hardware, versions

        demo["versions"], demo["hardware"] = versions(), hardware()

        def save() -> None:
            _write_json(self.root / DEMO_FILE, demo)

        n = len(stages)
        dev = default_device()
        todo = sum(s.est_s for s in stages if not s.skip_reason and read_stage(s.dir).get("key") != s.key)
        prec = resolve_bf16("auto", dev)
        demo["precision"] = {"device": dev, "auto_bf16": prec.bf16, "reason": prec.reason, "eval_dtype": self.eval_dtype}
        self._line(f"[demo] {n} stages, about {_fmt_s(todo)} of work to do on this machine "
                   f"({prec.reason}: {'bf16' if prec.bf16 else 'fp32'} where the profile says auto)")
        for i, st in enumerate(stages, 1):
            remaining = sum(s.est_s for s in stages[i - 1:] if status.get(s.name) is None)
            scale = ratio_num / ratio_den if ratio_den else 1.0
            elapsed = time.time() - t_start
            head = f"[demo {i}/{n}] {st.name}"
            entry: dict[str, Any] = {"name": st.name, "kind": st.kind, "dir": os.path.relpath(st.dir, self.root), "key": st.key}
            if st.skip_reason:
                status[st.name] = "skipped"
                self._line(f"{head}: skipped ({st.skip_reason})")
                demo["notes"].append(st.skip_reason)
                demo["stages"].append({**entry, "status": "skipped", "note": st.skip_reason})
                save()
                continue
            blocked = [x for x in st.needs if status.get(x) not in ("done", "cached")]
            if blocked:
                note = f"{st.name}: skipped because {', '.join(blocked)} did not finish"
                status[st.name] = "skipped"
                self._line(f"{head}: skipped (needs {', '.join(blocked)})")
                demo["stages"].append({**entry, "status": "skipped", "note": note})
                save()
                continue
            meta = read_stage(st.dir)
            if meta.get("key") == st.key and meta.get("status") == "done":
                status[st.name] = "cached"
                self._line(f"{head}: cached (key {st.key}, took {_fmt_s(meta.get('time_s', 0))} when run)")
                demo["stages"].append({**entry, "status": "cached", "time_s": meta.get("time_s"),
                                       "load_avg": meta.get("load_avg_end")})
                save()
                continue
            resume = meta.get("key") == st.key and meta.get("status") in ("running", "failed", "interrupted")
            if not resume:
                clear_stage(st.dir, st.kind)
            st.dir.mkdir(parents=True, exist_ok=True)
            prev = float(meta.get("time_s", 0.0)) if resume else 0.0
            self._line(f"{head}: {'resuming' if resume else 'running'} (est. {_fmt_s(st.est_s * scale)}; "
                       f"demo elapsed {_fmt_s(elapsed)}, ETA ~{_fmt_s(remaining * scale)})")
            rec = {"name": st.name, "key": st.key, "status": "running", "time_s": prev,
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_avg_start": list(os.getloadavg()),
                   "resumes": int(meta.get("resumes", 0)) + (1 if resume else 0)}
            _write_json(st.dir / STAGE_FILE, rec)
            t = time.time()
            try:
                info = st.run(resume)
                state = "done"
            except KeyboardInterrupt:
                rec.update(status="interrupted", time_s=round(prev + time.time() - t, 3))
                _write_json(st.dir / STAGE_FILE, rec)
                demo["stages"].append({**entry, "status": "interrupted"})
                save()
                raise
            except Exception as e:  # noqa: BLE001 - an optional stage's failure of any kind is noted, not fatal
                if not st.optional:
                    rec.update(status="failed", error=f"{type(e).__name__}: {e}", time_s=round(prev + time.time() - t, 3))
                    _write_json(st.dir / STAGE_FILE, rec)
                    demo["stages"].append({**entry, "status": "failed", "note": str(e)})
                    save()
                    raise
                info, state = {"error": f"{type(e).__name__}: {e}"}, "failed"
                log.warning("%s failed: %s", st.name, e)
            dt = time.time() - t
            rec.update(status=state, time_s=round(prev + dt, 3), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       load_avg_end=list(os.getloadavg()), info=info)
            if state == "done" and info.get("skipped"):
                rec["status"] = state = "skipped"  # e.g. no attack suite in this build: try again next time
            _write_json(st.dir / STAGE_FILE, rec)
            status[st.name] = state
            if state == "done" and not resume and dt > 0.2 * st.est_s:  # (a stage served from the eval cache says nothing)
                ratio_num += dt
                ratio_den += st.est_s
            note = info.get("note") or info.get("error")
            self._line(f"{head}: {state} in {_fmt_s(dt)} (load {os.getloadavg()[0]:.1f})" + (f"; {note}" if note else ""))
            if note and state != "done":
                demo["notes"].append(f"{st.name}: {note}")
            demo["stages"].append({**entry, "status": state, "time_s": rec["time_s"], "load_avg": rec["load_avg_end"],
                                   **({"note": note} if note else {})})
            save()

        # the report (always rebuilt: cheap); the demo's wall time is known before it is written
        demo["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        demo["wall_time_s"] = round(time.time() - t_start, 3)
        demo["load_avg_end"] = list(os.getloadavg())
        save()
        t = time.time()
        from pmc_unlearn.report import build_report

        out = build_report([self.root], self.root / "report.html", force=True)  # (the demo folder is ours)
        demo["report_s"] = round(time.time() - t, 3)
        save()
        self._line(f"[demo] done in {_fmt_s(demo['wall_time_s'])}: {out['html']} and {out['md']}")
        return demo


# ----------------------------------------------------------------------------- attacks (optional module)

def run_attack_suite(model: str, out: Path, forget_split: str, settings: dict[str, Any], batch_size: int,
                     progress: bool = True, dtype: str = "auto") -> dict[str, Any]:
    """Call `pmc_unlearn.attacks.run_attacks` when the build has it; a note (and no failure) otherwise.

    The call passes only the arguments its signature names (model, forget split, output folder,
    sizes), so the demo keeps working while the attack suite's interface settles.
    """
    try:
        from pmc_unlearn.attacks import run_attacks  # type: ignore[attr-defined]
    except ImportError as e:
        return {"skipped": True, "note": f"attack suite not available in this build ({e}); skipped"}
    sig = inspect.signature(run_attacks)
    offered = {
        "model": model, "model_name": model, "forget_split": forget_split,
        "output_dir": out, "output": out, "out": out, "out_dir": out,
        "max_examples": settings.get("max_examples"), "max_new_tokens": settings.get("max_new_tokens"),
        "batch_size": batch_size, "progress": progress, "attacks": settings.get("names"),
        "settings": settings.get("settings"), "dtype": dtype,
    }
    kwargs = {k: v for k, v in offered.items() if k in sig.parameters and v is not None}
    missing = [n for n, prm in sig.parameters.items()
               if prm.default is inspect.Parameter.empty and prm.kind in (prm.POSITIONAL_OR_KEYWORD, prm.KEYWORD_ONLY)
               and n not in kwargs]
    if missing:
        return {"skipped": True, "note": f"run_attacks needs arguments the demo does not know ({', '.join(missing)}); skipped"}
    result = run_attacks(**kwargs)
    if not (out / "attacks.json").exists() and isinstance(result, dict):
        _write_json(out / "attacks.json", result)
    return {"attacks_json": str(out / "attacks.json")}


# ----------------------------------------------------------------------------- entry point

def demo_class(prof: dict[str, Any]) -> type[Demo]:
    """Demo for TOFU profiles, demo_muse.MuseDemo for `benchmark: muse-news` ones."""
    if prof.get("benchmark") == "muse-news":
        from pmc_unlearn.demo_muse import MuseDemo

        return MuseDemo
    return Demo


def run_demo(profile: str = "default", output: str | Path = "demo_out", overrides: list[str] | None = None,
             progress: bool = True, stream=None) -> dict[str, Any]:
    prof = load_profile(profile, overrides)
    demo = demo_class(prof)(prof, Path(output), progress=progress, stream=stream)
    return demo.run()  # (builds the stages once it holds the folder's lock)


def plan(profile: str = "default", overrides: list[str] | None = None) -> dict[str, Any]:
    """What a demo would run (profile settings and stages); writes only the small data files."""
    import tempfile

    prof = load_profile(profile, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        d = demo_class(prof)(prof, Path(tmp))
        d.build()
        return {"profile": prof, "stages": [{"name": s.name, "key": s.key, "est_s": round(s.est_s),
                                             **({"skip": s.skip_reason} if s.skip_reason else {})} for s in d.stages]}


__all__ = ["Demo", "Stage", "demo_suite", "evaluate_subset", "load_profile", "plan", "prepare_data", "run_demo"]
