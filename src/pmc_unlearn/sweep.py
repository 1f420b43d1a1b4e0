"""Sweeps: many (unlearn, evaluate) points from one YAML file; resumable; Pareto plots at the end.

The sweep file (full example: configs/sweep-example.yaml, docs/methods.md):

    base:     sections model / data / train, as in an `unlearn --config` file; every point gets them
    grid:     {section.key: [values, ...]}  shared axes: every combination, applied to every method block
    methods:  {name: {set: {section.key: value}, grid: {section.key: [values]}}}  one block per method;
              a method's own section (npo.beta) may appear only in its block, so the config loader
              never sees npo.* on a pmc point. A block key replaces the shared axis of the same name.
    points:   [{method: name, section.key: value, ...}]  extra single points
    seeds:    [0, 1, 2]  every setting runs once per seed (train.seed); a method block or a single
              point may give its own `seeds`. points.jsonl keeps every seed's run (`group` names
              the setting, `seed` the seed); the plots draw each setting's mean over its seeds
              with 95% interval bars (plots.seed_means)
    eval:     settings of `evaluate` (forget_split, retain_records, max_examples, ...)

A point's config = built-in defaults < base < shared-grid combination < block `set` < block-grid
combination (or < the point's own keys). Every point is validated (config, data, model, eval
settings, retain records) before anything runs or is written; bad input is a UserError.

Each point is one `trainer.train` then one `evaluation.api.evaluate`, in DIR/points/<id>/ where
id = method + a hash of the point's resolved run config (so editing the sweep file keeps the
finished points that did not change). Finished points (point.json present, same eval settings)
are skipped; a point whose run crashed resumes from its last checkpoint; an interrupted
evaluation resumes from its records. Points run one after another in this process, or with
several GPUs one worker process per GPU, each taking every N-th point (`devices`).

Output: DIR/points.jsonl (one line per point of the sweep, in sweep order: id, label, method,
params, config, train facts, eval summary), DIR/pareto.png and DIR/pareto.svg (two panels:
unlearn quality vs utility, forget quality (log) vs model utility; see plots.py).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmc_unlearn import pipeline
from pmc_unlearn.config import RunConfig, load_config
from pmc_unlearn.errors import TrainingDiverged, UserError
from pmc_unlearn.provenance import write_json_atomic, write_jsonl_atomic
from pmc_unlearn.sections import build_section, load_yaml, opt, set_dotted

log = logging.getLogger(__name__)

TOP_KEYS = ("base", "grid", "methods", "points", "eval", "seeds")
BLOCK_KEYS = ("set", "grid", "seeds")
RUN_SECTIONS = ("model", "data", "train")
POINTS_FILE = "points.jsonl"
POINT_FILE = "point.json"
SWEEP_COPY = "sweep.yaml"
SWEEP_MARKER = ".pmc-unlearn-sweep"  # written into a folder the sweep created or found empty: the sweep owns it


@dataclass
class EvalSettings:
    forget_split: str = opt("", "TOFU forget split to evaluate on (forget01/05/10); empty: taken from each point's "
                                "data.forget when it is tofu:forgetXX")
    retain_records: str | None = opt(None, "the retain model's records.jsonl, its eval folder, or open-unlearning's "
                                           "TOFU_EVAL.json (for forget quality); null: forget quality is reported as null")
    max_examples: int = opt(0, "only the first N examples of each split (0: all); for smoke tests", min=0)
    max_new_tokens: int = opt(200, "greedy generation limit (200 in both references)", min=1)
    batch_size: int = opt(8, "examples per evaluation batch", min=1)
    retain_sample: str = opt("perturbed", "retain sample of the PMC utility U", choices=("perturbed", "rng400"))
    dtype: str = opt("auto", "weights dtype when loading the model for evaluation (auto: bfloat16 where the device "
                     "runs it natively, float32 elsewhere)", choices=("auto", "float32", "bfloat16"))
    convention: str = opt("open-unlearning", "metric definitions (docs/metrics.md): open-unlearning's code or pmc-unlearn's",
                          choices=("open-unlearning", "pmc-unlearn"))


@dataclass
class Point:
    id: str
    label: str
    method: str
    params: dict[str, Any]  # the keys this point sets on top of `base` (dotted)
    cfg: RunConfig
    forget_split: str
    group: str = ""  # the setting's label without the seed (several seeds: several points, one group)
    seed: int | None = None  # the seed from `seeds`, None when the sweep gives none


@dataclass
class Sweep:
    source: Path
    points: list[Point]
    eval: EvalSettings

    @property
    def eval_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.eval)


# ----- reading and validating the sweep file -----------------------------------------------------

def _dotted(where: str, key: Any) -> tuple[str, str]:
    if not isinstance(key, str) or key.count(".") < 1 or key.startswith(".") or key.endswith("."):
        raise UserError(f"sweep {where}: key {key!r} must be written section.key (e.g. train.lr)")
    sec, k = key.split(".", 1)
    return sec, k


def _check_keys(where: str, keys, method: str | None) -> None:
    """Sections a key may name at this place: model/data/train, and the block's own method."""
    for key in keys:
        sec, _ = _dotted(where, key)
        if sec in RUN_SECTIONS or sec == method:
            continue
        if method is None:
            raise UserError(f"sweep {where}: {key} is not a model/data/train key; method settings belong in "
                            f"methods.<name>.set or methods.<name>.grid (here: methods.{sec})")
        raise UserError(f"sweep {where}: {key} is for method {sec}, but this block is method {method}; "
                        f"move it to methods.{sec}")


