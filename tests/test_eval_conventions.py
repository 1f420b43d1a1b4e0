"""The two metric conventions (open-unlearning, pmc-unlearn): golden values worked by hand.

Per-example: EOS on/off, Min-K% with a fractional 0.4 T, the extraction-strength edge case, a
collapsed model's truth ratio (per-token NLL 20-40). Aggregate: a small record set whose
open-unlearning numbers are written by hand in tests/data/TOFU_EVAL_hand.json, then the same
records under pmc-unlearn; references of the other convention converted or refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pmc_unlearn.errors import UserError
from pmc_unlearn.evaluation import export
from pmc_unlearn.evaluation import metrics as M
from pmc_unlearn.evaluation import scores as S
from pmc_unlearn.evaluation.reference import read_reference

OU, PMC = S.OPEN_UNLEARNING, S.PMC_UNLEARN
HAND = Path(__file__).parent / "data" / "TOFU_EVAL_hand.json"


# ----------------------------------------------------------------------------- per example

def test_default_convention_is_open_unlearning():
    assert S.DEFAULT_CONVENTION == OU and S.CONVENTIONS == (OU, PMC)
    with pytest.raises(ValueError):
        S.check_convention("tofu")


def test_eos_counted_or_dropped():
    # four answer tokens, the last the closing EOS: log p -1, -2, -0.5, -0.1; argmax hits 1, 0, 1, 1
    lp, hit, z = [-1.0, -2.0, -0.5, -0.1], [1, 0, 1, 1], [0.0, -1.0, 0.5, 2.0]
    pmc = S.example_scores(lp, hit, z, nll=0.9, zlib_bytes_answer=12, zlib_bytes_labels=13, convention=PMC)
    # pmc-unlearn, all 4 tokens: EM 3/4; ES: the suffix from position 2 hits, position 1 misses -> 1 - 2/4 = 0.5;
    # Min-K: ceil(1.6) = 2 lowest (-2, -1) -> 1.5; Min-K++: 2 lowest z (-1, 0) -> 0.5; ZLib 0.9 / 12 (answer text)
    assert pmc["em"] == pytest.approx(0.75) and pmc["es"] == pytest.approx(0.5)
    assert pmc["mia_min_k"] == pytest.approx(1.5) and pmc["mia_min_k_plus_plus"] == pytest.approx(0.5)
    assert pmc["mia_zlib"] == pytest.approx(0.9 / 12) and pmc["mia_loss"] == 0.9
    ou = S.example_scores(lp, hit, z, nll=0.9, zlib_bytes_answer=12, zlib_bytes_labels=13, convention=OU)
    # open-unlearning drops the EOS: 3 tokens -1, -2, -0.5, hits 1, 0, 1: EM 2/3; ES: k = 2 -> 1 - 2/3 = 1/3;
    # Min-K: max(1, int(1.2)) = 1 lowest (-2) -> 2.0; Min-K++: lowest z -1 -> 1.0; ZLib 0.9 / 13 (decoded tokens);
    # LOSS keeps every token in both (the record's NLL)
    assert ou["em"] == pytest.approx(2 / 3) and ou["es"] == pytest.approx(1 / 3)
    assert ou["mia_min_k"] == pytest.approx(2.0) and ou["mia_min_k_plus_plus"] == pytest.approx(1.0)
    assert ou["mia_zlib"] == pytest.approx(0.9 / 13) and ou["mia_loss"] == 0.9


def test_min_k_count_for_a_fractional_share():
    # T = 7: 0.4 T = 2.8 -> pmc-unlearn ceil = 3 lowest (-7, -6, -5): 6.0; open-unlearning int = 2 (-7, -6): 6.5
    lp = [-float(i) for i in range(1, 8)]
    assert S.min_k_score(lp, convention=PMC) == pytest.approx(6.0)
    assert S.min_k_score(lp, convention=OU) == pytest.approx(6.5)
    # T = 6 (0.4 T = 2.4000000000000004): ceil 3 (-6, -5, -4) -> 5.0; int 2 (-6, -5) -> 5.5
    assert S.min_k_score(lp[:6], convention=PMC) == pytest.approx(5.0)
    assert S.min_k_score(lp[:6], convention=OU) == pytest.approx(5.5)
    # T = 2: 0.8 -> ceil 1 and max(1, int 0) = 1: both take the lowest (-2)
    assert S.min_k_score([-1.0, -2.0], convention=PMC) == S.min_k_score([-1.0, -2.0], convention=OU) == 2.0
    # no tokens: NaN (pmc-unlearn) or open-unlearning's 0
    assert math.isnan(S.min_k_score([], convention=PMC)) and S.min_k_score([], convention=OU) == 0.0
    # through example_scores, open-unlearning first drops the EOS: 7 tokens -> 6 -> 2 lowest of -1..-6: 5.5
    ex = S.example_scores(lp, [1] * 7, lp, 4.0, 10, 10, OU)
    assert ex["mia_min_k"] == pytest.approx(5.5) and ex["mia_min_k_plus_plus"] == pytest.approx(5.5)


def test_extraction_strength_edge_cases():
    # the last prediction misses: pmc-unlearn k = n (empty suffix) -> 0; open-unlearning stops at k = n - 1 -> 1/n
    assert S.es_from_hits([1, 1, 0], PMC) == 0.0
    assert S.es_from_hits([1, 1, 0], OU) == pytest.approx(1 / 3)
    # a model that reproduces the answer but does not predict the EOS: pmc-unlearn ES 0 (the EOS is the
    # missed last token), open-unlearning ES 1 (the EOS is dropped, the 3 content tokens all hit)
    lp, z = [-0.1] * 4, [0.0] * 4
    assert S.example_scores(lp, [1, 1, 1, 0], z, 0.1, 5, 5, PMC)["es"] == 0.0
    assert S.example_scores(lp, [1, 1, 1, 0], z, 0.1, 5, 5, OU)["es"] == 1.0
    # hits 1 1 0 1 + EOS hit: pmc-unlearn on 5 tokens: suffix from 3 hits -> 1 - 3/5 = 0.4;
    # open-unlearning on 1 1 0 1: suffix from 3 -> 1 - 3/4 = 0.25
    assert S.example_scores([-0.1] * 5, [1, 1, 0, 1, 1], [0.0] * 5, 0.1, 5, 5, PMC)["es"] == pytest.approx(0.4)
    assert S.example_scores([-0.1] * 5, [1, 1, 0, 1, 1], [0.0] * 5, 0.1, 5, 5, OU)["es"] == pytest.approx(0.25)
    # an answer of the EOS alone: nothing left for open-unlearning: EM None (left out of the mean), ES 0, Min-K 0
    one = S.example_scores([-0.3], [1], [0.2], 0.3, 5, 5, OU)
    assert one["em"] is None and one["es"] == 0.0 and one["mia_min_k"] == 0.0 and one["mia_min_k_plus_plus"] == 0.0
    assert M.mean([None, 0.5, 1.0]) == pytest.approx(0.75)


def test_collapsed_model_truth_ratio():
    # A GA/GD-collapsed model: per-token NLL 20-40. Example 1: paraphrase NLL 30, perturbed 25, 35, 20, 40, 30
    # (mean 30). pmc-unlearn: R = exp(30 - 30) = 1. open-unlearning: e^-30 / (e^-30 + 1e-10)
    # = 9.3576e-14 / 1.00093576e-10 = 9.3489e-4: the epsilon, not the model, sets R.
    pert, para = [25.0, 35.0, 20.0, 40.0, 30.0], 30.0
    assert S.truth_ratio(pert, para, PMC) == pytest.approx(1.0)
    assert S.truth_ratio(pert, para, OU) == pytest.approx(9.3489e-4, rel=1e-4)
    # Example 2: paraphrase 20, perturbed mean 40. pmc-unlearn e^-20 = 2.0612e-9;
    # open-unlearning e^-40 / (e^-20 + 1e-10) = 4.2484e-18 / 2.1612e-9 = 1.9658e-9
    assert S.truth_ratio([40.0, 40.0], 20.0, PMC) == pytest.approx(2.0612e-9, rel=1e-4)
    assert S.truth_ratio([40.0, 40.0], 20.0, OU) == pytest.approx(1.9658e-9, rel=1e-4)
    # forget truth ratio over both: pmc-unlearn mean(min(1, 1), 2.0612e-9) = 0.5;
    # open-unlearning mean(9.3489e-4, 1.9658e-9) = 4.6745e-4
    r_pmc = [S.truth_ratio(pert, para, PMC), S.truth_ratio([40.0, 40.0], 20.0, PMC)]
    r_ou = [S.truth_ratio(pert, para, OU), S.truth_ratio([40.0, 40.0], 20.0, OU)]
    assert M.forget_truth_ratio(r_pmc, PMC) == pytest.approx(0.5, rel=1e-6)
    assert M.forget_truth_ratio(r_ou, OU) == pytest.approx(4.6745e-4, rel=1e-4)
    # the normalised probability of a collapsed answer: NLL 30 for the answer and two perturbed ones.
    # pmc-unlearn 1/3 exactly; open-unlearning e^-30 / (3 e^-30 + 1e-10) = 9.3576e-14 / 1.0028073e-10 = 9.3314e-4
    assert S.normalised_prob(30.0, [30.0, 30.0], PMC) == pytest.approx(1 / 3)
    assert S.normalised_prob(30.0, [30.0, 30.0], OU) == pytest.approx(9.3314e-4, rel=1e-4)


def test_privleak_epsilon():
    # retain AUC 0.6 (AUC' 0.4), model 0.3 (AUC' 0.7): (0.7 - 0.4) / 0.4 * 100 = 75 in both
    assert M.privleak(0.3, 0.6, OU) == pytest.approx(75.0) and M.privleak(0.3, 0.6, PMC) == pytest.approx(75.0)
    # a reference with AUC 1 (AUC' 0): NaN for pmc-unlearn, (0.7 - 0) / 1e-10 * 100 = 7e11 for open-unlearning
    assert math.isnan(M.privleak(0.3, 1.0, PMC))
    assert M.privleak(0.3, 1.0, OU) == pytest.approx(7e11)


# ----------------------------------------------------------------------------- a whole record set

def _rec(split, index, **kw):
    return {"split": split, "index": index, "question": f"{split} q{index}", "answer": f"{split} a{index}", **kw}


def _toks(lp, hit, z, zans, zlab):
    return {"tok_lp": lp, "tok_hit": hit, "tok_z": z, "zlib_bytes_answer": zans, "zlib_bytes_labels": zlab}


def hand_records():
    """Records as the collector writes them (per-token lists, last token the EOS), numbers chosen for hand work.

    forget 0: NLL 1 (= mean of -(-1 -3 -0.5 -0.4 -0.1)), paraphrase 2, perturbed 2 and 4;
    forget 1: NLL 2 (= mean of -(-1 -2 -3 -4 -1 -2 -1)), paraphrase 1, perturbed 1 and 1.
    """
    g = {"rouge1_recall": 1.0, "rougeL_f1": 1.0, "generation": "g", "gen_hit_limit": False}
    return [
        _rec("forget", 0, nll=1.0, para_nll=2.0, pert_nll=[2.0, 4.0], rougeL_recall=1.0, **g,
             **_toks([-1.0, -3.0, -0.5, -0.4, -0.1], [1, 0, 1, 1, 1], [0.5, -2.0, 1.0, 1.5, 2.0], 20, 25)),
        _rec("forget", 1, nll=2.0, para_nll=1.0, pert_nll=[1.0, 1.0], rougeL_recall=0.5, **g,
             **_toks([-1.0, -2.0, -3.0, -4.0, -1.0, -2.0, -1.0], [1, 1, 1, 1, 1, 0, 1],
                     [0.0, 0.0, -1.0, -3.0, 0.0, 0.0, 5.0], 40, 41)),
        _rec("forget_para", 0, rougeL_recall=0.25, **g),
        _rec("forget_para", 1, rougeL_recall=0.75, **g),
        _rec("retain", 0, nll=1.0, para_nll=1.0, pert_nll=[2.0], rougeL_recall=0.8, **g,
             **_toks([-1.0, -1.0], [1, 1], [0.0, 0.0], 9, 9)),
        _rec("real_authors", 0, nll=math.log(2), pert_nll=[math.log(4), math.log(4)], rougeL_recall=0.6, **g,
             **_toks([-0.5, -0.886], [1, 1], [0.0, 0.0], 9, 9)),
        _rec("world_facts", 0, nll=-math.log(0.6), pert_nll=[-math.log(0.2), -math.log(0.2)], rougeL_recall=0.9,
             **g, **_toks([-0.5, -0.52], [1, 1], [0.0, 0.0], 9, 9)),
        _rec("holdout", 0, nll=3.0, **_toks([-3.0, -3.0, -3.0], [0, 0, 0], [-2.0, -2.0, -2.0], 30, 30)),
        _rec("holdout", 1, nll=0.5, **_toks([-0.5, -0.5, -0.5], [0, 0, 0], [1.0, 1.0, 1.0], 10, 10)),
    ]


def _reference(convention):
    # the retain model's forget truth ratios 0.2 and 0.3 (both below this model's e^-1 and 1): KS D = 1,
    # p = 2 / C(4, 2) = 1/3; its Min-K% AUC 0.5
    return M.RetainReference(truth_ratios={0: 0.2, 1: 0.3}, origin="hand", min_k_auc=0.5, convention=convention)


def _compare(got, want, path=""):
    """Every number in `want` (the hand-written file) equals `got`'s to 1e-6; lists and dicts recursively."""
    if isinstance(want, dict):
        for k, v in want.items():
            if k in ("_comment", "input"):
                continue
            assert k in got, f"{path}.{k} missing"
            _compare(got[k], v, f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, f"{path}[{i}]")
    else:
        assert got == pytest.approx(want, abs=1e-6), path


