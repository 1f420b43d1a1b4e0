"""Losses against a manual log-softmax computation."""

import math

import pytest
import torch

from pmc_unlearn.formatting import IGNORE
from pmc_unlearn.losses import (
    distill_kl, per_example_nll, scrub_max_loss, scrub_min_loss, scrub_phase, split_nll, sum_logprob, token_logprobs,
    token_mean_nll,
)


def manual_logp(row, tok):
    z = sum(math.exp(x) for x in row)
    return row[tok] - math.log(z)


def test_token_mean_nll_hand_worked():
    # B=1, T=3, V=2. Labels at t=1,2 are predicted by logits at t=0,1.
    logits = torch.tensor([[[0.0, 0.0], [1.0, 3.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE, 0, 1]])
    # position 0 predicts token 0: log(1/2) = -0.6931; position 1 predicts 1: 3 - log(e^1 + e^3) = -0.1269
    lp0 = math.log(0.5)
    lp1 = 3 - math.log(math.e + math.e**3)
    assert lp1 == pytest.approx(-0.126928, abs=1e-6)
    assert float(token_mean_nll(logits, labels)) == pytest.approx(-(lp0 + lp1) / 2, abs=1e-6)
    assert float(sum_logprob(logits, labels)[0]) == pytest.approx(lp0 + lp1, abs=1e-6)


def test_batch_token_mean_vs_per_example():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[IGNORE, 1, 2, 3], [IGNORE, IGNORE, 4, IGNORE]])
    rows = logits.tolist()
    ex0 = [manual_logp(rows[0][0], 1), manual_logp(rows[0][1], 2), manual_logp(rows[0][2], 3)]
    ex1 = [manual_logp(rows[1][1], 4)]
    per = per_example_nll(logits, labels)
    assert per.tolist() == pytest.approx([-sum(ex0) / 3, -ex1[0]], abs=1e-5)
    # the batch token mean weights every answer token equally: 4 tokens in all
    assert float(token_mean_nll(logits, labels)) == pytest.approx(-(sum(ex0) + ex1[0]) / 4, abs=1e-5)
    f, r = split_nll(*token_logprobs(logits, labels), 1)
    assert float(f) == pytest.approx(-sum(ex0) / 3, abs=1e-5)
    assert float(r) == pytest.approx(-ex1[0], abs=1e-5)


# ----- SCRUB ----------------------------------------------------------------------------------------
# V = 2, T = 4 positions; labels [ignore, 0, 1, ignore]: positions 0 and 1 predict counted tokens,
# position 2 predicts an ignored one (its wildly different logits must not count), position 3 nothing.
KL_STUDENT = [[[math.log(3.0), 0.0], [1.0, 2.0], [9.0, -9.0], [0.0, 0.0]]]
KL_TEACHER = [[[0.0, 0.0], [1.0, 2.0], [-9.0, 9.0], [5.0, 5.0]]]
KL_LABELS = [[IGNORE, 0, 1, IGNORE]]


def test_distill_kl_hand_worked():
    s, t, y = torch.tensor(KL_STUDENT), torch.tensor(KL_TEACHER), torch.tensor(KL_LABELS)
    # T = 1. Position 0: teacher p = (1/2, 1/2), student q = (3/4, 1/4):
    #   KL(p || q) = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3) = 0.143841
    # position 1: same logits, KL 0. Token mean over the 2 counted positions: 0.071921
    assert float(distill_kl(s, t, y, 1.0)) == pytest.approx(0.071921, abs=1e-6)
    # T = 2. Position 0: p = (1/2, 1/2); student logits / 2 = (ln sqrt3, 0):
    #   q = (sqrt3 / (sqrt3 + 1), 1 / (sqrt3 + 1)) = (0.633975, 0.366025)
    #   KL = 1/2 ln(0.25 / (0.633975 x 0.366025)) = 1/2 ln(0.25 / 0.232051) = 1/2 ln 1.077350 = 1/2 x 0.074505 = 0.037252
    #   x T^2 = 4: 0.149009; mean with position 1's 0: 0.074505
    assert float(distill_kl(s, t, y, 2.0)) == pytest.approx(0.074505, abs=1e-5)
    # nothing counted: 0 (and still differentiable)
    assert float(distill_kl(s, t, torch.full((1, 4), IGNORE), 1.0)) == 0.0


def test_distill_kl_is_teacher_to_student_and_zero_at_the_teacher():
    # KL(p || q) is not symmetric: swapping teacher and student at position 0 gives
    #   KL(q || p) = 3/4 ln((3/4)/(1/2)) + 1/4 ln((1/4)/(1/2)) = 3/4 ln 1.5 - 1/4 ln 2 = 0.304099 - 0.173287 = 0.130812
    s, t, y = torch.tensor(KL_STUDENT), torch.tensor(KL_TEACHER), torch.tensor(KL_LABELS)
    assert float(distill_kl(t, s, y, 1.0)) == pytest.approx(0.130812 / 2, abs=1e-6)
    w = torch.tensor(KL_TEACHER, requires_grad=True)
    kl = distill_kl(w, torch.tensor(KL_TEACHER), y, 4.0)
    kl.backward()
    assert float(kl.detach()) == 0.0 and float(w.grad.abs().max()) == 0.0  # the max-step's gradient at the start


def test_scrub_losses_and_phases_by_hand():
    assert float(scrub_max_loss(torch.tensor(0.25))) == -0.25
    # alpha 0.5 x KL 0.2 + gamma 2 x NLL 1.5 = 0.1 + 3.0 = 3.1
    assert float(scrub_min_loss(torch.tensor(0.2), torch.tensor(1.5), 0.5, 2.0)) == pytest.approx(3.1)
    # max_epochs 2: loop epochs min, max, min, max, then min for good
    assert [scrub_phase(e, 2) for e in range(7)] == ["min", "max", "min", "max", "min", "min", "min"]
    assert [scrub_phase(e, 0) for e in range(3)] == ["min", "min", "min"]
