"""sampling.ops: the kept token set equals transformers' TopK + TopP warpers', and draws follow softmax."""

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from pmc_unlearn.sampling.ops import (
    draw, greedy_next, row_seed, row_uniforms, sample_next, top_k_top_p_candidates,
)


def hf_filter(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """What generate(do_sample=True) samples from: scores with -inf on removed tokens."""
    s = logits.float()
    if temperature != 1.0:
        s = TemperatureLogitsWarper(temperature)(None, s)
    if top_k:
        s = TopKLogitsWarper(top_k)(None, s)
    if top_p < 1.0:
        s = TopPLogitsWarper(top_p)(None, s)
    return s


def ours_kept(logits, temperature, top_k, top_p) -> torch.Tensor:
    vals, ids, keep = top_k_top_p_candidates(logits, top_k, top_p, temperature)
    assert keep[:, 0].all()  # at least one token always survives
    # kept entries are a prefix of the candidate list
    assert (keep.long().diff(dim=-1) <= 0).all()
    mask = torch.zeros(logits.shape, dtype=torch.bool)
    mask.scatter_(1, ids, keep)
    return mask


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.25, 2.0])
@pytest.mark.parametrize("top_k", [1, 5, 50, 999, 1000, 5000])
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.95, 1.0])
def test_top_k_then_top_p_keeps_the_warpers_set(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(hash((temperature, top_k, top_p)) % 2**31)
    logits = torch.randn(48, 1000, generator=g) * 3
    ref = torch.isfinite(hf_filter(logits, temperature, top_k, top_p))
    assert torch.equal(ours_kept(logits, temperature, top_k, top_p), ref)


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95])
def test_top_p_alone_matches_up_to_rounding_at_the_edge(top_p):
    """top_k=0: the candidate set grows until the nucleus fits; only an edge token may differ (float sums)."""
    g = torch.Generator().manual_seed(7)
    for scale in (0.5, 3.0, 8.0):  # flat (nucleus of thousands) to peaked
        logits = torch.randn(16, 8000, generator=g) * scale
        ref = torch.isfinite(hf_filter(logits, 1.0, 0, top_p))
        mine = ours_kept(logits, 1.0, 0, top_p)
        for r in torch.nonzero((mine != ref).any(-1)).flatten().tolist():
            p = logits[r].double().softmax(-1)
            for t in torch.nonzero(mine[r] != ref[r]).flatten().tolist():
                cum = p[p <= p[t]].sum().item()  # the warper's ascending cumulative probability at t
                assert abs(cum - (1 - top_p)) < 1e-5, (scale, r, t, cum)


def test_no_filter_keeps_every_token():
    logits = torch.randn(4, 300)
    assert ours_kept(logits, 1.0, 0, 1.0).all()
    assert ours_kept(logits, 0.7, 0, 1.0).all()


def test_ties_at_the_top_k_value_are_all_kept():
    logits = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    for k in (1, 2, 3, 4):
        ref = torch.isfinite(hf_filter(logits, 1.0, k, 1.0))
        assert torch.equal(ours_kept(logits, 1.0, k, 1.0), ref)
    assert ours_kept(logits, 1.0, 2, 1.0)[1].all()  # all six tied: all kept, as the warper does


def test_ties_straddling_the_nucleus_edge_keep_the_same_number_lowest_ids_first():
    # Ten equal logits, top_p 0.45: the warper keeps 5 of them (which 5 depends on torch.sort's
    # unstable order); we keep the same number, the lowest token ids.
    logits = torch.zeros(1, 10)
    ref = torch.isfinite(hf_filter(logits, 1.0, 0, 0.45))
    mine = ours_kept(logits, 1.0, 0, 0.45)
    assert mine.sum() == ref.sum() == 5
    assert mine[0, :5].all() and not mine[0, 5:].any()
    # A tie inside the nucleus (not at its edge) is kept whole, exactly as the warper does.
    logits = torch.tensor([[4.0, 4.0, 1.0, 0.0, -1.0, -2.0]])
    for p in (0.5, 0.9, 0.99):
        assert torch.equal(ours_kept(logits, 1.0, 0, p), torch.isfinite(hf_filter(logits, 1.0, 0, p)))
        assert torch.equal(ours_kept(logits, 1.0, 3, p), torch.isfinite(hf_filter(logits, 1.0, 3, p)))


def test_minus_inf_logits_are_never_kept():
    logits = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")]])
    for k, p in ((0, 1.0), (4, 1.0), (4, 0.9), (0, 0.9), (3, 1.0)):
        m = ours_kept(logits, 1.0, k, p)
        assert not m[0, 1] and not m[0, 3]


def test_top_p_of_one_token_keeps_only_the_argmax():
    logits = torch.randn(8, 500)
    m = ours_kept(logits, 1.0, 50, 1e-6)
    assert torch.equal(m.sum(-1), torch.ones(8, dtype=torch.long))
    assert torch.equal(m.float().argmax(-1), logits.argmax(-1))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.25, 8, 0.9), (1.0, 0, 1.0), (0.7, 0, 0.8), (2.0, 20, 1.0)])