def test_open_unlearning_convention_reproduces_a_hand_written_tofu_eval():
    # Worked by hand with open-unlearning's definitions (e^-1 = 0.367879441, e^-2 = 0.135335283, e^-4 = 0.018315639):
    # forget TR: 0: e^-3 / (e^-2 + 1e-10) = e^-1; 1: e^-1 / (e^-1 + 1e-10) = 1 -> mean(min(R, 1/(R + 1e-10)))
    #   = (0.367879441 + 1) / 2 = 0.683939721.
    # EM (EOS dropped): 0: hits 1 0 1 1 -> 0.75; 1: 1 1 1 1 1 0 -> 5/6; mean 0.791666667.
    # ES: 0: suffix from 2 -> 1 - 2/4 = 0.5; 1: last misses -> their loop's k = 5 -> 1/6; mean 1/3.
    # Min-K (int(0.4 T), EOS dropped): 0: T = 4 -> 1 lowest -3 -> 3.0; 1: T = 6 -> 2 lowest -4, -3 -> 3.5;
    #   holdout: T = 2 -> 1 -> 3.0 and 0.5. AUC (forget 0, holdout 1): pairs (3, 3) tie 0.5, the rest 0 -> 0.125.
    # Min-K++: forget z lowest 2.0 and 2.0 (-3, -1 -> 2); holdout 2.0 and -1.0 -> two ties of four = 0.25.
    # ZLib (decoded tokens): forget 1/25 = 0.04, 2/41 = 0.048780488; holdout 3/30 = 0.1, 0.5/10 = 0.05 -> AUC 1.
    # LOSS: forget 1, 2; holdout 3, 0.5 -> (1,3) and (2,3) of four -> 0.5.
    # retain: TR e^-2 / e^-1 = e^-1 -> max(0, 1 - e^-1) = 0.632120559; real authors: P 0.5 vs 0.25 + 0.25 ->
    # normalised 0.5, TR 0.25 / 0.5 -> 0.5; world facts: 0.6 vs 0.2 + 0.2 -> 0.6, TR 1/3 -> 2/3.
    # MU = 9 / (e + 1.25 + e/(e-1) + 2 + 1/0.6 + 2 + 1/0.6 + 1/0.9 + 1.5) = 9 / 15.4947030 = 0.580843661.
    # PrivLeak: AUC' = 1 - 0.125 = 0.875 against 1 - 0.5: (0.875 - 0.5) / 0.5 * 100 = 75.
    want = json.loads(HAND.read_text())
    recs = hand_records()
    s = M.summarize(recs, _reference(OU), convention=OU)
    assert s["convention"] == OU
    got = export.open_unlearning_eval(M.with_scores(recs, OU), s)
    assert got["pmc_unlearn"] == {"convention": OU}
    _compare(got, want)
    # and the summary's names for the same numbers
    assert s["forget_truth_ratio"] == pytest.approx(0.683939721, abs=1e-6)
    assert s["model_utility"] == pytest.approx(0.580843661, abs=1e-6)
    assert s["exact_memorization"] == pytest.approx(0.791666667, abs=1e-6)
    assert s["mia_min_k_auc"] == pytest.approx(0.125) and s["privleak"] == pytest.approx(75.0)
    assert s["forget_quality"] == pytest.approx(1 / 3)