def _grid(where: str, grid: Any) -> list[dict[str, Any]]:
    """{key: [values]} -> every combination as a list of {key: value} (one empty dict for no axes)."""
    if grid is None:
        return [{}]
    if not isinstance(grid, dict):
        raise UserError(f"sweep {where}: expected a mapping of section.key: [values]")
    for k, vals in grid.items():
        if not isinstance(vals, list) or not vals:
            raise UserError(f"sweep {where}.{k}: give a non-empty list of values (a single value goes in `set`)")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _label(method: str, params: dict[str, Any]) -> str:
    parts = [f"{k.removeprefix(method + '.')}={_fmt_value(v)}" for k, v in params.items()]
    return " ".join([method, *parts])


def point_id(cfg: RunConfig) -> str:
    """method-<hash of the resolved run config>: the point's folder (and its training stage's key)."""
    return f"{cfg.method}-{pipeline.digest(cfg.to_dict())[:10]}"


def infer_forget_split(cfg: RunConfig) -> str | None:
    """forget01 from data.forget = tofu:forget01 (or locuslab/TOFU:forget01); None otherwise."""
    src = cfg.data.forget
    for prefix in ("tofu:", "locuslab/TOFU:"):
        if src.startswith(prefix):
            split = src[len(prefix):]
            if split in ("forget01", "forget05", "forget10"):
                return split
    return None


def _seeds(where: str, value: Any, params: dict[str, Any] | None = None) -> list[int] | None:
    """A `seeds` entry: None, or a non-empty list of distinct integers (and then no train.seed beside it)."""
    if value is None:
        return None
    if (not isinstance(value, list) or not value or not all(isinstance(x, int) and not isinstance(x, bool) for x in value)
            or len(set(value)) != len(value)):
        raise UserError(f"sweep {where}.seeds: give a non-empty list of distinct integers, e.g. [0, 1, 2]")
    if params and "train.seed" in params:
        raise UserError(f"sweep {where}: train.seed and seeds both given; keep one")
    return list(value)


