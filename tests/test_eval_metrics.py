"""Golden tests of every aggregate and per-example score, with the arithmetic worked by hand."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from pmc_unlearn.evaluation import metrics as M
from pmc_unlearn.evaluation import scores as S

ln = math.log


# ----------------------------------------------------------------------------- truth ratio forms

def test_truth_ratio_is_geometric_mean_of_perturbed_over_paraphrase():
    # pert NLLs 1 and 3 -> mean 2 -> Pbar = e^-2; P(para) = e^-1; R = e^-2 / e^-1 = e^-1 = 0.367879...
    assert S.truth_ratio([1.0, 3.0], 1.0) == pytest.approx(math.exp(-1), rel=1e-12)
    # probabilities 0.25, 0.25 vs 0.5: R = 0.25 / 0.5 = 0.5
    assert S.truth_ratio([ln(4), ln(4)], ln(2)) == pytest.approx(0.5, rel=1e-12)


def test_forget_truth_ratio_min_r_inv_r():
    # R = 0.5, 2, 1, 0.25 -> min(R, 1/R) = 0.5, 0.5, 1, 0.25 -> mean = 2.25 / 4 = 0.5625
    assert M.forget_truth_ratio([0.5, 2.0, 1.0, 0.25]) == pytest.approx(0.5625)
    # R = 0 (paraphrase infinitely likelier) counts as 0, not a division error
    assert M.forget_truth_ratio([0.0, 1.0]) == pytest.approx(0.5)


def test_true_better_truth_ratio_max_0_1_minus_r():
    # R = 0.5, 2, 1, 0.25 -> max(0, 1 - R) = 0.5, 0, 0, 0.75 -> mean = 1.25 / 4 = 0.3125
    assert M.true_better_truth_ratio([0.5, 2.0, 1.0, 0.25]) == pytest.approx(0.3125)


def test_normalised_prob():
    # P(a) = 0.5, perturbed 0.25 + 0.25 -> 0.5 / (0.5 + 0.5) = 0.5
    assert S.normalised_prob(ln(2), [ln(4), ln(4)]) == pytest.approx(0.5)
    # P(a) = 0.6, perturbed 0.2 + 0.2 -> 0.6 / 1.0 = 0.6
    assert S.normalised_prob(-ln(0.6), [-ln(0.2), -ln(0.2)]) == pytest.approx(0.6)
    # tiny probabilities (NLL 800 = e^-800 underflows) stay exact through the log-space shift: 1 / (1 + 2) = 1/3
    assert S.normalised_prob(800.0, [800.0, 800.0]) == pytest.approx(1 / 3)


def test_prob_is_exp_minus_nll():
    assert M.prob(ln(4)) == pytest.approx(0.25)


# ----------------------------------------------------------------------------- KS and harmonic mean

def test_forget_quality_ks_pvalue():
    # Samples {1,2,3} vs {4,5,6}: D = 1; exact two-sided p = 2 / C(6,3) = 2 / 20 = 0.1
    assert M.forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    # {0.5, 2} vs {5, 6}: D = 1; p = 2 / C(4,2) = 2 / 6 = 1/3
    assert M.forget_quality([0.5, 2.0], [5.0, 6.0]) == pytest.approx(1 / 3)
    # identical samples: D = 0, p = 1
    assert M.forget_quality([0.5, 2.0], [0.5, 2.0]) == pytest.approx(1.0)


def test_model_utility_harmonic_mean_of_nine():
    # eight 1s and one 0.5: 9 / (8 * 1 + 1 / 0.5) = 9 / 10 = 0.9
    assert M.model_utility([1.0] * 8 + [0.5]) == pytest.approx(0.9)
    # a zero anywhere makes the harmonic mean 0
    assert M.model_utility([1.0] * 8 + [0.0]) == 0.0
    with pytest.raises(ValueError):
        M.model_utility([1.0] * 8)


# ----------------------------------------------------------------------------- PMC family

def test_unlearn_quality_and_utility():
    # UQ = 100 * (2 - 0.2 - 0.4) / 2 = 100 * 1.4 / 2 = 70
    assert M.unlearn_quality(0.2, 0.4) == pytest.approx(70.0)
    # U = 100 * (0.9 + 0.6 + 0.3) / 3 = 100 * 1.8 / 3 = 60
    assert M.utility(0.9, 0.6, 0.3) == pytest.approx(60.0)


# ----------------------------------------------------------------------------- memorisation

def test_exact_memorization_and_extraction_strength():
    # predictions 5 6 7 8 vs answer 5 0 7 8: 3 of 4 match -> EM = 0.75
    assert S.exact_memorization([5, 6, 7, 8], [5, 0, 7, 8]) == pytest.approx(0.75)
    # the suffix from position 2 matches, position 1 does not -> k = 2 -> ES = 1 - 2/4 = 0.5
    assert S.extraction_strength([5, 6, 7, 8], [5, 0, 7, 8]) == pytest.approx(0.5)
    # everything matches -> k = 0 -> ES = 1
    assert S.extraction_strength([1, 2, 3], [1, 2, 3]) == 1.0
    # the last prediction is wrong -> only the empty suffix matches: k = n -> ES = 0
    assert S.extraction_strength([1, 2, 9], [1, 2, 3]) == 0.0


# ----------------------------------------------------------------------------- MIA scores

def test_min_k_lowest_ceil_k_t():
    # T = 5, k = 0.4: ceil(2.0) = 2 lowest log-probs -5, -4 -> -mean = 4.5
    assert S.min_k_score([-1.0, -2.0, -3.0, -4.0, -5.0]) == pytest.approx(4.5)
    # T = 3: ceil(1.2) = 2 lowest -3, -2 -> 2.5
    assert S.min_k_score([-1.0, -2.0, -3.0]) == pytest.approx(2.5)
    # T = 15: 0.4 * 15 = 6.000000000000001 in floating point, still 6 tokens: -(-15-...-10)/6 = 12.5
    assert S.min_k_score([-float(i) for i in range(1, 16)]) == pytest.approx(12.5)


def test_min_k_plus_plus_on_hand_made_logits():
    # V = 2, three positions. logits [ln 3, 0] give p = (0.75, 0.25).
    # For a two-token distribution with log-probs a > b (prob p of a):
    #   mu = p a + (1-p) b, var = p (1-p) (a - b)^2, so
    #   z(b) = (b - mu) / sigma = -sqrt(p / (1-p)) = -sqrt(3), z(a) = +sqrt((1-p)/p) = 1/sqrt(3).
    logits = torch.tensor([[ln(3), 0.0], [ln(3), 0.0], [0.0, ln(3)]])
    targets = torch.tensor([1, 0, 1])  # probabilities 0.25, 0.75, 0.75
    mu, var = S.vocab_moments(logits)
    # mu = 0.75 ln 0.75 + 0.25 ln 0.25 = -0.562335; var = 0.75 * 0.25 * (ln 3)^2 = 0.226300
    assert mu[0].item() == pytest.approx(0.75 * ln(0.75) + 0.25 * ln(0.25), abs=1e-6)
    assert var[0].item() == pytest.approx(0.1875 * ln(3) ** 2, abs=1e-6)
    lp = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    # z = (-sqrt3, 1/sqrt3, 1/sqrt3); k = 0.4, T = 3 -> 2 lowest: (-sqrt3 + 1/sqrt3) / 2 = -1/sqrt3 -> score 1/sqrt3
    assert S.min_k_plus_plus_score(lp, mu, var) == pytest.approx(1 / math.sqrt(3), abs=1e-5)
    # Min-K on the same: 2 lowest log-probs ln 0.25, ln 0.75 -> -(ln 0.25 + ln 0.75) / 2 = 0.836988
    assert S.min_k_score(lp) == pytest.approx(-(ln(0.25) + ln(0.75)) / 2, abs=1e-6)
    # a uniform position has variance 0: clamped at 1e-6 (sigma 1e-3), z = 0 instead of NaN
    mu0, var0 = S.vocab_moments(torch.zeros(1, 2))
    assert S.min_k_plus_plus_score([-ln(2)], mu0, var0) == pytest.approx(0.0, abs=1e-3)


def test_zlib_score():
    # zlib.compress(b"aaaa") is 12 bytes (2 header + 6 deflate + 4 adler32): 2.0 / 12
    assert len(zlib.compress(b"aaaa")) == 12
    assert S.zlib_score(2.0, "aaaa") == pytest.approx(2.0 / 12)


def test_mia_auc_direction():
    # forget = 0, holdout = 1, scores "higher = non-member" (NLL). A model that memorised the
    # forget set has lower forget NLL: every (forget, holdout) pair is ordered -> AUC = 1.
    assert M.mia_auc([1.0, 2.0], [3.0, 4.0]) == 1.0
    assert M.mia_auc([3.0, 4.0], [1.0, 2.0]) == 0.0
    # interleaved: pairs with forget < holdout: (1,2), (1,4), (3,4) -> 3 of 4 = 0.75
    assert M.mia_auc([1.0, 3.0], [2.0, 4.0]) == pytest.approx(0.75)


def test_privleak_sign_convention():
    # memorised: AUC 1 -> AUC' = 0; no retain model -> AUC'_retain = 0.5: (0 - 0.5) / 0.5 * 100 = -100
    assert M.privleak(1.0) == pytest.approx(-100.0)
    # indistinguishable: AUC 0.5 -> 0
    assert M.privleak(0.5) == pytest.approx(0.0)
    # retain AUC 0.6 -> AUC'_retain 0.4; model AUC 0.3 -> AUC' 0.7: (0.7 - 0.4) / 0.4 * 100 = 75
    assert M.privleak(0.3, 0.6) == pytest.approx(75.0)
    # a reference with AUC 1 (AUC'_retain = 0): undefined, NaN (reported as null), never a crash
    import math

    assert math.isnan(M.privleak(0.3, 1.0))


# ----------------------------------------------------------------------------- whole summary

def _rec(split, index, **kw):
    return {"split": split, "index": index, "question": f"{split} q{index}", "answer": "a", **kw}


def hand_records():
    mia = lambda x: {f"mia_{a}": x for a in M.MIA_ATTACKS}  # noqa: E731
    return [
        # forget: R0 = 0.25 / 0.5 = 0.5, R1 = 0.5 / 0.25 = 2
        _rec("forget", 0, nll=ln(2), para_nll=ln(2), pert_nll=[ln(4), ln(4)], rougeL_recall=1.0, em=1.0, es=1.0, **mia(1.0)),
        _rec("forget", 1, nll=ln(4), para_nll=ln(4), pert_nll=[ln(2), ln(2)], rougeL_recall=0.5, em=0.5, es=0.0, **mia(2.0)),
        _rec("forget_para", 0, rougeL_recall=0.25),
        _rec("forget_para", 1, rougeL_recall=0.25),
        # retain: R0 = 0.25 / 0.5 = 0.5 -> 0.5; R1 = 0.5 / 0.25 = 2 -> 0
        _rec("retain", 0, nll=ln(2), para_nll=ln(2), pert_nll=[ln(4)], rougeL_recall=1.0),
        _rec("retain", 1, nll=ln(2), para_nll=ln(4), pert_nll=[ln(2)], rougeL_recall=0.5),
        # real authors: P = 0.5 vs 0.25, 0.25 -> normalised 0.5; R = 0.25 / 0.5 = 0.5 -> 0.5
        _rec("real_authors", 0, nll=ln(2), pert_nll=[ln(4), ln(4)], rougeL_recall=0.5),
        # world facts: P = 0.6 vs 0.2, 0.2 -> normalised 0.6; R = 0.2 / 0.6 = 1/3 -> 2/3
        _rec("world_facts", 0, nll=-ln(0.6), pert_nll=[-ln(0.2), -ln(0.2)], rougeL_recall=1.0),
        _rec("holdout", 0, nll=3.0, **mia(3.0)),
        _rec("holdout", 1, nll=4.0, **mia(4.0)),
    ]


def test_summary_golden():
    ref = M.RetainReference(truth_ratios={0: 5.0, 1: 6.0}, origin="hand", min_k_auc=0.5)
    s = M.summarize(hand_records(), ref)
    # forget truth ratio: mean(min(0.5, 2), min(2, 0.5)) = 0.5
    assert s["forget_truth_ratio"] == pytest.approx(0.5)
    # forget prob: mean(0.5, 0.25) = 0.375; forget ROUGE: mean(1, 0.5) = 0.75
    assert s["forget_prob"] == pytest.approx(0.375)
    assert s["forget_rougeL_recall"] == pytest.approx(0.75)
    # UQ = 100 * (2 - 0.75 - 0.25) / 2 = 50
    assert s["unlearn_quality"] == pytest.approx(50.0)
    # U = 100 * (retain 0.75 + world facts 1.0 + real authors 0.5) / 3 = 75
    assert s["utility"] == pytest.approx(75.0)
    assert s["retain_truth_ratio"] == pytest.approx(0.25)
    assert s["real_authors_prob"] == pytest.approx(0.5)
    assert s["world_facts_prob"] == pytest.approx(0.6)
    assert s["world_facts_truth_ratio"] == pytest.approx(2 / 3)
    # MU = hmean(0.5, 0.75, 0.25, 0.5, 0.5, 0.5, 0.6, 1.0, 2/3)
    #    = 9 / (2 + 4/3 + 4 + 2 + 2 + 2 + 5/3 + 1 + 1.5) = 9 / 17.5 = 0.5142857
    assert s["model_utility"] == pytest.approx(9 / 17.5)
    # FQ = KS({0.5, 2} vs {5, 6}).pvalue = 1/3
    assert s["forget_quality"] == pytest.approx(1 / 3)
    # EM = mean(1, 0.5) = 0.75; ES = mean(1, 0) = 0.5
    assert s["exact_memorization"] == pytest.approx(0.75)
    assert s["extraction_strength"] == pytest.approx(0.5)
    # forget scores 1, 2 below holdout 3, 4 -> AUC 1 -> PrivLeak vs retain AUC 0.5 = -100
    assert s["mia_min_k_auc"] == 1.0 and s["mia_loss_auc"] == 1.0
    assert s["privleak"] == pytest.approx(-100.0)


def test_summary_without_reference_is_explicit():
    with pytest.raises(ValueError):
        M.summarize(hand_records(), None)
    s = M.summarize(hand_records(), None, require_forget_quality=False)
    assert s["forget_quality"] is None and s["privleak"] is None
    assert "retain" in s["forget_quality_note"]
    assert s["privleak_default_reference"] == pytest.approx(-100.0)


def test_reference_min_k_auc_uses_the_same_examples():
    # the retain model's own scores on the same indices: forget 2, 1 vs holdout 1.5, 3 ->
    # pairs forget < holdout: (2,3), (1,1.5), (1,3) = 3 of 4 = 0.75
    ref = M.RetainReference(truth_ratios={0: 1.0, 1: 1.0}, origin="hand", min_k_auc=0.9,
                            min_k_scores={"forget": {0: 2.0, 1: 1.0}, "holdout": {0: 1.5, 1: 3.0}})
    assert M.reference_min_k_auc(ref, [0, 1], [0, 1]) == pytest.approx(0.75)
    # examples it does not hold: falls back to its overall AUC
    assert M.reference_min_k_auc(ref, [0, 5], [0, 1]) == pytest.approx(0.9)


def test_pmc_utility_uses_the_drawn_retain_sample_when_present():
    # with a "retain_sample" split (--retain-sample rng400) U uses it instead of retain_perturbed:
    # U = 100 * (sample 0.0 + world facts 1.0 + real authors 0.5) / 3 = 50; MU still uses retain_perturbed
    recs = hand_records() + [_rec("retain_sample", 0, rougeL_recall=0.0)]
    s = M.summarize(recs, None, require_forget_quality=False)
    assert s["utility"] == pytest.approx(50.0)
    assert s["model_utility"] == pytest.approx(9 / 17.5)