def test_pmc_unlearn_convention_on_the_same_records():
    # every token including the EOS, ceil(0.4 T), ES 0 edge, ZLib on the answer text:
    # EM: 0: hits 1 0 1 1 1 -> 0.8; 1: 1 1 1 1 1 0 1 -> 6/7; mean 0.828571429
    # ES: 0: suffix from 2 -> 1 - 2/5 = 0.6; 1: suffix from 6 -> 1 - 6/7 = 1/7; mean 0.371428571
    # Min-K: 0: T = 5 -> 2 lowest -3, -1 -> 2.0; 1: T = 7 -> 3 lowest -4, -3, -2 -> 3.0;
    #   holdout T = 3 -> 2 -> 3.0 and 0.5. AUC: (2, 3) yes, (3, 3) tie -> 1.5 / 4 = 0.375
    # ZLib: forget 1/20 = 0.05 and 2/40 = 0.05; holdout 0.1, 0.05 -> two wins and two ties = 0.75
    # truth ratios agree with open-unlearning to 1e-9 here (no collapsed answers): forget 0.683939721
    s = M.summarize(hand_records(), _reference(PMC), convention=PMC)
    assert s["convention"] == PMC
    assert s["exact_memorization"] == pytest.approx(0.828571429, abs=1e-6)
    assert s["extraction_strength"] == pytest.approx(0.371428571, abs=1e-6)
    assert s["mia_min_k_auc"] == pytest.approx(0.375)
    assert s["mia_zlib_auc"] == pytest.approx(0.75)
    assert s["forget_truth_ratio"] == pytest.approx(0.683939721, abs=1e-6)
    # PrivLeak against AUC'_retain 0.5: AUC' = 0.625 -> (0.625 - 0.5) / 0.5 * 100 = 25
    assert s["privleak"] == pytest.approx(25.0)


