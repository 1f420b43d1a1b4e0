"""95% bootstrap intervals over questions for the summary's numbers.

A summary number is an aggregate over a few dozen questions; another draw of questions from the
same benchmark would give another number. The interval says how far: resample the per-example
records with replacement (B times, a fixed seed), recompute the aggregate with the same pure
function that made the point estimate, and take the 2.5th and 97.5th percentiles of the B
values (the percentile bootstrap; quantiles of the empirical distribution, numpy's
`inverted_cdf`, so every bound is a value some resample produced).

- Resampling is stratified by split: each split keeps its size. The forget split and its
  paraphrased twin are resampled *together*, by question, because unlearn quality averages a
  question's two answers (they are not independent draws).
- Forget quality has no interval. It is a KS test's p-value, the probability of a difference at
  least this large if the unlearned and the retain model's truth ratios came from one
  distribution; it is not an estimate of a quantity, and resampling questions mostly shows how
  much a p-value varies from sample to sample (it is roughly uniform under the null). What is
  sound to report beside it is the KS statistic D (the largest gap between the two truth-ratio
  distributions, an effect size) with a bootstrap interval: `forget_ks_statistic` and its `_ci`,
  resampling forget questions with the retain model's ratio of each question coming along.
- A number that is not finite in the point estimate (a split missing) gets no interval; a
  resample that makes a number non-finite is left out of that number's percentiles.

Pure functions over records (no model); the evaluation calls `summary_intervals`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from pmc_unlearn.evaluation.bootstrap import LEVEL, SEED, percentile_interval
from pmc_unlearn.evaluation.bootstrap import N_RESAMPLES as N_BOOT

Record = dict[str, Any]

# The summary keys that get `<key>_ci`: the headline numbers of both families.
CI_KEYS = (
    "unlearn_quality", "utility", "model_utility",
    "forget_rougeL_recall", "forget_para_rougeL_recall", "retain_rougeL_recall", "retain_sample_rougeL_recall",
    "real_authors_rougeL_recall", "world_facts_rougeL_recall",
    "forget_truth_ratio", "retain_truth_ratio", "real_authors_truth_ratio", "world_facts_truth_ratio",
    "forget_prob", "retain_prob", "exact_memorization", "extraction_strength",
)
PAIRED = ("forget", "forget_para")  # resampled together, by question index


def resample(records: Sequence[Record], rng: np.random.Generator) -> list[Record]:
    """One stratified bootstrap draw: per split the same number of records, with replacement.

    The forget and forget_para splits are drawn as one, by question index; a question's records
    keep their original split names, so aggregation reads them as before.
    """
    by_split: dict[str, list[Record]] = {}
    for r in records:
        by_split.setdefault(r["split"], []).append(r)
    out: list[Record] = []
    paired = {s: {r["index"]: r for r in by_split.pop(s, [])} for s in PAIRED}
    questions = sorted(set().union(*(set(d) for d in paired.values())))
    if questions:
        for k in rng.integers(0, len(questions), len(questions)):
            for s in PAIRED:
                r = paired[s].get(questions[k])
                if r is not None:
                    out.append(r)
    for name in sorted(by_split):
        recs = by_split[name]
        out.extend(recs[k] for k in rng.integers(0, len(recs), len(recs)))
    return out


def bootstrap(records: Sequence[Record], aggregate: Callable[[Sequence[Record]], Mapping[str, float]],
              keys: Sequence[str], n_boot: int = N_BOOT, seed: int = SEED) -> dict[str, list[float]]:
    """`aggregate` of `n_boot` stratified resamples: {key: [value per resample]} (NaN where not finite)."""
    rng = np.random.default_rng(seed)
    vals: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(n_boot):
        agg = aggregate(resample(records, rng))
        for k in keys:
            x = agg.get(k)
            vals[k].append(float(x) if isinstance(x, (int, float)) and x is not None else float("nan"))
    return vals


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """The two-sample KS statistic D = max |F_a(x) - F_b(x)| (scipy's ks_2samp statistic)."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(list(a), list(b)).statistic)


def summary_intervals(records: Sequence[Record], point: Mapping[str, Any],
                      aggregate: Callable[[Sequence[Record]], Mapping[str, float]],
                      reference_ratios: Mapping[int, float] | None = None,
                      forget_ratio: Callable[[Record], float] | None = None,
                      n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL,
                      skip_splits: Sequence[str] = ("holdout",)) -> dict[str, Any]:
    """`<key>_ci: [lo, hi]` for every finite CI_KEYS number of `point`, plus the KS statistic and its interval.

    `aggregate(records)` recomputes the summary numbers (the evaluation's own aggregation);
    `reference_ratios` maps forget indices to the retain model's truth ratios and
    `forget_ratio(record)` gives a forget record's own truth ratio (both needed for D). The
    `skip_splits` (holdout: it feeds only the membership-inference AUCs, which get no interval)
    are left out of the resamples, which keeps 1000 of them near a second.
    """
    records = [r for r in records if r["split"] not in skip_splits]
    keys = [k for k in CI_KEYS if isinstance(point.get(k), (int, float)) and math.isfinite(point[k])]
    vals = bootstrap(records, aggregate, keys, n_boot, seed)
    out: dict[str, Any] = {f"{k}_ci": list(percentile_interval(vals[k], level)) for k in keys}
    forget = [r for r in records if r["split"] == "forget"]
    if reference_ratios is not None and forget_ratio is not None and forget:
        own = [forget_ratio(r) for r in forget]
        ref = [reference_ratios[r["index"]] for r in forget]
        out["forget_ks_statistic"] = ks_statistic(own, ref)
        rng = np.random.default_rng(seed)
        ds = []
        for _ in range(n_boot):
            k = rng.integers(0, len(forget), len(forget))
            ds.append(ks_statistic([own[i] for i in k], [ref[i] for i in k]))
        out["forget_ks_statistic_ci"] = list(percentile_interval(ds, level))
    out["ci_method"] = (f"{int(level * 100)}% percentile bootstrap over questions: {n_boot} resamples, seed {seed}, "
                        "stratified by split, forget and paraphrased forget resampled together; forget quality (a "
                        "p-value) has none, forget_ks_statistic (KS D) is its effect size")
    return out


def tofu_intervals(records: Sequence[Record], point: Mapping[str, Any], reference=None,
                   n_boot: int = N_BOOT, seed: int = SEED) -> dict[str, Any]:
    """`summary_intervals` for a TOFU summary made by `metrics.summarize` (the evaluation's own aggregation),
    under the summary's metric convention."""
    from pmc_unlearn.evaluation import metrics as M

    if n_boot <= 0:
        return {"ci_method": "none (bootstrap turned off)"}
    convention = point.get("convention", M.DEFAULT_CONVENTION)
    records = M.with_scores(records, convention)  # once: each resample then keeps the scores

    def aggregate(rs):
        return M.summarize(rs, None, require_forget_quality=False, convention=convention)

    ratios = getattr(reference, "truth_ratios", None) if reference is not None else None
    return summary_intervals(records, point, aggregate, reference_ratios=ratios,
                             forget_ratio=(lambda r: M.truth_ratios([r], convention)[0]) if ratios else None,
                             n_boot=n_boot, seed=seed)