def parse_sweep(raw: Any, source: Path) -> tuple[list[tuple[str, dict[str, Any], str, list[int] | None]], dict, dict]:
    """The sweep file -> [(method, params, where, seeds)], base sections, eval values. Structure checks only."""
    if not isinstance(raw, dict):
        raise UserError(f"sweep {source}: expected a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise UserError(f"sweep {source}: unknown top-level key {unknown[0]!r}; known: {', '.join(TOP_KEYS)}")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise UserError("sweep base: expected sections model / data / train as mappings")
    for sec, vals in base.items():
        if sec == "method":
            raise UserError("sweep base: `method` is chosen per block (methods: {name: ...}); drop it from base")
        if sec not in RUN_SECTIONS:
            raise UserError(f"sweep base: section {sec!r} is not model/data/train; method settings belong in methods.{sec}.set")
        if not isinstance(vals, dict):
            raise UserError(f"sweep base.{sec}: expected a mapping of key: value")
    shared = raw.get("grid") or {}
    _check_keys("grid", list(shared) if isinstance(shared, dict) else [], None)
    shared_combos = _grid("grid", shared)
    top_seeds = _seeds("", raw.get("seeds"))
    if top_seeds and ("seed" in (base.get("train") or {}) or "train.seed" in shared):
        raise UserError("sweep: train.seed and seeds both given; keep one")

    from pmc_unlearn.methods import METHOD_CONFIGS

    def check_method(where: str, m: Any) -> str:
        if not isinstance(m, str) or m not in METHOD_CONFIGS:
            raise UserError(f"sweep {where}: unknown method {m!r}; choose one of {', '.join(sorted(METHOD_CONFIGS))}")
        if m == "sft":
            raise UserError(f"sweep {where}: sft is plain fine-tuning, not unlearning; use `pmc-unlearn finetune`")
        return m

    specs: list[tuple[str, dict[str, Any], str, list[int] | None]] = []
    methods = raw.get("methods") or {}
    if not isinstance(methods, dict):
        raise UserError("sweep methods: expected a mapping of method name -> block ({set: ..., grid: ...})")
    for name, block in methods.items():
        m = check_method(f"methods.{name}", name)
        block = block or {}
        if not isinstance(block, dict):
            raise UserError(f"sweep methods.{name}: expected a mapping with `set` and/or `grid`")
        bad = sorted(set(block) - set(BLOCK_KEYS))
        if bad:
            raise UserError(f"sweep methods.{name}: unknown key {bad[0]!r}; a block has `set` (fixed keys) and `grid` (lists)")
        fixed = block.get("set") or {}
        if not isinstance(fixed, dict):
            raise UserError(f"sweep methods.{name}.set: expected a mapping of section.key: value")
        own = block.get("grid") or {}
        _check_keys(f"methods.{name}.set", fixed, m)
        _check_keys(f"methods.{name}.grid", list(own) if isinstance(own, dict) else [], m)
        own_combos = _grid(f"methods.{name}.grid", own)
        block_seeds = _seeds(f"methods.{name}", block.get("seeds"), {**fixed, **(own if isinstance(own, dict) else {})})
        replaced = set(fixed) | set(own)  # block keys replace shared axes of the same name
        seen: list[dict] = []
        for sc in shared_combos:
            sc = {k: v for k, v in sc.items() if k not in replaced}
            if sc in seen:
                continue
            seen.append(sc)
            for oc in own_combos:
                params = {**sc, **fixed, **oc}
                seeds = block_seeds or (None if "train.seed" in params else top_seeds)
                specs.append((m, params, f"methods.{name}", seeds))
    points = raw.get("points") or []
    if not isinstance(points, list):
        raise UserError("sweep points: expected a list of {method: name, section.key: value, ...}")
    for i, p in enumerate(points):
        where = f"points[{i}]"
        if not isinstance(p, dict) or "method" not in p:
            raise UserError(f"sweep {where}: expected a mapping with `method` and section.key: value entries")
        m = check_method(where, p["method"])
        params = {k: v for k, v in p.items() if k not in ("method", "seeds")}
        _check_keys(where, params, m)
        seeds = _seeds(where, p.get("seeds"), params) or (None if "train.seed" in params else top_seeds)
        specs.append((m, params, where, seeds))
    if not specs:
        raise UserError(f"sweep {source}: no points; add a `methods` block or a `points` list")
    ev = raw.get("eval") or {}
    if not isinstance(ev, dict):
        raise UserError("sweep eval: expected a mapping of evaluation settings")
    return specs, base, ev


def read_config_file(path: str | Path) -> tuple[Path, Any]:
    """(the file's path, its YAML content): a missing or unreadable --config file is a UserError."""
    p = Path(path).expanduser()
    return p, load_yaml(p)


def load_sweep(path: str | Path) -> Sweep:
    """Read the sweep file and validate every point (config, data, model) and the eval settings."""
    p, raw = read_config_file(path)
    specs, base, ev_raw = parse_sweep(raw, p)
    ev = build_section(EvalSettings, "eval", ev_raw)

    points: list[Point] = []
    by_id: dict[str, str] = {}
    for method, params, where, seeds in specs:
        group = _label(method, params)
        for seed in seeds or [None]:
            run_params = params if seed is None else {**params, "train.seed": seed}
            label = group if seed is None else f"{group} seed={seed}"
            sections = {sec: dict(vals) for sec, vals in base.items()}
            for key, value in run_params.items():  # (section.key, checked by parse_sweep)
                set_dotted(sections, key, value)
            try:
                cfg = load_config(method=method, extra=sections)
            except UserError as e:
                raise UserError(f"sweep {where}, point '{label}': {e}") from None
            pid = point_id(cfg)
            if pid in by_id:
                raise UserError(f"sweep {where}: point '{label}' has the same config as '{by_id[pid]}'; drop one")
            by_id[pid] = label
            split = ev.forget_split or infer_forget_split(cfg)
            if not split:
                raise UserError(f"sweep {where}, point '{label}': data.forget={cfg.data.forget} is not a TOFU forget split; "
                                "set eval.forget_split to the split to evaluate on")
            points.append(Point(pid, label, method, run_params, cfg, split, group, seed))
    sweep = Sweep(p, points, ev)
    _validate_inputs(sweep)
    return sweep


def _validate_inputs(sweep: Sweep) -> None:
    """Data, model and evaluation inputs of every point, each distinct one checked once."""
    from pmc_unlearn.evaluation.suite import tofu_suite
    from pmc_unlearn.methods import METHODS
    from pmc_unlearn.models import check_causal_lm
    from pmc_unlearn.trainer import check_lengths, load_data

    seen_data, seen_models, seen_splits = set(), set(), {}
    for pt in sweep.points:
        method = METHODS[pt.method](pt.cfg.method_cfg)
        dkey = (json.dumps(dataclasses.asdict(pt.cfg.data), sort_keys=True), method.uses_primary_answers,
                method.uses_retain, pt.cfg.model.name)
        try:
            if pt.cfg.model.name not in seen_models:
                check_causal_lm(pt.cfg.model.name)
                seen_models.add(pt.cfg.model.name)
            if dkey not in seen_data:
                check_lengths(pt.cfg, *load_data(pt.cfg, method))
                seen_data.add(dkey)
        except UserError as e:
            raise UserError(f"sweep point '{pt.label}': {e}") from None
        if pt.forget_split not in seen_splits:
            seen_splits[pt.forget_split] = tofu_suite(pt.forget_split, sweep.eval.retain_sample,
                                                      sweep.eval.max_examples or None)
    if sweep.eval.retain_records:
        from pmc_unlearn.data import load_rows
        from pmc_unlearn.evaluation.reference import check_reference, read_reference

        try:
            ref = read_reference(sweep.eval.retain_records, sweep.eval.convention)
            for split, specs in seen_splits.items():
                items = next(s for s in specs if s.name == "forget").items
                check_reference(ref, split, items, len(load_rows(f"tofu:{split}_perturbed")))
        except UserError as e:
            raise UserError(f"sweep eval.retain_records: {e}") from None


# ----- running -----------------------------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _numeric(summary: dict) -> dict[str, float | None]:
    """The summary's metrics (numbers and nulls; strings and settings left out)."""
    skip = ("time_", "version_", "n_examples_")
    return {k: v for k, v in summary.items()
            if (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))) and not k.startswith(skip)}


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