def test_draws_follow_the_filtered_softmax(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 24, generator=g) * 2
    probs = torch.softmax(hf_filter(logits, temperature, top_k, top_p), -1)[0]  # what generate samples from
    N = 40000
    u = torch.rand(N, generator=g, dtype=torch.float64)
    toks = sample_next(logits.expand(N, -1), u, temperature, top_k, top_p)
    freq = torch.bincount(toks, minlength=24).double() / N
    assert (freq[probs == 0] == 0).all()  # nothing outside the kept set
    tv = 0.5 * (freq - probs.double()).abs().sum().item()
    assert tv < 0.015, tv
    # chi-square against the expected counts (kept tokens), well inside the 99.9% quantile
    kept = probs > 0
    exp = probs.double()[kept] * N
    chi2 = (((freq[kept] * N) - exp) ** 2 / exp).sum().item()
    dof = int(kept.sum()) - 1
    assert chi2 < dof + 6 * (2 * max(dof, 1)) ** 0.5 + 10, (chi2, dof)


def test_draw_never_picks_a_zero_probability_candidate():
    vals = torch.tensor([[1.0, 0.0, -200.0, -300.0]] * 4)
    ids = torch.tensor([[7, 3, 9, 1]] * 4)
    keep = torch.tensor([[True, True, True, False]] * 4)
    u = torch.tensor([0.0, 0.5, 0.999999, 1 - 2**-53], dtype=torch.float64)
    out = draw(vals, ids, keep, u)
    assert set(out.tolist()) <= {7, 3}


def test_greedy_next_is_argmax_first_on_ties():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0]])
    assert greedy_next(logits).tolist() == [1]


def test_row_streams_are_reproducible_and_distinct():
    s1 = [row_seed(0, [1, 2, 3], 0, j) for j in range(3)]
    assert s1 == [row_seed(0, [1, 2, 3], 0, j) for j in range(3)]
    assert len(set(s1)) == 3
    assert row_seed(0, [1, 2, 3], 0, 0) != row_seed(1, [1, 2, 3], 0, 0)
    assert row_seed(0, [1, 2, 3], 0, 0) != row_seed(0, [1, 2, 4], 0, 0)
    assert row_seed(0, [1, 2, 3], 0, 0) != row_seed(0, [1, 2, 3], 1, 0)
    a, b = row_uniforms(s1, 5), row_uniforms(s1, 5)
    assert torch.equal(a, b) and a.shape == (3, 5)
    assert ((a >= 0) & (a < 1)).all()
    assert torch.equal(row_uniforms(s1[1:2], 5)[0], a[1])  # a row's stream does not depend on the others


def test_ties_past_the_margin_and_ties_made_by_the_temperature():
    # 30 tokens tied at the 5th value: the candidate margin is exceeded, the full row is scored.
    logits = torch.cat([torch.tensor([[9.0, 8.0, 7.0, 6.0]]), torch.full((1, 30), 5.0), torch.randn(1, 66) - 10], -1)
    tied = logits[0] == 5.0
    for T in (1.0, 0.7, 3.0):
        ref = torch.isfinite(hf_filter(logits, T, 5, 1.0))
        assert torch.equal(ours_kept(logits, T, 5, 1.0), ref)
        # the nucleus edge falls inside the tie: same count, same tokens outside the tie
        ref = torch.isfinite(hf_filter(logits, T, 5, 0.9))
        mine = ours_kept(logits, T, 5, 0.9)
        assert mine.sum() == ref.sum() and torch.equal(mine[0, ~tied], ref[0, ~tied])
    # distinct fp32 logits that become equal after / T
    x = torch.tensor([[1.0, 1.0 + 2**-23, 1.0 + 2**-22, 0.5, 0.25] + [-5.0] * 20])
    for k in (1, 2, 3):
        assert torch.equal(ours_kept(x, 3.0, k, 1.0), torch.isfinite(hf_filter(x, 3.0, k, 1.0)))


@pytest.mark.parametrize("top_k,top_p", [(50, 0.95), (5, 1.0), (0, 0.9), (0, 1.0)])
def test_bf16_logits_keep_the_same_set_as_their_fp32_cast(top_k, top_p):
    """The model may hand bf16 logits; the warpers see them cast to fp32 (as generate does)."""
    logits = (torch.randn(32, 3000) * 4).to(torch.bfloat16)  # many exact ties
    ref = torch.isfinite(hf_filter(logits.float(), 1.25, top_k, top_p))
    mine = ours_kept(logits, 1.25, top_k, top_p)
    if top_p >= 1.0:
        assert torch.equal(mine, ref)
        return
    # bf16 ties are common at the nucleus edge: same count per row; a token kept by one side only
    # has a tie partner with the same logit kept by the other side only.
    assert torch.equal(mine.sum(-1), ref.sum(-1))
    for r in torch.nonzero((mine != ref).any(-1)).flatten().tolist():
        only_mine = logits[r][mine[r] & ~ref[r]].float().sort().values
        only_ref = logits[r][ref[r] & ~mine[r]].float().sort().values
        assert torch.equal(only_mine, only_ref)
