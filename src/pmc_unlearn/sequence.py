"""Sequential unlearning requests: unlearn request 1, then request 2 from the model that produced,
and so on, with an evaluation after each; per-request forgetting curves at the end.

The sequence file (example: configs/sequence-example.yaml; docs/sequence.md):

    base:      model / data / train / <method> sections, as in an `unlearn --config` file; no
               data.forget (the requests are the forget sets)
    method:    pmc (the default) or any other registered unlearning method
    requests:  split: {source: tofu:forget05, rows: [120, 200], parts: 4}
                 rows [start, end) of the source cut into `parts` consecutive equal requests
               or a list, one request per entry: a source (tofu:forget01, a file), or
                 {source: ..., rows: [start, end]}
    eval:      the sweep's evaluation settings (sweep.EvalSettings), plus forget_items and
               retain_model (SequenceEval)

Request k (1..K) is one `trainer.train` on DIR/data/request-k.jsonl (written here, so every run
is reproducible from files), starting from request k-1's model (request 1 from base.model.name),
with the same retain data and settings. Every model, the starting one as request 0, is evaluated
with `evaluation.api.evaluate` on one suite: by default its forget split holds exactly the
requests' rows (found by question text), so the forgetting of each request can be followed
before and after it is unlearned (`step_scores`).

Layout of DIR (rerunning the command resumes: finished requests are skipped, a crashed training
resumes from its checkpoint, an interrupted evaluation from its records):

    sequence.yaml               the sequence file as last run
    sequence_manifest.json      resolved base config, requests, eval settings, seed, versions, timings
    data/request-k.jsonl        request k's forget rows
    request-0/eval/             the starting model's evaluation
    request-k/run/, eval/       request k's unlearning run and its evaluation
    request-k/request.json      written when request k is done: its line of sequence.jsonl
    retain/eval/                the retain model's evaluation (eval.retain_model)
    sequence.jsonl              one line per request 0..K
    sequence.png, sequence.svg  utility and per-request forget ROUGE-L after each request
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmc_unlearn.config import RunConfig, build_section, load_config, opt
from pmc_unlearn.errors import TrainingDiverged, UserError
from pmc_unlearn.sweep import (EvalSettings, evaluate_run, infer_forget_split, owned_folder, read_config_file,
                               train_or_resume)

log = logging.getLogger(__name__)

TOP_KEYS = ("base", "method", "requests", "eval")
SPLIT_KEYS = ("source", "rows", "parts")
SEQUENCE_COPY = "sequence.yaml"
SEQUENCE_MARKER = ".pmc-unlearn-sequence"  # written into a folder the command created or found empty
SEQUENCE_FILE = "sequence.jsonl"
MANIFEST_FILE = "sequence_manifest.json"
REQUEST_FILE = "request.json"
FORGET_SPLITS = ("forget01", "forget05", "forget10")  # TOFU's, each holding the one before it
# summary.json numbers each line of sequence.jsonl carries
SUMMARY_KEYS = ("unlearn_quality", "utility", "forget_quality", "model_utility", "forget_rougeL_recall",
                "forget_para_rougeL_recall", "forget_truth_ratio", "retain_rougeL_recall", "privleak")


@dataclass
class SequenceEval(EvalSettings):
    forget_items: str = opt("requests", "the forget items evaluated: requests (the rows of every request, found in the "
                                        "forget split by their question; max_examples does not cut them) or split "
                                        "(the split's first max_examples rows, as a sweep takes them)",
                            choices=("requests", "split"))
    retain_model: str | None = opt(None, "the retain model (one that never saw the requests): evaluated once on the "
                                         "same items into DIR/retain/eval, its records then forget quality's "
                                         "reference; instead of retain_records")


@dataclass
class Request:
    number: int  # 1..K
    source: str
    start: int  # rows [start, end) of the source
    end: int
    rows: list[dict]  # question (and answer) rows, columns named as base.data.question_key / answer_key

    @property
    def questions(self) -> list[str]:
        return [r["question"] for r in self.rows]

    def info(self) -> dict[str, Any]:
        return {"request": self.number, "source": self.source, "rows": [self.start, self.end], "n_rows": len(self.rows)}


@dataclass
class SequencePlan:
    source: Path
    method: str
    base: RunConfig  # data.forget is replaced per request
    requests: list[Request]
    eval: SequenceEval
    forget_split: str
    suite: list  # evaluation.suite.SplitSpec: what every model is evaluated on
    groups: list[list[int]]  # per request: indices of the forget items that are its rows

    @property
    def keys(self) -> list[str]:
        """Per request 0..K: a hash of what its model depends on (the start model, the base config, the
        rows of every request up to it). A finished request with another key is not this plan's."""
        base = self.base.to_dict()
        base["data"].pop("forget")
        out = [_digest({"start": self.base.model.name})]
        for req in self.requests:
            out.append(_digest({"previous": out[-1], "config": base, "rows": req.rows}))
        return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----- reading and validating the sequence file ------------------------------------------------

