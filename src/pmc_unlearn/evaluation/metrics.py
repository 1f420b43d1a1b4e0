"""Aggregate per-example records into the TOFU numbers: pure functions, no model, no files.

Every definition follows docs/metrics.md, under one of two conventions (`scores.CONVENTIONS`:
open-unlearning, the default, or pmc-unlearn; docs/metrics.md lists what differs). The input is
the list of record dicts that `records.collect_records` writes to records.jsonl (one per split and example);
`summarize` returns the flat summary.json object minus the run settings, which `api.evaluate` adds.

Record fields read here (see scoring.py and records.py for the producer):
  split, index, question, answer,
  nll (token-mean NLL of the answer), para_nll, pert_nll (list),
  tok_lp, tok_hit, tok_z, zlib_bytes_answer, zlib_bytes_labels (per-token lists and sizes, from
  which `with_scores` derives the next line under a convention), or directly
  em, es, mia_loss, mia_zlib, mia_min_k, mia_min_k_plus_plus,
  rougeL_recall, gen_hit_limit.

MIA direction: scores are "higher = less likely a member" (an NLL), labels are forget = 0 and
holdout = 1, so a model that still knows the forget set (low forget NLL) gives AUC near 1, a
model that never saw it about 0.5. PrivLeak turns this round with AUC' = 1 - AUC: about -100
for a model that knows the forget set, 0 for one that matches the retain model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pmc_unlearn.evaluation import scores
from pmc_unlearn.evaluation.scores import DEFAULT_CONVENTION, OPEN_UNLEARNING, OU_EPS, PMC_UNLEARN

Record = dict

# Split names used in records (suite.tofu_suite builds them).
FORGET = "forget"
FORGET_PARA = "forget_para"
RETAIN = "retain"
RETAIN_SAMPLE = "retain_sample"
REAL_AUTHORS = "real_authors"
WORLD_FACTS = "world_facts"
HOLDOUT = "holdout"
SPLIT_ORDER = (FORGET, FORGET_PARA, RETAIN, RETAIN_SAMPLE, REAL_AUTHORS, WORLD_FACTS, HOLDOUT)
MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
TOKEN_FIELDS = ("tok_lp", "tok_hit", "tok_z")  # per-token lists the per-example scores derive from
DERIVED_FIELDS = ("em", "es") + tuple(f"mia_{a}" for a in MIA_ATTACKS)
LEGACY_CONVENTION = PMC_UNLEARN  # records of schema 1 (no per-token lists) were scored this way
DEFAULT_REF_AUC_PRIME = 0.5  # PrivLeak's AUC'_retain when no retain model is given


# ----------------------------------------------------------------------------- small pieces

def mean(xs: Iterable[float | None]) -> float:
    """Mean of the values that are not None (open-unlearning leaves an EM without tokens out); NaN if none."""
    a = np.asarray([x for x in xs if x is not None], dtype=np.float64)
    return float(a.mean()) if a.size else float("nan")


def prob(nll: float) -> float:
    """P(a | q) = exp(-avg_nll): the per-token geometric mean probability."""
    return math.exp(-float(nll))


def forget_truth_ratio(ratios: Sequence[float], convention: str = PMC_UNLEARN) -> float:
    """mean_i min(R_i, 1/R_i): 1 when the model cannot tell true from false answers (the goal on forget).

    open-unlearning: mean_i min(R_i, 1/(R_i + 1e-10)).
    """
    r = np.asarray(ratios, dtype=np.float64)
    if scores.check_convention(convention) == OPEN_UNLEARNING:
        return float(np.minimum(r, 1.0 / (r + OU_EPS)).mean())
    with np.errstate(divide="ignore"):
        inv = np.where(r > 0, 1.0 / np.where(r > 0, r, 1.0), np.inf)
    return float(np.minimum(r, inv).mean())


def true_better_truth_ratio(ratios: Sequence[float]) -> float:
    """mean_i max(0, 1 - R_i): high when the true answer is much likelier than the perturbed ones."""
    r = np.asarray(ratios, dtype=np.float64)
    return float(np.maximum(0.0, 1.0 - r).mean())


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean of the nine utility numbers (scipy.stats.hmean; 0 if any is 0)."""
    from scipy.stats import hmean

    v = np.asarray(values, dtype=np.float64)
    if v.size != 9:
        raise ValueError(f"model utility needs 9 numbers, got {v.size}")
    if np.isnan(v).any():
        return float("nan")
    return float(hmean(v))