def test_a_reference_of_another_convention_is_refused_in_summarize():
    with pytest.raises(ValueError, match="convention"):
        M.summarize(hand_records(), _reference(PMC), convention=OU)


# ----------------------------------------------------------------------------- references on disk

def _write_records(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_records_reference_is_converted_to_either_convention(tmp_path):
    p = tmp_path / "records.jsonl"
    _write_records(p, [{**r, "key": "k", "source": "tofu:forget01_perturbed"} for r in M.with_scores(hand_records(), PMC)])
    ou = read_reference(p, OU)
    pmc = read_reference(p, PMC)
    assert ou.convention == OU and pmc.convention == PMC
    # Min-K% scores recomputed per convention (forget 0: 3.0 open-unlearning, 2.0 pmc-unlearn)
    assert ou.min_k_scores["forget"][0] == pytest.approx(3.0) and pmc.min_k_scores["forget"][0] == pytest.approx(2.0)
    assert ou.min_k_auc == pytest.approx(0.125) and pmc.min_k_auc == pytest.approx(0.375)
    assert ou.truth_ratios[0] == pytest.approx(math.exp(-1), rel=1e-6)


def test_legacy_records_are_refused_under_open_unlearning(tmp_path):
    # records of schema 1 (an older pmc-unlearn): scores without per-token lists, computed the pmc-unlearn way
    p = tmp_path / "records.jsonl"
    old = [{k: v for k, v in r.items() if k not in M.TOKEN_FIELDS and k != "convention"}
           for r in M.with_scores(hand_records(), PMC)]
    _write_records(p, [{**r, "key": "k", "source": "tofu:forget01_perturbed"} for r in old])
    with pytest.raises(UserError, match="pmc-unlearn convention.*--convention pmc-unlearn"):
        read_reference(p, OU)
    assert read_reference(p, PMC).min_k_auc == pytest.approx(0.375)  # usable as they are under their own


def test_tofu_eval_reference_follows_open_unlearning_only(tmp_path):
    # open-unlearning's own file (no pmc_unlearn key): truth ratios and Min-K AUC taken as they are
    ref = read_reference(HAND, OU)
    assert ref.convention == OU and ref.truth_ratios == {0: pytest.approx(0.367879441), 1: 1.0}
    assert ref.min_k_auc == 0.125
    with pytest.raises(UserError, match="cannot be converted to pmc-unlearn"):
        read_reference(HAND, PMC)
    # one we wrote under pmc-unlearn says so, and is refused under open-unlearning
    ours = json.loads(HAND.read_text())
    ours["pmc_unlearn"] = {"convention": PMC}
    p = tmp_path / "TOFU_EVAL.json"
    p.write_text(json.dumps(ours))
    assert read_reference(p, PMC).convention == PMC
    with pytest.raises(UserError, match="pmc-unlearn eval.*--convention pmc-unlearn"):
        read_reference(p, OU)


def test_convention_settings_are_validated(tmp_path):
    from pmc_unlearn.config import build_section
    from pmc_unlearn.demo import load_profile
    from pmc_unlearn.evaluation.api import evaluate
    from pmc_unlearn.sweep import EvalSettings

    assert build_section(EvalSettings, "eval", {"convention": "pmc-unlearn"}).convention == PMC
    assert EvalSettings().convention == OU
    with pytest.raises(UserError, match="eval.convention"):
        build_section(EvalSettings, "eval", {"convention": "tofu"})
    assert load_profile("test")["evaluate"]["convention"] == OU
    with pytest.raises(UserError, match="evaluate.convention"):
        load_profile("test", ["evaluate.convention=tofu"])
    with pytest.raises(UserError, match="--convention"):  # before the model is loaded
        evaluate("tiny-random", "forget01", tmp_path / "o", require_forget_quality=False, convention="tofu")
    assert not (tmp_path / "o").exists()


def test_bootstrap_intervals_follow_the_summary_convention():
    from pmc_unlearn.evaluation.intervals import tofu_intervals

    # per-example EM: open-unlearning 0.75 and 5/6, pmc-unlearn 0.8 and 6/7: every resample's mean lies
    # between the two values of its own convention, so each interval does too
    for conv, lo, hi in ((OU, 0.75, 5 / 6), (PMC, 0.8, 6 / 7)):
        recs = M.with_scores(hand_records(), conv)
        point = M.summarize(recs, None, require_forget_quality=False, convention=conv)
        ci = tofu_intervals(recs, point, None, n_boot=50)["exact_memorization_ci"]
        assert lo - 1e-12 <= ci[0] <= ci[1] <= hi + 1e-12, (conv, ci)