def _int_pair(where: str, value: Any) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in value)):
        raise UserError(f"sequence {where}: give [start, end], two integers (rows start..end-1)")
    return value[0], value[1]


def split_rows(start: int, end: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) cut into `parts` consecutive equal ranges: (120, 200, 4) -> [(120, 140), ..., (180, 200)]."""
    n = end - start
    if n % parts:
        raise UserError(f"sequence requests.split: rows [{start}, {end}) are {n} rows, which do not cut into "
                        f"{parts} equal requests; change rows or parts")
    size = n // parts
    return [(start + i * size, start + (i + 1) * size) for i in range(parts)]


def request_specs(raw: Any) -> list[tuple[str, tuple[int, int] | None, int]]:
    """The `requests` entry -> [(source, (start, end) or None for all its rows, parts)]; structure checks only."""
    if isinstance(raw, dict):
        if set(raw) != {"split"} or not isinstance(raw["split"], dict):
            raise UserError("sequence requests: give `split: {source: ..., rows: [start, end], parts: N}` "
                            "or a list of forget sources")
        sp = raw["split"]
        bad = sorted(set(sp) - set(SPLIT_KEYS))
        if bad:
            raise UserError(f"sequence requests.split: unknown key {bad[0]!r}; known: {', '.join(SPLIT_KEYS)}")
        if not isinstance(sp.get("source"), str) or not sp["source"]:
            raise UserError("sequence requests.split.source: name the forget source to cut (e.g. tofu:forget05)")
        parts = sp.get("parts")
        if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
            raise UserError(f"sequence requests.split.parts={parts!r}: give the number of requests, an integer >= 1")
        rows = _int_pair("requests.split.rows", sp["rows"]) if "rows" in sp else None
        return [(sp["source"], rows, parts)]
    if not isinstance(raw, list) or not raw:
        raise UserError("sequence requests: give `split: {...}` or a non-empty list of forget sources")
    out: list[tuple[str, tuple[int, int] | None, int]] = []
    for i, item in enumerate(raw):
        if isinstance(item, str) and item:
            out.append((item, None, 1))
        elif isinstance(item, dict) and set(item) <= {"source", "rows"} and isinstance(item.get("source"), str):
            out.append((item["source"], _int_pair(f"requests[{i}].rows", item["rows"]) if "rows" in item else None, 1))
        else:
            raise UserError(f"sequence requests[{i}]: give a forget source (tofu:forget01, a file) or "
                            "{source: ..., rows: [start, end]}")
    return out


def load_requests(specs: list[tuple[str, tuple[int, int] | None, int]], question_key: str, answer_key: str,
                  need_answers: bool) -> list[Request]:
    """Read every request's rows (each source once); rows outside the source are a UserError."""
    from pmc_unlearn.data import load_qa

    cache: dict[str, list[dict]] = {}
    out: list[Request] = []
    for source, rows_given, parts in specs:
        if source.startswith("muse-news:"):
            raise UserError(f"sequence requests: {source}: sequences are evaluated on TOFU; MUSE-News requests are not "
                            "supported (docs/sequence.md)")
        if source not in cache:
            cache[source] = load_qa(source, question_key, answer_key, require_answers=need_answers, role="requests")
        rows = cache[source]
        start, end = rows_given or (0, len(rows))
        if not 0 <= start < end <= len(rows):
            raise UserError(f"sequence requests: rows [{start}, {end}) of {source}, which has {len(rows)} rows; "
                            f"give 0 <= start < end <= {len(rows)}")
        for a, b in split_rows(start, end, parts):
            picked = [{**r, "source_row": a + i} for i, r in enumerate(rows[a:b])]
            out.append(Request(len(out) + 1, source, a, b, picked))
    return out


