"""Reading run folders into one list of models for the report: no model, no plotting.

Accepted inputs (any mix, any number):
- a demo folder (`demo.json`): its models (eval/<name>, runs/<name>, attacks/<name>), roles and stage times;
- a training run folder (`manifest.json`, `log.jsonl`, `config.yaml`, `model/`), optionally holding an
  evaluation (a subfolder with `summary.json`) or `attacks.json`;
- an evaluation folder (`summary.json`, `records.jsonl`) from `pmc-unlearn eval`;
- a sequence folder (`sequence.jsonl`, `pmc-unlearn sequence`): every request's model, and the
  sequence's lines for the "Sequential requests" section;
- a folder of such folders (one level down).
Evaluations given separately are paired with runs by model fingerprint, else by the model path
the evaluation names (`summary.json`'s `model_name`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pmc_unlearn.data import read_jsonl_dicts
from pmc_unlearn.errors import UserError

log = logging.getLogger(__name__)

ROLE_ORDER = {"base": 0, "target": 1, "retain": 2, "finetuned": 3, "unlearned": 4, "model": 5}
REFERENCE_ROLES = ("base", "target", "retain", "finetuned")


@dataclass
class ModelResult:
    """Everything the report knows about one model."""

    label: str
    role: str = "model"  # base | target | retain | finetuned | unlearned | model
    method: str | None = None
    run_dir: Path | None = None
    eval_dir: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    attacks: dict[str, Any] | None = None
    tokens_sampled: int | None = None  # new tokens the run generated while training (PMC's samples.jsonl)
    stage_time_s: float | None = None  # the demo stage that produced the model (training)
    eval_stage_time_s: float | None = None
    source: str = ""

    @property
    def is_pmc(self) -> bool:
        return self.method == "pmc"

    @property
    def train_time_s(self) -> float | None:
        """The demo stage's wall time when there is one (it times the whole run), else the run's manifest."""
        if self.stage_time_s is not None:
            return self.stage_time_s
        t = self.manifest.get("wall_time_s")
        if t is None and self.manifest.get("phases_s"):
            t = sum(self.manifest["phases_s"].values())
        return t

    @property
    def eval_time_s(self) -> float | None:
        if self.eval_stage_time_s is not None:
            return self.eval_stage_time_s
        s = self.summary
        parts = [s.get(k) for k in ("time_load_s", "time_collect_s", "time_aggregate_s") if s.get(k) is not None]
        return sum(parts) if parts else None

    def metric(self, key: str) -> float | None:
        v = self.summary.get(key)
        return float(v) if isinstance(v, (int, float)) and v == v else None


@dataclass
class ReportData:
    models: list[ModelResult]
    demos: list[dict[str, Any]] = field(default_factory=list)  # demo.json contents, with "_path"
    sequences: list[dict[str, Any]] = field(default_factory=list)  # {"_path", "lines": sequence.jsonl's lines}
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- small readers

def _json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s: unreadable (%s); ignored", path, e)
        return {}
    return obj if isinstance(obj, dict) else {}


def _yaml(path: Path) -> dict[str, Any]:
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return obj if isinstance(obj, dict) else {}


def is_run_dir(p: Path) -> bool:
    return any((p / n).exists() for n in ("manifest.json", "log.jsonl")) or (p / "model" / "config.json").exists()


def is_eval_dir(p: Path) -> bool:
    return (p / "summary.json").exists()


def read_run(p: Path, m: ModelResult) -> None:
    m.run_dir = p
    m.manifest = _json(p / "manifest.json") if (p / "manifest.json").exists() else {}
    m.config = _yaml(p / "config.yaml") if (p / "config.yaml").exists() else {}
    m.log = read_jsonl_dicts(p / "log.jsonl")
    m.method = m.method or m.config.get("method") or m.manifest.get("method")
    if (p / "samples.jsonl").exists():
        m.tokens_sampled = sum(int(r.get("tokens") or 0) for r in read_jsonl_dicts(p / "samples.jsonl"))
    if (p / "attacks.json").exists() and m.attacks is None:
        m.attacks = _json(p / "attacks.json")


def read_eval(p: Path, m: ModelResult) -> None:
    m.eval_dir = p
    m.summary = _json(p / "summary.json")
    m.records = read_jsonl_dicts(p / "records.jsonl")
    if (p / "attacks.json").exists() and m.attacks is None:
        m.attacks = _json(p / "attacks.json")


def _role_of_method(method: str | None) -> str:
    if method is None:
        return "model"
    return "finetuned" if method == "sft" else "unlearned"


# ----------------------------------------------------------------------------- a demo folder

def read_demo(root: Path) -> tuple[dict[str, Any], list[ModelResult]]:
    demo = _json(root / "demo.json")
    demo["_path"] = str(root)
    stages = [s for s in demo.get("stages", []) if isinstance(s, dict)]
    stage_times = {s["name"]: s.get("time_s") for s in stages}
    # Folders of stages this demo ran (done or cached); others are left over from another profile.
    current = {s["name"] for s in stages if s.get("status") in ("done", "cached")} if stages else None

    def ok(stage: str) -> bool:
        return current is None or stage in current

    names: list[str] = []
    for sub in ("eval", "runs"):
        d = root / sub
        if d.is_dir():
            names += [c.name for c in sorted(d.iterdir()) if c.is_dir() and c.name not in names]
    models = []
    for name in names:
        m = ModelResult(label=name, source=str(root))
        run, ev = root / "runs" / name, root / "eval" / name
        if run.is_dir() and is_run_dir(run) and (ok(f"finetune/{name}") or ok(f"unlearn/{name}")):
            read_run(run, m)
        if ev.is_dir() and is_eval_dir(ev) and ok(f"eval/{name}"):
            read_eval(ev, m)
        if m.run_dir is None and m.eval_dir is None:
            continue
        at = root / "attacks" / name / "attacks.json"
        if at.exists() and ok(f"attacks/{name}"):
            m.attacks = _json(at)
        m.role = name if name in ("base", "target", "retain") else _role_of_method(m.method)
        if m.role == "unlearned" and m.method is None:
            m.method = name
        m.stage_time_s = stage_times.get(f"finetune/{name}") or stage_times.get(f"unlearn/{name}")
        m.eval_stage_time_s = stage_times.get(f"eval/{name}")
        models.append(m)
    return demo, models


# ----------------------------------------------------------------------------- a sequence folder

def read_sequence(root: Path) -> tuple[dict[str, Any], list[ModelResult]]:
    """sequence.jsonl's lines, and a model per request (request-0 being the starting model) plus the
    retain model when the sequence evaluated one."""
    from pmc_unlearn.sequence import SEQUENCE_FILE

    lines = read_jsonl_dicts(root / SEQUENCE_FILE)
    models = []
    for line in lines:
        k = line.get("request")
        m = ModelResult(label=f"request-{k}", source=str(root))
        if line.get("run_dir") and is_run_dir(root / line["run_dir"]):
            read_run(root / line["run_dir"], m)
        if line.get("eval_dir") and is_eval_dir(root / line["eval_dir"]):
            read_eval(root / line["eval_dir"], m)
        if m.run_dir is None and m.eval_dir is None:
            continue
        m.role = "target" if k == 0 else _role_of_method(m.method)
        models.append(m)
    if is_eval_dir(root / "retain" / "eval"):
        m = ModelResult(label="retain", role="retain", source=str(root))
        read_eval(root / "retain" / "eval", m)
        models.append(m)
    return {"_path": str(root), "lines": lines}, models


# ----------------------------------------------------------------------------- any folders

def _collect(path: Path, depth: int = 0) -> tuple[list[Path], list[Path], list[Path], list[Path]]:
    """(demo folders, run folders, eval folders, sequence folders) at or one level below `path`."""
    from pmc_unlearn.sequence import SEQUENCE_FILE

    if (path / "demo.json").exists():
        return [path], [], [], []
    if (path / SEQUENCE_FILE).exists():
        return [], [], [], [path]
    demos, runs, evals, seqs = [], [], [], []
    if is_run_dir(path):
        runs.append(path)
        return demos, runs, evals, seqs
    if is_eval_dir(path):
        evals.append(path)
        return demos, runs, evals, seqs
    if depth == 0 and path.is_dir():
        for c in sorted(path.iterdir()):
            if c.is_dir():
                d, r, e, q = _collect(c, 1)
                demos += d
                runs += r
                evals += e
                seqs += q
    return demos, runs, evals, seqs


def _resolved(p: str | Path | None) -> str | None:
    if not p:
        return None
    try:
        return str(Path(p).expanduser().resolve())
    except OSError:
        return None


def gather(paths: list[str | Path]) -> ReportData:
    """Every model found under `paths`, paired (run + evaluation), labelled and given a role."""
    data = ReportData(models=[])
    runs: list[Path] = []
    evals: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise UserError(f"report: {raw} does not exist; pass run folders, evaluation folders or a demo folder")
        if not p.is_dir():
            raise UserError(f"report: {raw} is a file; pass the folder that holds it")
        d, r, e, q = _collect(p)
        if not (d or r or e or q):
            raise UserError(f"report: {raw} holds no run (manifest.json, log.jsonl, model/), no evaluation "
                            "(summary.json), no demo (demo.json) and no sequence (sequence.jsonl)")
        data.sources.append(str(p))
        for root in d:
            demo, models = read_demo(root)
            data.demos.append(demo)
            data.models += models
        for root in q:
            seq, models = read_sequence(root)
            data.sequences.append(seq)
            data.models += models
        runs += r
        evals += e

    # runs given directly, with evaluations inside them (a subfolder holding summary.json)
    loose: list[ModelResult] = []
    for r in runs:
        m = ModelResult(label=r.name, source=str(r))
        read_run(r, m)
        inner = [c for c in sorted(r.iterdir()) if c.is_dir() and is_eval_dir(c)]
        if inner:
            read_eval(inner[0], m)
            evals = [e for e in evals if e.resolve() != inner[0].resolve()]
        m.role = _role_of_method(m.method)
        loose.append(m)
    # evaluations given separately: pair with a run by fingerprint, else by the model path they name
    for e in evals:
        s = _json(e / "summary.json")
        fp, name = s.get("model_fingerprint"), _resolved(s.get("model_name"))
        match = None
        for m in loose:
            if m.eval_dir is not None or m.run_dir is None:
                continue
            if fp and m.manifest.get("model_fingerprint") == fp:
                match = m
                break
            if name and name in (_resolved(m.run_dir), _resolved(m.run_dir / "model")):
                match = m
                break
        if match is None:
            match = ModelResult(label=e.name, source=str(e))
            loose.append(match)
            alias = s.get("model_name")
            match.role = "base" if isinstance(alias, str) and not Path(alias).exists() and "/" not in alias else "model"
        read_eval(e, match)
    _infer_roles(loose)
    data.models += loose
    _unique_labels(data.models)
    data.models.sort(key=lambda m: (ROLE_ORDER.get(m.role, 9), 0 if m.is_pmc else 1, m.label))
    if not data.models:
        raise UserError("report: found no models to report on")
    return data


def _infer_roles(models: list[ModelResult]) -> None:
    """Runs made by hand: the model the unlearning runs started from is the target; the
    evaluation that forget quality referred to is the retain model's."""
    by_dir = {}
    for m in models:
        if m.run_dir is not None:
            by_dir[_resolved(m.run_dir / "model")] = m
            by_dir[_resolved(m.run_dir)] = m
    for m in models:
        if m.role == "unlearned":
            start = _resolved((m.config.get("model") or {}).get("name"))
            t = by_dir.get(start)
            if t is not None and t.role in ("finetuned", "model"):
                t.role = "target"
    refs = {_resolved(m.summary.get("retain_reference")) for m in models if m.summary.get("retain_reference")}
    for m in models:
        if m.eval_dir is not None and m.role in ("finetuned", "model"):
            if _resolved(m.eval_dir) in refs or _resolved(m.eval_dir / "records.jsonl") in refs:
                m.role = "retain"


def _unique_labels(models: list[ModelResult]) -> None:
    seen: dict[str, int] = {}
    for m in models:
        seen[m.label] = seen.get(m.label, 0) + 1
    for m in models:
        if seen[m.label] > 1:
            m.label = f"{Path(m.source).name}/{m.label}"
    # still clashing (same folder names twice): number them
    count: dict[str, int] = {}
    for m in models:
        count[m.label] = count.get(m.label, 0) + 1
        if count[m.label] > 1:
            m.label = f"{m.label}#{count[m.label]}"