def forget_quality(ratios: Sequence[float], retain_ratios: Sequence[float]) -> float:
    """p-value of the two-sample KS test between this model's and the retain model's forget truth ratios."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(np.asarray(ratios, float), np.asarray(retain_ratios, float)).pvalue)


def unlearn_quality(r_forget: float, r_forget_para: float) -> float:
    """PMC family: 100 * (2 - R(forget) - R(paraphrased forget)) / 2, higher is better."""
    return 100.0 * (2.0 - r_forget - r_forget_para) / 2.0


def utility(r_retain: float, r_world_facts: float, r_real_authors: float) -> float:
    """PMC family: 100 * mean(R(retain sample), R(world_facts), R(real_authors))."""
    return 100.0 * (r_retain + r_world_facts + r_real_authors) / 3.0


def mia_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """ROC AUC with forget = 0, holdout = 1 on "higher = non-member" scores (memorised forget set -> 1)."""
    from sklearn.metrics import roc_auc_score

    f, h = list(forget_scores), list(holdout_scores)
    if not f or not h:
        return float("nan")
    return float(roc_auc_score([0] * len(f) + [1] * len(h), f + h))


def privleak(auc_min_k: float, retain_auc_min_k: float | None = None, convention: str = PMC_UNLEARN) -> float:
    """(AUC' - AUC'_retain) / AUC'_retain * 100 with AUC' = 1 - AUC(Min-K%); AUC'_retain = 0.5 without a retain model.

    open-unlearning divides by AUC'_retain + 1e-10 (a huge number instead of NaN when AUC'_retain = 0).
    """
    a = 1.0 - auc_min_k
    ref = DEFAULT_REF_AUC_PRIME if retain_auc_min_k is None else 1.0 - retain_auc_min_k
    if scores.check_convention(convention) == OPEN_UNLEARNING:
        return (a - ref) / (ref + OU_EPS) * 100.0
    if ref == 0.0:  # a reference that separates forget from holdout perfectly: the ratio is undefined
        return float("nan")
    return (a - ref) / ref * 100.0


# ----------------------------------------------------------------------------- over records

def by_split(records: Iterable[Record]) -> dict[str, list[Record]]:
    """Records grouped by split, each list sorted by index."""
    out: dict[str, list[Record]] = {}
    for r in records:
        out.setdefault(r["split"], []).append(r)
    for v in out.values():
        v.sort(key=lambda r: r["index"])
    return out


def rouge_mean(recs: Sequence[Record]) -> float:
    """R(S): mean ROUGE-L recall of the greedy generations."""
    return mean(r["rougeL_recall"] for r in recs)


def prob_mean(recs: Sequence[Record], key: str = "nll") -> float:
    return mean(prob(r[key]) for r in recs)


def normalised_prob_mean(recs: Sequence[Record], convention: str = PMC_UNLEARN) -> float:
    return mean(scores.normalised_prob(r["nll"], r["pert_nll"], convention) for r in recs)


def truth_ratios(recs: Sequence[Record], convention: str = PMC_UNLEARN) -> list[float]:
    """R_i per record; the answer itself stands for the paraphrase when a record has no para_nll."""
    out = []
    for r in recs:
        para = r.get("para_nll")
        out.append(scores.truth_ratio(r["pert_nll"], r["nll"] if para is None else para, convention))
    return out


def records_convention(records: Iterable[Record]) -> str | None:
    """The convention the records' per-example scores are fixed in, or None when they can be re-derived.

    Records with the per-token lists can be scored under either convention (None). Records
    without them but with scores carry them as computed: under their `convention` field, or, for
    records of schema 1 (written before conventions existed), under pmc-unlearn's definitions.
    Records with neither (hand-made, or splits without EM/MIA scores) return None.
    """
    fixed = set()
    for r in records:
        if "tok_lp" in r or not any(k in r for k in DERIVED_FIELDS):
            continue
        fixed.add(r.get("convention") or LEGACY_CONVENTION if "key" in r else r.get("convention"))
    fixed.discard(None)
    if len(fixed) > 1:
        raise ValueError(f"records mix conventions {sorted(fixed)}")
    return fixed.pop() if fixed else None


def with_scores(records: Iterable[Record], convention: str = DEFAULT_CONVENTION) -> list[Record]:
    """Copies of the records with em, es and mia_* derived under `convention` and `convention` set.

    Records holding the per-token lists (`tok_lp`, `tok_hit`, `tok_z`) get their scores (re)computed;
    others keep theirs (ValueError if those were computed under another convention, see
    `records_convention`). Records without teacher-forced scores are copied with the tag only.
    Records already tagged with `convention` are passed through as they are (not copied): the
    bootstrap aggregates many resamples of the same scored records.
    """
    scores.check_convention(convention)
    records = list(records)
    fixed = records_convention(records)
    if fixed is not None and fixed != convention:
        raise ValueError(f"these records hold per-example scores of the {fixed} convention and no per-token "
                         f"log-probs to recompute them under {convention}")
    out = []
    for r in records:
        if r.get("convention") == convention:
            out.append(r)
            continue
        r = dict(r)
        if all(k in r for k in TOKEN_FIELDS):
            r.update(scores.example_scores(r["tok_lp"], r["tok_hit"], r["tok_z"], r["nll"],
                                           r["zlib_bytes_answer"], r["zlib_bytes_labels"], convention))
        r["convention"] = convention
        out.append(r)
    return out


@dataclass
class RetainReference:
    """What forget quality and PrivLeak need from the retain model (see reference.py for loading).

    truth_ratios: R_i of the retain model on the forget questions, by forget index.
    questions: the forget questions by index, when the source holds them (used to refuse mismatches).
    min_k_auc: the retain model's Min-K% AUC (forget vs holdout), when known.
    convention: the convention its truth ratios and Min-K% numbers follow (`reference.read_reference`
    converts records to the one asked for, and refuses what it cannot convert).
    """

    truth_ratios: dict[int, float]
    origin: str
    convention: str = DEFAULT_CONVENTION
    forget_split: str | None = None
    questions: dict[int, str] | None = None
    min_k_auc: float | None = None
    min_k_scores: dict[str, dict[int, float]] = field(default_factory=dict)  # split -> index -> score


def reference_min_k_auc(ref: RetainReference, forget_idx: Sequence[int], holdout_idx: Sequence[int]) -> float | None:
    """The retain model's Min-K% AUC on the same forget/holdout examples when its records hold them, else its own AUC."""
    f, h = ref.min_k_scores.get(FORGET, {}), ref.min_k_scores.get(HOLDOUT, {})
    if f and h and all(i in f for i in forget_idx) and all(i in h for i in holdout_idx):
        return mia_auc([f[i] for i in forget_idx], [h[i] for i in holdout_idx])
    return ref.min_k_auc