class PointFiles:
    """The sweep's stage store: a point is done when its point.json exists with the sweep's evaluation
    settings (the stage key is their digest), or records a diverged run (nothing more to do). Everything
    else resumes inside `run_point`: training from its manifest and checkpoints, evaluation from its records."""

    def __init__(self, out: Path):
        self.out = out

    def read(self, st: pipeline.Stage) -> dict[str, Any]:
        prev = _read_json(self.out / "points" / st.name / POINT_FILE)
        if not prev:
            return {}
        key = st.key if prev.get("status") == "diverged" else pipeline.digest(prev.get("eval_settings"))
        return {"key": key, "status": "done", "time_s": (prev.get("train") or {}).get("wall_time_s")}

    def begin(self, st: pipeline.Stage, resume: bool, rec: dict[str, Any]) -> None:
        pass  # (point.json is written by run_point when the point is finished)

    def end(self, st: pipeline.Stage, rec: dict[str, Any]) -> None:
        pass


def point_stages(sweep: Sweep, points: list[Point], out: Path) -> list[pipeline.Stage]:
    """One stage per point (its name the point's id); one second each as the ETA's unit, so the ETA
    becomes the mean time of the points run so far times the points left."""
    key = pipeline.digest(sweep.eval_dict)
    return [pipeline.Stage(pt.id, "point", out / "points" / pt.id, key,
                           lambda resume, pt=pt: {"status": run_point(sweep, pt, out)["status"]}, est_s=1.0)
            for pt in points]