def forget_split_for(requests: list[Request], given: str) -> str:
    """eval.forget_split when given, else the largest TOFU forget split the requests come from (they nest)."""
    if given:
        return given
    splits = []
    for req in requests:
        probe = RunConfig()
        probe.data.forget = req.source
        splits.append(infer_forget_split(probe))
    if None in splits:
        raise UserError(f"sequence: request {splits.index(None) + 1} ({requests[splits.index(None)].source}) is not a "
                        "TOFU forget split; set eval.forget_split to the split holding the requests' questions")
    return max(splits, key=FORGET_SPLITS.index)


def item_groups(items: Sequence[Mapping], questions: Sequence[Sequence[str]]) -> list[list[int]]:
    """Per request, the indices of the forget items (dicts with index and question) asking one of its questions."""
    sets = [set(qs) for qs in questions]
    return [sorted({int(it["index"]) for it in items if it["question"] in qs}) for qs in sets]


def eval_suite(split: str, ev: SequenceEval, questions: Sequence[Sequence[str]]):
    """(the splits every model is evaluated on, the forget item indices of each request).

    forget_items=requests: the forget split (and its paraphrases) holds the requests' rows and
    nothing else, whatever max_examples; split: the split's first max_examples rows. Every other
    split is cut to max_examples as in a sweep.
    """
    from pmc_unlearn.evaluation import suite as C
    from pmc_unlearn.evaluation import metrics as M

    cut = ev.max_examples or None
    if ev.forget_items == "split":
        specs = C.tofu_suite(split, ev.retain_sample, cut)
    else:
        specs = C.tofu_suite(split, ev.retain_sample, None)
        wanted = {q for qs in questions for q in qs}
        keep = {it.index for s in specs if s.name == M.FORGET for it in s.items if it.question in wanted}
        for s in specs:
            s.items = [it for it in s.items if it.index in keep] if s.name in (M.FORGET, M.FORGET_PARA) else s.items[:cut]
    forget = next(s for s in specs if s.name == M.FORGET).items
    groups = item_groups([{"index": it.index, "question": it.question} for it in forget], questions)
    empty = [k + 1 for k, g in enumerate(groups) if not g]
    if empty and ev.forget_items == "requests":
        raise UserError(f"sequence: request {empty[0]}'s questions are not in tofu:{split}_perturbed, so its "
                        "forgetting cannot be measured; set eval.forget_split to the TOFU split that holds them")
    if empty:
        log.warning("requests %s have no item among the first %s of %s: their numbers will be null", empty, cut, split)
    return specs, groups


