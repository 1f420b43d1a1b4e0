"""Bootstrap intervals over questions (pmc_unlearn.evaluation.intervals): hand-worked cases."""

import numpy as np
import pytest

from pmc_unlearn.evaluation import intervals as I


def mean_of(split):
    return lambda recs: {"m": float(np.mean([r["v"] for r in recs if r["split"] == split]))}


def recs(split, values, start=0):
    return [{"split": split, "index": start + i, "v": v} for i, v in enumerate(values)]


def test_percentile_interval_is_an_empirical_quantile():
    # inverted CDF: the 25% quantile of 1,2,3,4 is 1 (F(1) = 0.25), the 75% one is 3
    assert I.percentile_interval([4, 1, 3, 2], level=0.5) == (1.0, 3.0)
    assert I.percentile_interval([7.0] * 5) == (7.0, 7.0)
    lo, hi = I.percentile_interval([])
    assert np.isnan(lo) and np.isnan(hi)
    assert I.percentile_interval([1.0, float("nan"), 3.0], level=0.0) == (1.0, 1.0)  # NaN left out


def test_two_values_give_their_range():
    """Mean of a resample of {0, 1}: 0 (p 1/4), 0.5 (1/2), 1 (1/4): the 2.5% and 97.5% quantiles are 0 and 1."""
    v = I.bootstrap(recs("forget", [0.0, 1.0]), mean_of("forget"), ["m"], n_boot=4000, seed=1)["m"]
    assert I.percentile_interval(v) == (0.0, 1.0)
    assert sorted(set(v)) == [0.0, 0.5, 1.0]
    assert np.mean(np.array(v) == 0.5) == pytest.approx(0.5, abs=0.03)


def test_three_values_hand_worked():
    """{0, 0, 3}: a resample's mean is k (k threes drawn, binomial(3, 1/3)): P = 8/27, 12/27, 6/27, 1/27.

    P(mean <= 2) = 26/27 = 0.963 < 0.975, so the upper bound is 3; P(mean = 0) = 0.296 > 0.025, so the lower is 0.
    """
    v = I.bootstrap(recs("retain", [0.0, 0.0, 3.0]), mean_of("retain"), ["m"], n_boot=20000, seed=0)["m"]
    assert I.percentile_interval(v) == (0.0, 3.0)
    freq = {k: np.mean(np.array(v) == k) for k in (0.0, 1.0, 2.0, 3.0)}
    for k, p in zip((0.0, 1.0, 2.0, 3.0), (8 / 27, 12 / 27, 6 / 27, 1 / 27)):
        assert freq[k] == pytest.approx(p, abs=0.01)


def test_constant_is_a_point_and_a_seed_reproduces():
    r = recs("forget", [0.25] * 6)
    assert I.percentile_interval(I.bootstrap(r, mean_of("forget"), ["m"], n_boot=50)["m"]) == (0.25, 0.25)  # (0.25: exact in binary, so the mean is too)
    r = recs("forget", [0.1, 0.5, 0.9, 0.3, 0.7])
    a = I.bootstrap(r, mean_of("forget"), ["m"], n_boot=200, seed=3)["m"]
    b = I.bootstrap(r, mean_of("forget"), ["m"], n_boot=200, seed=3)["m"]
    c = I.bootstrap(r, mean_of("forget"), ["m"], n_boot=200, seed=4)["m"]
    assert a == b and a != c


def test_resample_keeps_split_sizes_and_pairs_forget_with_its_paraphrase():
    rng = np.random.default_rng(0)
    r = recs("forget", [0, 1, 2, 3]) + recs("forget_para", [10, 11, 12, 13]) + recs("retain", [5, 6, 7], start=100)
    for _ in range(20):
        out = I.resample(r, rng)
        f = [x["index"] for x in out if x["split"] == "forget"]
        p = [x["index"] for x in out if x["split"] == "forget_para"]
        assert len(f) == 4 and f == p  # the same questions, in the same order
        assert len([x for x in out if x["split"] == "retain"]) == 3


def test_summary_intervals_and_the_ks_statistic():
    """D of {0.1,0.2,0.3} vs {0.6,0.7,0.8}: the distributions do not overlap, so D = 1 in every resample."""
    r = [{"split": "forget", "index": i, "tr": t} for i, t in enumerate([0.1, 0.2, 0.3])]
    agg = lambda rs: {"forget_truth_ratio": float(np.mean([x["tr"] for x in rs]))}  # noqa: E731
    out = I.summary_intervals(r, {"forget_truth_ratio": 0.2, "utility": float("nan")}, agg,
                              reference_ratios={0: 0.6, 1: 0.7, 2: 0.8}, forget_ratio=lambda x: x["tr"], n_boot=300)
    lo, hi = out["forget_truth_ratio_ci"]
    assert 0.1 <= lo <= 0.2 <= hi <= 0.3
    assert "utility_ci" not in out  # not finite in the point estimate: no interval
    assert out["forget_ks_statistic"] == 1.0 and out["forget_ks_statistic_ci"] == [1.0, 1.0]
    assert "p-value" in out["ci_method"] and "seed 0" in out["ci_method"]


def test_evaluation_summary_has_intervals(tmp_path):
    """`pmc-unlearn eval` on tiny-random: each headline number sits inside its interval; the retain model's own
    records as reference give forget quality 1 and KS D = 0 in every resample."""
    import json

    from pmc_unlearn.cli import main

    out = tmp_path / "ev"
    args = ["eval", "--model", "tiny-random", "--forget-split", "forget01", "--max-examples", "6",
            "--max-new-tokens", "4", "--batch-size", "8", "--no-cache", "--dtype", "float32", "--bootstrap", "200"]
    assert main([*args, "--no-forget-quality", "--output", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    for k in ("unlearn_quality", "utility", "model_utility", "forget_rougeL_recall", "retain_rougeL_recall",
              "forget_truth_ratio", "retain_truth_ratio"):
        lo, hi = s[f"{k}_ci"]
        assert lo <= s[k] + 1e-9 and s[k] - 1e-9 <= hi, k
    assert "forget_quality_ci" not in s and "200 resamples" in s["ci_method"]
    assert main([*args, "--retain-records", str(out), "--output", str(tmp_path / "self")]) == 0
    s = json.loads((tmp_path / "self" / "summary.json").read_text())
    assert s["forget_quality"] == pytest.approx(1.0) and s["forget_ks_statistic_ci"] == [0.0, 0.0]
    assert main([*args[:-2], "--bootstrap", "-1", "--no-forget-quality", "--output", str(tmp_path / "x")]) == 2