def run_points(sweep: Sweep, points: list[Point], out: Path) -> None:
    """Run the unfinished points of `points`, one after another, with a line per point."""
    labels = {pt.id: pt.label for pt in points}
    pipeline.run_stages(point_stages(sweep, points, out), PointFiles(out), label="sweep",
                        say=lambda line: log.info("%s", _with_labels(line, labels)))


def _with_labels(line: str, labels: dict[str, str]) -> str:
    head, sep, rest = line.partition(": ")
    pid = head.rsplit(" ", 1)[-1]
    return f"{head} ({labels[pid]}){sep}{rest}" if pid in labels else line


def train_or_resume(cfg: RunConfig, run_dir: Path, command: list[str], what: str) -> dict:
    """Train `cfg` into `run_dir`: fresh, resumed from its last checkpoint after a crash, or not at all
    when its manifest says completed or diverged. Returns the run's manifest ({} when none was written);
    TrainingDiverged passes through."""
    man = _read_json(run_dir / "manifest.json")
    status = man.get("status") if man else None
    if status in ("completed", "diverged"):
        return man
    resume = status is not None
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # no manifest: nothing written worth keeping
    log.info("%s: %s", what, "resuming its run" if resume else "training")
    from pmc_unlearn.trainer import train

    try:
        train(cfg, run_dir, resume=resume, command=command)
    finally:
        _free_memory()
    return _read_json(run_dir / "manifest.json") or {}


def evaluate_run(model: str, forget_split: str, eval_dir: Path, ev: EvalSettings, settings_file: Path,
                 suite: list | None = None, default_fmt=None) -> tuple[dict, float]:
    """Evaluate `model` into `eval_dir` under the settings `ev`; returns (summary, seconds).

    Resumes from the records already there; settings other than the ones `settings_file` holds
    start over. The prompt format is the one saved with the model, else `default_fmt` (else the
    evaluation's). `suite`: the splits to run (default: evaluate's own, from `ev`).
    """
    settings = dataclasses.asdict(ev)
    overwrite = _read_json(settings_file) not in (None, settings)
    write_json_atomic(settings_file, settings)
    from pmc_unlearn.evaluation.api import evaluate

    t = time.perf_counter()
    try:
        summary = evaluate(model, forget_split, eval_dir, retain_records=ev.retain_records,
                           require_forget_quality=bool(ev.retain_records), max_examples=ev.max_examples or None,
                           batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens, dtype=ev.dtype,
                           retain_sample=ev.retain_sample, overwrite=overwrite, progress=False,
                           convention=ev.convention, specs=suite, default_fmt=default_fmt)
    finally:
        _free_memory()
    return summary, round(time.perf_counter() - t, 3)


