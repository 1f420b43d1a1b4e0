"""Results in open-unlearning's layout: `TOFU_EVAL.json` and `TOFU_SUMMARY.json`.

TOFU_EVAL.json maps each metric name (theirs: configs/eval/tofu_metrics/*.yaml) to
`{"agg_value": x, "value_by_index": {"<index>": {...}}}`; metrics computed from others
(forget_quality, model_utility, privleak) hold `agg_value` only; MIA metrics hold the AUC as
`agg_value` and `auc`, plus `forget` / `holdout` blocks of per-example scores. TOFU_SUMMARY.json
maps each metric name to its `agg_value`. Per-example field names follow theirs (`prob`,
`avg_loss`, `score`, `rougeL_recall`, `input`, `ground_truth`, `generation`, ...).

The numbers follow the summary's convention (docs/metrics.md); TOFU_EVAL.json says which under
the extra top-level key `pmc_unlearn` ({"convention": ...}), which open-unlearning's own files lack
(theirs are open-unlearning's convention by definition) and TOFU_SUMMARY.json leaves out.

Not exported (not computed here): forget_Q_A_PERT_ROUGE, forget_Q_A_gibberish, mia_gradnorm.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from pmc_unlearn.evaluation import metrics as M
from pmc_unlearn.evaluation import scores

META_KEY = "pmc_unlearn"

# our split name -> open-unlearning's metric prefix
_PREFIX = {M.FORGET: "forget", M.RETAIN: "retain", M.REAL_AUTHORS: "ra", M.WORLD_FACTS: "wf"}


def json_clean(x):
    """JSON-safe: NaN / inf become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_clean(v) for v in x]
    return x


def _prob_metric(recs, key: str) -> dict:
    vbi = {str(r["index"]): {"prob": M.prob(r[key]), "avg_loss": r[key]} for r in recs}
    return {"agg_value": M.mean(v["prob"] for v in vbi.values()), "value_by_index": vbi}


def _pert_metric(recs) -> dict:
    vbi = {str(r["index"]): {"prob": [M.prob(x) for x in r["pert_nll"]], "avg_loss": list(r["pert_nll"])} for r in recs}
    return {"agg_value": M.mean(p for v in vbi.values() for p in v["prob"]), "value_by_index": vbi}


def _rouge_metric(recs) -> dict:
    vbi = {str(r["index"]): {"rouge1_recall": r["rouge1_recall"], "rougeL_f1": r["rougeL_f1"],
                             "rougeL_recall": r["rougeL_recall"], "input": r["question"],
                             "ground_truth": r["answer"], "generation": r["generation"]} for r in recs}
    return {"agg_value": M.rouge_mean(recs), "value_by_index": vbi}


def _tr_metric(recs, forget: bool, convention: str) -> dict:
    ratios = M.truth_ratios(recs, convention)
    agg = M.forget_truth_ratio(ratios, convention) if forget else M.true_better_truth_ratio(ratios)
    return {"agg_value": agg, "value_by_index": {str(r["index"]): {"score": x} for r, x in zip(recs, ratios)}}


def _score_metric(recs, key: str) -> dict:
    vbi = {str(r["index"]): {"score": r[key]} for r in recs}
    return {"agg_value": M.mean(r[key] for r in recs), "value_by_index": vbi}


def open_unlearning_eval(records: Sequence[dict], summary: dict) -> dict:
    """The TOFU_EVAL.json object for these records (scored: `metrics.with_scores`) and their summary."""
    convention = summary.get("convention", scores.DEFAULT_CONVENTION)
    s = M.by_split(M.with_scores(records, convention))
    ev: dict[str, dict] = {}
    for split, pre in _PREFIX.items():
        recs = s.get(split, [])
        if not recs:
            continue
        ev[f"{pre}_Q_A_Prob"] = _prob_metric(recs, "nll")
        if "para_nll" in recs[0]:
            ev[f"{pre}_Q_A_PARA_Prob"] = _prob_metric(recs, "para_nll")
        ev[f"{pre}_Q_A_PERT_Prob"] = _pert_metric(recs)
        if "rougeL_recall" in recs[0]:
            ev[f"{pre}_Q_A_ROUGE"] = _rouge_metric(recs)
        if split in (M.REAL_AUTHORS, M.WORLD_FACTS):
            probs = [scores.normalised_prob(r["nll"], r["pert_nll"], convention) for r in recs]
            ev[f"{pre}_Q_A_Prob_normalised"] = {
                "agg_value": M.mean(probs),
                "value_by_index": {str(r["index"]): {"prob": p} for r, p in zip(recs, probs)}}
        tr = _tr_metric(recs, forget=split == M.FORGET, convention=convention)
        ev["forget_truth_ratio" if split == M.FORGET else f"{pre}_Truth_Ratio"] = tr
    if s.get(M.FORGET_PARA):
        ev["forget_Q_A_PARA_ROUGE"] = _rouge_metric(s[M.FORGET_PARA])
    forget, hold = s.get(M.FORGET, []), s.get(M.HOLDOUT, [])
    if forget:
        ev["exact_memorization"] = _score_metric(forget, "em")
        ev["extraction_strength"] = _score_metric(forget, "es")
    if forget and hold:
        for attack in M.MIA_ATTACKS:
            k = f"mia_{attack}"
            auc = summary.get(f"{k}_auc")
            ev[k] = {"agg_value": auc, "auc": auc,
                     "forget": _score_metric(forget, k), "holdout": _score_metric(hold, k)}
    ev["model_utility"] = {"agg_value": summary.get("model_utility")}
    ev["forget_quality"] = {"agg_value": summary.get("forget_quality")}
    ev["privleak"] = {"agg_value": summary.get("privleak")}
    ev = dict(sorted(ev.items()))
    ev[META_KEY] = {"convention": convention}
    return json_clean(ev)


def open_unlearning_summary(ev: dict) -> dict:
    """TOFU_SUMMARY.json: metric name -> agg_value (null kept, so a missing forget quality is visible)."""
    return {k: v.get("agg_value") for k, v in sorted(ev.items()) if k != META_KEY}


def write_open_unlearning(records: Sequence[dict], summary: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write TOFU_EVAL.json and TOFU_SUMMARY.json into out_dir; returns their paths."""
    out = Path(out_dir)
    ev = open_unlearning_eval(records, summary)
    p1, p2 = out / "TOFU_EVAL.json", out / "TOFU_SUMMARY.json"
    p1.write_text(json.dumps(ev, indent=2, ensure_ascii=False))
    p2.write_text(json.dumps(open_unlearning_summary(ev), indent=2))
    return p1, p2