def summarize(
    records: Sequence[Record],
    reference: RetainReference | None = None,
    *,
    require_forget_quality: bool = True,
    convention: str = DEFAULT_CONVENTION,
) -> dict:
    """The summary numbers of both families from per-example records (flat dict; NaN where a split is missing).

    Per-example scores are derived under `convention` (`with_scores`); a reference of another
    convention is refused (ValueError): `reference.read_reference` converts what it can.
    """
    scores.check_convention(convention)
    if reference is not None and reference.convention != convention:
        raise ValueError(f"the retain reference {reference.origin} follows the {reference.convention} convention, "
                         f"this summary {convention}")
    records = with_scores(records, convention)
    s = by_split(records)
    get = lambda name: s.get(name, [])  # noqa: E731
    forget, para, retain = get(FORGET), get(FORGET_PARA), get(RETAIN)
    ra, wf, hold = get(REAL_AUTHORS), get(WORLD_FACTS), get(HOLDOUT)
    sample = get(RETAIN_SAMPLE) or retain  # the PMC retain sample; TOFU's retain_perturbed when not drawn
    out: dict = {"convention": convention}

    # Family 1 (PMC paper)
    out["forget_rougeL_recall"] = rouge_mean(forget)
    out["forget_para_rougeL_recall"] = rouge_mean(para)
    out["retain_sample_rougeL_recall"] = rouge_mean(sample)
    out["unlearn_quality"] = unlearn_quality(out["forget_rougeL_recall"], out["forget_para_rougeL_recall"])

    # Family 2 (TOFU / open-unlearning)
    out["forget_prob"] = prob_mean(forget)
    out["forget_para_prob"] = prob_mean(forget, "para_nll") if forget else float("nan")
    forget_tr = truth_ratios(forget, convention)
    out["forget_truth_ratio"] = forget_truth_ratio(forget_tr, convention) if forget else float("nan")
    out["retain_prob"] = prob_mean(retain)
    out["retain_rougeL_recall"] = rouge_mean(retain)
    out["retain_truth_ratio"] = true_better_truth_ratio(truth_ratios(retain, convention)) if retain else float("nan")
    for name, recs in ((REAL_AUTHORS, ra), (WORLD_FACTS, wf)):
        out[f"{name}_prob"] = normalised_prob_mean(recs, convention) if recs else float("nan")
        out[f"{name}_prob_raw"] = prob_mean(recs)
        out[f"{name}_rougeL_recall"] = rouge_mean(recs)
        out[f"{name}_truth_ratio"] = true_better_truth_ratio(truth_ratios(recs, convention)) if recs else float("nan")
    out["utility"] = utility(out["retain_sample_rougeL_recall"], out["world_facts_rougeL_recall"],
                             out["real_authors_rougeL_recall"])
    out["model_utility"] = model_utility([out[f"{n}_{m}"] for n in (RETAIN, REAL_AUTHORS, WORLD_FACTS)
                                          for m in ("prob", "rougeL_recall", "truth_ratio")])

    # Memorisation and membership inference
    out["exact_memorization"] = mean(r["em"] for r in forget)
    out["extraction_strength"] = mean(r["es"] for r in forget)
    for attack in MIA_ATTACKS:
        out[f"mia_{attack}_auc"] = mia_auc([r[f"mia_{attack}"] for r in forget], [r[f"mia_{attack}"] for r in hold])

    # Forget quality and PrivLeak need the retain model
    if reference is not None:
        missing = [r["index"] for r in forget if r["index"] not in reference.truth_ratios]
        if missing:
            raise ValueError(f"retain reference lacks forget indices {missing[:5]}")
        out["forget_quality"] = forget_quality(forget_tr, [reference.truth_ratios[r["index"]] for r in forget])
        ref_auc = reference_min_k_auc(reference, [r["index"] for r in forget], [r["index"] for r in hold])
        out["privleak"] = privleak(out["mia_min_k_auc"], ref_auc, convention)
        out["privleak_reference"] = (f"retain model Min-K AUC {ref_auc:.4f}" if ref_auc is not None
                                     else "AUC'_retain = 0.5 (the retain records hold no Min-K% AUC)")
        out["retain_reference"] = reference.origin
    else:
        if require_forget_quality:
            raise ValueError("forget quality needs the retain model's records")
        out["forget_quality"] = None
        out["privleak"] = None
        out["privleak_default_reference"] = privleak(out["mia_min_k_auc"], None, convention)
        out["forget_quality_note"] = (
            "forget_quality and privleak are null: no retain-model records were given (--no-forget-quality). "
            "Forget quality compares this model's forget truth ratios with the retain model's; pass "
            "--retain-records to compute it. privleak_default_reference uses AUC'_retain = 0.5 instead."
        )

    # Signals of silent failure: generations cut at the token limit, answers cut at max_length
    for name, recs in s.items():
        gen = [r for r in recs if "gen_hit_limit" in r]
        if gen:
            out[f"gen_hit_limit_frac_{name}"] = mean(float(r["gen_hit_limit"]) for r in gen)
        trunc = [r for r in recs if "truncated" in r]
        if trunc:
            out[f"truncated_frac_{name}"] = mean(float(r["truncated"]) for r in trunc)
    return out