def run_point(sweep: Sweep, pt: Point, out: Path) -> dict:
    """Train (or resume) and evaluate one point; returns its point.json record."""
    pdir = out / "points" / pt.id
    run_dir, eval_dir, done = pdir / "run", pdir / "eval", pdir / POINT_FILE
    pdir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"id": pt.id, "label": pt.label, "group": pt.group or pt.label, "seed": pt.seed,
                              "method": pt.method, "params": pt.params,
                              "forget_split": pt.forget_split, "config": pt.cfg.to_dict(),
                              "eval_settings": sweep.eval_dict,
                              "run_dir": str(run_dir.relative_to(out)), "eval_dir": str(eval_dir.relative_to(out))}

    # 1. train: fresh, resumed after a crash, or already done
    try:
        man = train_or_resume(pt.cfg, run_dir, ["pmc-unlearn", "sweep", str(sweep.source), pt.id],
                              f"point {pt.id} ({pt.label})")
    except TrainingDiverged as e:
        log.warning("point %s (%s) diverged: %s", pt.id, pt.label, e)
        man = _read_json(run_dir / "manifest.json") or {}
    phases = man.get("phases_s", {})
    record["train"] = {"status": man.get("status"), "train_s": phases.get("train"), "wall_time_s": man.get("wall_time_s"),
                       "steps": man.get("steps"), "planned_steps": man.get("planned_steps"),
                       "stopped_by_time_limit": man.get("stopped_by_time_limit"),
                       "method_info": man.get("method_info", {})}
    if man.get("status") != "completed":
        record.update(status="diverged", summary={})
        write_json_atomic(done, record)
        return record

    # 2. evaluate (resumes from its records; new settings start over)
    summary, eval_s = evaluate_run(str(run_dir / "model"), pt.forget_split, eval_dir, sweep.eval, pdir / "eval_settings.json")
    record.update(status="done", eval_s=eval_s, summary=_numeric(summary))
    write_json_atomic(done, record)
    log.info("point %s (%s): UQ=%s U=%s FQ=%s MU=%s", pt.id, pt.label, *(summary.get(k) for k in
             ("unlearn_quality", "utility", "forget_quality", "model_utility")))
    return record


def flat_points(records: list[dict]) -> list[dict]:
    """points.jsonl rows -> plain dicts for plots.save_pareto: method, label and every summary metric."""
    return [{"method": r["method"], "label": r.get("label"), "group": r.get("group") or r.get("label"),
             "seed": r.get("seed"), **r.get("summary", {})}
            for r in records if r.get("status") == "done"]


def finalize(sweep: Sweep, out: Path) -> list[dict]:
    """points.jsonl (the sweep's points in order, finished ones) and the Pareto plots."""
    from pmc_unlearn.plots import save_pareto, seed_means

    records = [r for pt in sweep.points if (r := _read_json(out / "points" / pt.id / POINT_FILE))]
    write_jsonl_atomic(out / POINTS_FILE, records, ensure_ascii=True, default=str)
    save_pareto(seed_means(flat_points(records)), out / "pareto",
                suptitle=f"{sweep.source.name}: {sum(r.get('status') == 'done' for r in records)} of {len(sweep.points)} points")
    return records


def parse_devices(spec: str) -> list[str] | None:
    """'auto' -> every visible GPU when there are several, else None (run here); 'cpu' -> None; '0,1' -> ['0', '1']."""
    spec = spec.strip()
    if spec == "cpu":
        return None
    if spec == "auto":
        try:
            import torch

            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except ImportError:
            n = 0
        return [str(i) for i in range(n)] if n > 1 else None
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts) or len(set(parts)) != len(parts):
        raise UserError(f"--devices {spec}: write auto, cpu, or distinct CUDA device indices like 0,1,2")
    return parts