def load_sequence(path: str | Path) -> SequencePlan:
    """Read the sequence file and validate everything (config, requests, data, model, eval) before any work."""
    p, raw = read_config_file(path)
    if not isinstance(raw, dict):
        raise UserError(f"sequence {p}: expected a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise UserError(f"sequence {p}: unknown top-level key {unknown[0]!r}; known: {', '.join(TOP_KEYS)}")
    if "requests" not in raw:
        raise UserError(f"sequence {p}: no `requests`; give split: {{source, rows, parts}} or a list of forget sources")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise UserError("sequence base: expected sections model / data / train / <method> as mappings")
    if "method" in base:
        raise UserError("sequence base: `method` goes at the top level of the sequence file")
    if "forget" in (base.get("data") or {}):
        raise UserError("sequence base.data.forget: the requests are the forget sets; drop it")
    method = raw.get("method", "pmc")
    from pmc_unlearn.methods import METHOD_CONFIGS, METHODS

    if not isinstance(method, str) or method not in METHOD_CONFIGS or method == "sft":
        raise UserError(f"sequence method: unknown unlearning method {method!r}; choose one of "
                        f"{', '.join(sorted(set(METHOD_CONFIGS) - {'sft'}))}")
    try:
        cfg = load_config(method=method, extra=base)
    except UserError as e:
        raise UserError(f"sequence base: {e}") from None
    ev = build_section(SequenceEval, "eval", raw.get("eval") or {})
    if ev.retain_model and ev.retain_records:
        raise UserError("sequence eval: retain_model and retain_records both given; keep one (retain_model is "
                        "evaluated here on the same items, retain_records must already cover them)")
    m = METHODS[method](cfg.method_cfg)
    requests = load_requests(request_specs(raw["requests"]), cfg.data.question_key, cfg.data.answer_key,
                             m.uses_primary_answers)
    split = forget_split_for(requests, ev.forget_split)
    suite, groups = eval_suite(split, ev, [r.questions for r in requests])
    plan = SequencePlan(p, method, cfg, requests, ev, split, suite, groups)
    _validate_inputs(plan, m)
    return plan


def _validate_inputs(plan: SequencePlan, method) -> None:
    """The model(s), the retain data, the lengths of every request's questions, the retain reference."""
    from pmc_unlearn.models import check_causal_lm
    from pmc_unlearn.trainer import check_lengths, load_data

    check_causal_lm(plan.base.model.name)
    if plan.eval.retain_model:
        check_causal_lm(plan.eval.retain_model)
    probe = copy.deepcopy(plan.base)
    probe.data.forget = plan.requests[0].source
    _, retain = load_data(probe, method)
    check_lengths(plan.base, [r for req in plan.requests for r in req.rows], retain)
    if plan.eval.retain_records:
        from pmc_unlearn.data import load_rows
        from pmc_unlearn.evaluation import metrics as M
        from pmc_unlearn.evaluation.reference import check_reference, read_reference

        try:
            ref = read_reference(plan.eval.retain_records, plan.eval.convention)
            items = next(s for s in plan.suite if s.name == M.FORGET).items
            check_reference(ref, plan.forget_split, items, len(load_rows(f"tofu:{plan.forget_split}_perturbed")))
        except UserError as e:
            raise UserError(f"sequence eval.retain_records: {e}") from None


# ----- per-request numbers from the evaluation records (pure) -----------------------------------

def _num(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def group_scores(by_split: Mapping[str, list[dict]], indices: Sequence[int], convention: str) -> dict[str, Any]:
    """Forget ROUGE-L recall (and of the paraphrases), their unlearn quality, and the forget truth ratio
    (mean of min(R, 1/R)) over the forget records with these indices; None where there is none."""
    from pmc_unlearn.evaluation import metrics as M

    idx = set(indices)
    f = [r for r in by_split.get(M.FORGET, []) if r["index"] in idx]
    p = [r for r in by_split.get(M.FORGET_PARA, []) if r["index"] in idx]
    rf, rp = M.rouge_mean(f), M.rouge_mean(p)
    return {"n_items": len(f), "forget_rougeL_recall": _num(rf), "forget_para_rougeL_recall": _num(rp),
            "unlearn_quality": _num(M.unlearn_quality(rf, rp)),
            "forget_truth_ratio": _num(M.forget_truth_ratio(M.truth_ratios(f, convention), convention)) if f else None}


def step_scores(records: Sequence[dict], groups: Sequence[Sequence[int]], done: int, convention: str) -> dict[str, Any]:
    """After `done` requests: the numbers of every request's items (`requests`, also those not unlearned
    yet) and of the items of requests 1..done together (`so_far`; None before the first)."""
    from pmc_unlearn.evaluation import metrics as M

    by = M.by_split(records)
    return {"requests": [{"request": j + 1, **group_scores(by, g, convention)} for j, g in enumerate(groups)],
            "so_far": group_scores(by, sorted({i for g in groups[:done] for i in g}), convention) if done else None}


# ----- running -----------------------------------------------------------------------------------

def request_file(out: Path, k: int) -> Path:
    return out / "data" / f"request-{k}.jsonl"


def model_dir(out: Path, k: int) -> Path:
    return out / f"request-{k}" / "run" / "model"


def request_config(plan: SequencePlan, k: int, out: Path) -> RunConfig:
    """Request k's run config: the base config on request k's rows, from request k-1's model."""
    cfg = copy.deepcopy(plan.base)
    cfg.data.forget = str(request_file(out, k).resolve())
    if k > 1:
        cfg.model.name = str(model_dir(out, k - 1).resolve())
    return cfg


def _read(path: Path) -> dict | None:
    from pmc_unlearn import rundir

    return rundir.read_json(path, "sequence") if path.is_file() else None


def _write_rows(path: Path, req: Request, question_key: str, answer_key: str) -> None:
    """The request's rows as JSON lines, under the column names the base config reads."""
    from pmc_unlearn import rundir

    def row(r: dict) -> dict:
        out = {question_key: r["question"]}
        if "answer" in r:
            out[answer_key] = r["answer"]
        return {**out, **{k: v for k, v in r.items() if k not in ("question", "answer")}}

    text = "".join(json.dumps(row(r), ensure_ascii=False) + "\n" for r in req.rows)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        rundir.write_text_atomic(path, text)


def check_finished(plan: SequencePlan, out: Path) -> None:
    """Refuse a folder whose requests were trained from other settings or rows (the chain would mix)."""
    keys = plan.keys
    for k in range(1, len(plan.requests) + 1):
        prev = _read(out / f"request-{k}" / REQUEST_FILE)
        if prev and prev.get("key") != keys[k]:
            raise UserError(f"--output {out}: request-{k} there was unlearned from another config, start model or "
                            "rows; every later request builds on it, so choose a new folder (or delete "
                            f"request-{k} and the ones after it to redo them)")


def _eval_settings(plan: SequencePlan, out: Path) -> SequenceEval:
    """The settings each evaluation runs with: retain_records pointing at DIR/retain/eval with retain_model."""
    if plan.eval.retain_model:
        return dataclasses.replace(plan.eval, retain_records=str((out / "retain" / "eval" / "records.jsonl").resolve()))
    return plan.eval


def _finished_eval(d: Path, settings: dict) -> dict | None:
    """The summary of an evaluation in d/eval made with these settings, or None."""
    if _read(d / "eval_settings.json") == settings and (d / "eval" / "summary.json").is_file():
        return _read(d / "eval" / "summary.json")
    return None


def _start_format(plan: SequencePlan):
    """The prompt format the base config trains with: the starting model's, unless it saved its own."""
    from pmc_unlearn.evaluation.suite import EVAL_FORMAT
    from pmc_unlearn.formatting import PromptFormat

    return PromptFormat(plan.base.data.use_chat_template, plan.base.data.system_prompt, EVAL_FORMAT.max_length)


def evaluate_retain(plan: SequencePlan, out: Path) -> None:
    """eval.retain_model on the sequence's suite, into DIR/retain/eval (skipped when done)."""
    d = out / "retain"
    ev = dataclasses.replace(plan.eval, retain_records=None)
    if _finished_eval(d, dataclasses.asdict(ev)) is None:
        log.info("retain model %s: evaluating", plan.eval.retain_model)
        d.mkdir(parents=True, exist_ok=True)
        evaluate_run(plan.eval.retain_model, plan.forget_split, d / "eval", ev, d / "eval_settings.json",
                     suite=plan.suite, default_fmt=_start_format(plan))


def run_request(plan: SequencePlan, k: int, out: Path, manifest, command: list[str]) -> dict:
    """Unlearn request k (k >= 1) from request k-1's model, or take the starting model (k = 0); then
    evaluate it. Returns its line of sequence.jsonl; a finished request is read back, not redone."""
    from pmc_unlearn import rundir
    from pmc_unlearn.evaluation.records import read_records

    rdir = out / f"request-{k}"
    ev = _eval_settings(plan, out)
    settings = dataclasses.asdict(ev)
    key = plan.keys[k]
    prev = _read(rdir / REQUEST_FILE)
    run_ok = k == 0 or (_read(rdir / "run" / "manifest.json") or {}).get("status") == "completed"
    if (prev and prev.get("status") == "done" and prev.get("key") == key and prev.get("eval_settings") == settings
            and run_ok and _finished_eval(rdir, settings) is not None):
        log.info("request %d: finished, skipped", k)
        return prev
    if k == 0 and prev and prev.get("key") != key and (rdir / "eval").exists():
        shutil.rmtree(rdir / "eval")  # another starting model: its evaluation is redone
    rdir.mkdir(parents=True, exist_ok=True)
    req = plan.requests[k - 1] if k else None
    record: dict[str, Any] = {"request": k, "key": key, "status": "running",
                              **(req.info() if req else {"source": None, "rows": None, "n_rows": 0}),
                              "forget_file": str(request_file(out, k).relative_to(out)) if req else None,
                              "run_dir": str((rdir / "run").relative_to(out)) if req else None,
                              "eval_dir": str((rdir / "eval").relative_to(out)), "eval_settings": settings}
    rundir.write_json_atomic(rdir / REQUEST_FILE, record)
    model = plan.base.model.name
    if req:
        cfg = request_config(plan, k, out)
        _write_rows(request_file(out, k), req, cfg.data.question_key, cfg.data.answer_key)
        with manifest.phase(f"request {k} train"):
            man = train_or_resume(cfg, rdir / "run", [*command, f"request-{k}"], f"request {k}")
        if man.get("status") != "completed":
            raise TrainingDiverged(f"request {k}: its run in {rdir / 'run'} ended {man.get('status')}; the requests "
                                   "after it have no model to start from")
        phases = man.get("phases_s", {})
        record["started_from"] = cfg.model.name
        record["train"] = {"status": man["status"], "train_s": phases.get("train"), "wall_time_s": man.get("wall_time_s"),
                           "steps": man.get("steps"), "precision": man.get("precision"), "seed": man.get("seed")}
        model = str(rdir / "run" / "model")
    record["model"] = model
    with manifest.phase(f"request {k} eval"):
        summary, eval_s = evaluate_run(model, plan.forget_split, rdir / "eval", ev, rdir / "eval_settings.json",
                                       suite=plan.suite, default_fmt=_start_format(plan))
    records = read_records(rdir / "eval" / "records.jsonl")
    record.update(status="done", eval_s=eval_s, summary={s: _num(summary.get(s)) for s in SUMMARY_KEYS},
                  **step_scores(records, plan.groups, k, ev.convention))
    rundir.write_json_atomic(rdir / REQUEST_FILE, record)
    so_far = record["so_far"] or {}
    log.info("request %d: U=%s MU=%s forget ROUGE-L so far=%s", k, summary.get("utility"), summary.get("model_utility"),
             so_far.get("forget_rougeL_recall"))
    return record


def run_sequence(plan: SequencePlan, out: Path, command: list[str]) -> list[dict]:
    """Every request in order (finished ones read back), then sequence.jsonl and the plot. Returns the lines."""
    from pmc_unlearn import rundir

    with owned_folder(out, SEQUENCE_MARKER, SEQUENCE_COPY, "sequence"):
        check_finished(plan, out)
        if plan.source.resolve() != (out / SEQUENCE_COPY).resolve():  # (rerun from its own copy: nothing to copy)
            shutil.copyfile(plan.source, out / SEQUENCE_COPY)
        base = plan.base.to_dict()
        base["data"].pop("forget")
        manifest = rundir.Manifest.start(out / MANIFEST_FILE, plan.base.train.seed, command, {
            "method": plan.method, "base_config": base, "requests": [r.info() for r in plan.requests],
            "forget_split": plan.forget_split, "eval_settings": dataclasses.asdict(plan.eval),
            "eval_items": {s.name: len(s.items) for s in plan.suite}})
        lines: list[dict] = []
        try:
            if plan.eval.retain_model:
                with manifest.phase("retain eval"):
                    evaluate_retain(plan, out)
            for k in range(len(plan.requests) + 1):
                lines.append(run_request(plan, k, out, manifest, command))
                if k == 1 and lines[-1].get("train"):
                    manifest.data["precision"] = lines[-1]["train"]["precision"]
        except BaseException as e:
            status = ("diverged" if isinstance(e, TrainingDiverged) else
                      "interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
            manifest.fail(status, str(e) or type(e).__name__)
            raise
        finally:
            write_outputs(lines, out, len(plan.requests))
        manifest.finish("completed", requests_done=len(plan.requests))
    return lines


def write_outputs(lines: list[dict], out: Path, n_requests: int) -> None:
    """sequence.jsonl (the lines so far) and sequence.png / .svg."""
    from pmc_unlearn import rundir

    rundir.write_text_atomic(out / SEQUENCE_FILE, "".join(json.dumps(x, default=str) + "\n" for x in lines))
    if lines:
        save_plot(lines, out / "sequence", n_requests, title=f"{out.name}: {len(lines) - 1} of {n_requests} requests done")


# ----- plot and table ----------------------------------------------------------------------------

def _value(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _pct(x: float | None) -> float:
    return 100.0 * _value(x)


# request lines' colours (no red: the requests-so-far line is red)
REQUEST_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def plot_sequence(ax, lines: Sequence[Mapping], n_requests: int | None = None) -> None:
    """x: requests unlearned (0..K); y (percent): utility, each request's forget ROUGE-L recall (dotted
    while it waits, solid from the step before its turn: the segment into step j is request j's own
    unlearning) and that of all requests so far."""
    xs = [int(x["request"]) for x in lines]
    n = n_requests or max((len(x.get("requests") or []) for x in lines), default=0)
    ax.plot(xs, [_value((x.get("summary") or {}).get("utility")) for x in lines], color="black", lw=2.2,
            marker="o", label="utility U")
    for j in range(1, n + 1):
        ys = [_pct(x["requests"][j - 1]["forget_rougeL_recall"]) if len(x.get("requests") or []) >= j else float("nan")
              for x in lines]
        c = REQUEST_COLOURS[(j - 1) % len(REQUEST_COLOURS)]
        waiting = [(a, b) for a, b in zip(xs, ys) if a <= j - 1]
        turn = [(a, b) for a, b in zip(xs, ys) if a >= j - 1]
        if waiting:
            ax.plot(*zip(*waiting), color=c, lw=1.0, ls=":", marker=".")
        if len(turn) > 1:
            ax.plot(*zip(*turn), color=c, lw=1.3, marker=".", label=f"request {j}: forget ROUGE-L")
    pts = [(int(x["request"]), _pct(x["so_far"]["forget_rougeL_recall"])) for x in lines if x.get("so_far")]
    if pts:
        ax.plot(*zip(*pts), color="#d62728", lw=2.2, marker="s", label="requests so far: forget ROUGE-L")
    ax.set_xticks(range(n + 1))
    ax.set_xlim(-0.25, n + 0.25)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("requests unlearned")
    ax.set_ylabel("percent (ROUGE-L recall x 100)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def sequence_figure(lines: Sequence[Mapping], n_requests: int | None = None, title: str | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    plot_sequence(ax, lines, n_requests)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_plot(lines: Sequence[Mapping], stem: Path, n_requests: int | None = None, title: str | None = None) -> None:
    import matplotlib.pyplot as plt

    fig = sequence_figure(lines, n_requests, title)
    for ext in ("png", "svg"):
        fig.savefig(stem.with_name(f"{stem.name}.{ext}"), dpi=150)
    plt.close(fig)


def _f(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def table(lines: Sequence[Mapping]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the sequence table: one row per request 0..K."""
    n = max((len(x.get("requests") or []) for x in lines), default=0)
    header = ["request", "rows", "train s", "eval s", "UQ", "U", "FQ", "MU", "ROUGE-L so far",
              *[f"ROUGE-L r{j}" for j in range(1, n + 1)]]
    rows = []
    for x in lines:
        s = x.get("summary") or {}
        rows.append([str(x["request"]), "start" if not x.get("rows") else f"{x['source']} [{x['rows'][0]}, {x['rows'][1]})",
                     _f((x.get("train") or {}).get("train_s"), 4), _f(x.get("eval_s"), 4),
                     _f(s.get("unlearn_quality")), _f(s.get("utility")), _f(s.get("forget_quality")),
                     _f(s.get("model_utility")), _f((x.get("so_far") or {}).get("forget_rougeL_recall")),
                     *[_f(r.get("forget_rougeL_recall")) for r in x.get("requests") or []]])
    return header, rows


def format_table(lines: Sequence[Mapping]) -> str:
    header, rows = table(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])
