"""Reading the retain model's results, which forget quality and PrivLeak compare against.

Accepted (`--retain-records`):
- our `records.jsonl`, or a run folder holding one: the retain model evaluated with
  `pmc-unlearn eval --no-forget-quality` on the same forget split;
- open-unlearning's `TOFU_EVAL.json` (their published retain-model logs, or a folder holding
  one): the truth ratios are `forget_truth_ratio.value_by_index[i].score`, the Min-K% AUC is
  `mia_min_k.agg_value`.

Records of another forget split or another question set are refused (UserError): the index
set must fit the split, cover every evaluated question, and the question texts must match where
the file holds them.

Conventions (docs/metrics.md): the reference must follow the evaluation's convention. Our
records hold the per-token log-probs, so they are converted: truth ratios and Min-K% scores are
recomputed under the convention asked for. Records written before conventions existed (no
per-token lists) hold pmc-unlearn scores and are refused under open-unlearning. A TOFU_EVAL.json
holds finished numbers and is taken as open-unlearning's (ours say which convention wrote them
under the `pmc_unlearn` key); under another convention it is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pmc_unlearn.errors import UserError
from pmc_unlearn.evaluation import metrics as M
from pmc_unlearn.evaluation import scores
from pmc_unlearn.evaluation.records import read_records
from pmc_unlearn.evaluation.suite import EvalItem

OU_FILE = "TOFU_EVAL.json"
RECORDS_FILE = "records.jsonl"
META_KEY = "pmc_unlearn"  # our TOFU_EVAL.json files: {"convention": ...}; absent in open-unlearning's own


def _from_records(path: Path, convention: str) -> M.RetainReference:
    recs = read_records(path)
    try:
        fixed = M.records_convention(recs)
    except ValueError as e:
        raise UserError(f"--retain-records {path}: {e}; pass the records of a single evaluation") from None
    if fixed is not None and fixed != convention:
        raise UserError(f"--retain-records {path}: its scores follow the {fixed} convention (records without "
                        f"per-token log-probs, from an older pmc-unlearn) and cannot be converted to {convention}; "
                        f"re-run `pmc-unlearn eval` on the retain model, or pass --convention {fixed}")
    recs = M.with_scores(recs, convention)
    forget = [r for r in recs if r.get("split") == M.FORGET]
    if not forget:
        raise UserError(f"--retain-records {path}: holds no forget-split records; pass the records.jsonl "
                        "of `pmc-unlearn eval` run on the retain model")
    sources = {r.get("source") for r in forget}
    if len(sources) != 1:
        raise UserError(f"--retain-records {path}: forget records from several sources ({', '.join(map(str, sources))}); "
                        "pass the records of a single evaluation")
    source = sources.pop() or ""
    split = source.removeprefix("tofu:").removesuffix("_perturbed") if source.startswith("tofu:") else None
    try:
        ratios = dict(zip((int(r["index"]) for r in forget), M.truth_ratios(forget, convention)))
    except (KeyError, TypeError) as e:
        raise UserError(f"--retain-records {path}: forget records lack NLL fields ({e}); rerun the retain evaluation") from e
    mk = {s: {int(r["index"]): float(r["mia_min_k"]) for r in recs if r.get("split") == s and "mia_min_k" in r}
          for s in (M.FORGET, M.HOLDOUT)}
    auc = M.mia_auc(list(mk[M.FORGET].values()), list(mk[M.HOLDOUT].values())) if mk[M.HOLDOUT] else None
    return M.RetainReference(truth_ratios=ratios, origin=str(path), forget_split=split,
                             questions={int(r["index"]): r["question"] for r in forget if "question" in r},
                             min_k_auc=auc, min_k_scores=mk, convention=convention)


def _from_open_unlearning(path: Path, obj: dict, convention: str) -> M.RetainReference:
    meta = obj.get(META_KEY)
    written = meta.get("convention") if isinstance(meta, dict) else None
    written = written or scores.OPEN_UNLEARNING
    if written != convention:
        who = "pmc-unlearn eval" if isinstance(meta, dict) else "open-unlearning"
        raise UserError(f"--retain-records {path}: a {OU_FILE} from {who} holds {written}-convention numbers, "
                        f"which cannot be converted to {convention}; pass --convention {written}, or the retain "
                        f"model's {RECORDS_FILE} (converted to either)")
    tr = obj.get("forget_truth_ratio")
    if not isinstance(tr, dict) or not isinstance(tr.get("value_by_index"), dict):
        raise UserError(f"--retain-records {path}: no forget_truth_ratio.value_by_index in this open-unlearning file")
    ratios = {}
    for k, v in tr["value_by_index"].items():
        score = v.get("score") if isinstance(v, dict) else None
        if score is None:
            continue
        ratios[int(k)] = float(score)
    questions = None
    rouge = obj.get("forget_Q_A_ROUGE")
    if isinstance(rouge, dict) and isinstance(rouge.get("value_by_index"), dict):
        questions = {int(k): v["input"] for k, v in rouge["value_by_index"].items()
                     if isinstance(v, dict) and isinstance(v.get("input"), str)}
    mk = obj.get("mia_min_k")
    auc = mk.get("agg_value") if isinstance(mk, dict) else None
    return M.RetainReference(truth_ratios=ratios, origin=str(path), questions=questions or None,
                             min_k_auc=None if auc is None else float(auc), convention=convention)


def read_reference(path: str | Path, convention: str = scores.DEFAULT_CONVENTION) -> M.RetainReference:
    """Parse a retain reference (records.jsonl, TOFU_EVAL.json, or a folder with either) for `convention`.

    Records are converted to the convention; a TOFU_EVAL.json of another convention is refused (UserError).
    """
    if convention not in scores.CONVENTIONS:
        raise UserError(f"--convention {convention}: choose one of {', '.join(scores.CONVENTIONS)}")
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--retain-records {path}: not found; pass the retain model's records.jsonl, its run folder, "
                        f"or an open-unlearning {OU_FILE}")
    if p.is_dir():
        for name in (RECORDS_FILE, OU_FILE):
            if (p / name).exists():
                p = p / name
                break
        else:
            raise UserError(f"--retain-records {path}: the folder holds neither {RECORDS_FILE} nor {OU_FILE}")
    if p.suffix == ".jsonl":
        return _from_records(p, convention)
    if p.suffix == ".json":
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"--retain-records {p}: not valid JSON ({e.msg})") from e
        if isinstance(obj, dict) and "forget_truth_ratio" in obj:
            return _from_open_unlearning(p, obj, convention)
        raise UserError(f"--retain-records {p}: not an open-unlearning {OU_FILE} (no forget_truth_ratio); "
                        f"for our own runs pass {RECORDS_FILE}, not summary.json")
    raise UserError(f"--retain-records {p}: expected {RECORDS_FILE}, {OU_FILE} or a folder holding one")


def check_reference(ref: M.RetainReference, forget_split: str, items: Sequence[EvalItem], split_size: int) -> None:
    """Refuse a reference from another split or question set (UserError naming the mismatch)."""
    fix = f"evaluate the retain model on {forget_split} and pass its records"
    if ref.forget_split is not None and ref.forget_split != forget_split:
        raise UserError(f"--retain-records {ref.origin}: records of {ref.forget_split}, but this evaluation is "
                        f"{forget_split}; {fix}")
    idx = set(ref.truth_ratios)
    if not idx:
        raise UserError(f"--retain-records {ref.origin}: no truth ratios in it; {fix}")
    if len(idx) > split_size or max(idx) >= split_size or min(idx) < 0:
        raise UserError(f"--retain-records {ref.origin}: covers {len(idx)} forget questions (indices up to {max(idx)}) "
                        f"but {forget_split} has {split_size}: another question set; {fix}")
    missing = [it.index for it in items if it.index not in idx]
    if missing:
        raise UserError(f"--retain-records {ref.origin}: lacks forget questions {missing[:5]} "
                        f"({len(missing)} of {len(items)}); {fix} without --max-examples (or with the same one)")
    if ref.questions:
        for it in items:
            q = ref.questions.get(it.index)
            if q is not None and q != it.question and it.question not in q:
                raise UserError(f"--retain-records {ref.origin}: forget question {it.index} differs "
                                f"({q[:60]!r} vs {it.question[:60]!r}): another question set; {fix}")