def _child_visible(dev: str) -> str:
    """CUDA_VISIBLE_DEVICES for a worker: index `dev` among the devices this process sees."""
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    if parent:
        lst = [x.strip() for x in parent.split(",") if x.strip()]
        if int(dev) >= len(lst):
            raise UserError(f"--devices: index {dev} but CUDA_VISIBLE_DEVICES={parent} shows {len(lst)} devices")
        return lst[int(dev)]
    return dev


def run_workers(sweep: Sweep, out: Path, devices: list[str]) -> None:
    """One worker process per device (CUDA_VISIBLE_DEVICES=that device), each running every N-th point."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    n = len(devices)
    procs = []
    for k, dev in enumerate(devices):
        cmd = [sys.executable, "-m", "pmc_unlearn", "sweep", "--config", str(sweep.source), "--output", str(out),
               "--worker", f"{k}/{n}"]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": _child_visible(dev)}
        f = (logs / f"worker-{k}.log").open("a")
        log.info("worker %d/%d on device %s: %d points, log in %s", k, n, dev, len(sweep.points[k::n]), f.name)
        procs.append((k, subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT), f))
    failed = []
    for k, proc, f in procs:
        rc = proc.wait()
        f.close()
        if rc != 0:
            failed.append(k)
    if failed:
        tail = (logs / f"worker-{failed[0]}.log").read_text().splitlines()[-5:]
        raise RuntimeError(f"sweep workers {failed} failed (see {logs}); rerun the same command to resume. "
                           f"Last lines of worker {failed[0]}: " + " | ".join(tail))


def check_output(out: Path, marker: str = SWEEP_MARKER, copy: str = SWEEP_COPY, what: str = "sweep") -> None:
    """A sweep folder (or another command's, named by its marker and config copy) is new, empty, or
    an earlier run's of that command (which is then resumed); never someone else's."""
    pipeline.check_owned(out, owns(out, marker, copy), f"--output {out}: folder is not empty and holds no {copy} of an "
                                                       f"earlier {what}; choose a new folder (a {what} writes only into "
                                                       "folders it created)")


def owns(out: Path, marker: str = SWEEP_MARKER, copy: str = SWEEP_COPY) -> bool:
    """The command created this folder (its marker), or an earlier version did (the config copy and points/)."""
    return (out / marker).is_file() or ((out / copy).is_file() and (out / "points").is_dir())


@contextmanager
def owned_folder(out: Path, marker: str = SWEEP_MARKER, copy: str = SWEEP_COPY, what: str = "sweep"):
    """Check `out` (check_output), create it, hold its lock and leave the marker: the body writes into a
    folder its command owns. Rerunning the command there resumes."""
    from pmc_unlearn import rundir

    check_output(out, marker, copy, what)
    rundir.make_folder(out)
    with rundir.OutputLock(out):
        pipeline.claim(out, marker, f"pmc-unlearn {what} folder: rerunning the {what} here resumes it\n")
        yield


def run_sweep(sweep: Sweep, out: Path, devices: list[str] | None = None, worker: tuple[int, int] | None = None) -> list[dict]:
    """Run every unfinished point (this worker's share when `worker` = (k, n)); then, unless a
    worker, write points.jsonl and the plots. Returns the records of the sweep's finished points."""
    if worker is not None:  # (the parent holds the folder's lock; each point's run takes its own)
        k, n = worker
        run_points(sweep, sweep.points[k::n], out)
        return []
    with owned_folder(out):
        return _run_sweep(sweep, out, devices)


def _run_sweep(sweep: Sweep, out: Path, devices: list[str] | None) -> list[dict]:
    shutil.copyfile(sweep.source, out / SWEEP_COPY)
    if devices:
        run_workers(sweep, out, devices)
    else:
        run_points(sweep, sweep.points, out)
    return finalize(sweep, out)
