"""Losses against a manual log-softmax computation."""

import math

import pytest
import torch

from pmc_unlearn.formatting import IGNORE
from pmc_unlearn.losses import per_example_nll, sum_logprob, token_mean_nll
from pmc_unlearn.methods.base import split_nll


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
    f, r = split_nll(logits, labels, 1)
    assert float(f) == pytest.approx(-sum(ex0) / 3, abs=1e-5)
    assert float(r) == pytest.approx(-ex1[0], abs=1e-5)
