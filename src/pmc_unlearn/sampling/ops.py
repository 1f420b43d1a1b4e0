"""Pure token-sampling functions for the fast sampler: exact top-k / top-p without a full-vocab sort.

`transformers`' TopK + TopP warpers sort the whole vocabulary (49152 entries for SmolLM2) every
step and `multinomial` draws exponential noise for every entry; on a CPU that costs more than
the model's own matmuls for a small model. The same distribution needs far less:

1. temperature: `scores = logits / T` (the same float op as TemperatureLogitsWarper);
2. top-k: `torch.topk` on the raw logits (k + a margin; scores are monotone in the logits, so
   no full-vocabulary cast or division), the warper's `>=` the k-th score rule applied to the
   candidates; the margin grows while a tie reaches its end;
3. top-p: only the survivors are sorted (k of them, e.g. 50) and the warper's rule is applied to
   them: in ascending order, drop tokens whose cumulative probability is `<= 1 - top_p`, always
   keeping the most probable one. With top-k on, the warper's cumulative sum over the sorted
   vocabulary is exactly 0 before the survivors, so the sums match it addition for addition.
   With top_k=0 the candidate set grows (topk with k = 256, 1024, ...) until the tail outside it
   holds less than 1 - top_p of the mass; the tail mass is added to the cumulative sum;
4. draw: one uniform number per row, inverse CDF over the kept candidates (no noise on the rest).

The kept set equals the warpers' except (a) float rounding of the softmax sum when a cumulative
probability lands within ~1e-7 of 1 - top_p, and (b) exactly tied logits that straddle the
nucleus edge: the warpers' `torch.sort` is not stable, so which of the tied tokens survive is
arbitrary there; here the lowest token ids survive (the same number of them), deterministically.

Shapes: logits/scores [R, V] (rows x vocab), uniforms [R].
"""

from __future__ import annotations

import hashlib

import torch

# First candidate-set size when top_k is off and top_p < 1; grown x4 while the nucleus does not fit.
_NUCLEUS_K0 = 256


def temperature_scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T in fp32, as TemperatureLogitsWarper (which is skipped at T == 1)."""
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    return scores


# Extra candidates beyond top_k taken from the raw logits, so that ties at the k-th value (bf16
# logits tie often; the division by T can create ties too) are inside the candidate set; doubled
# while a tie reaches the last candidate.
_TIE_MARGIN = 16


def _top_k_candidates(logits: torch.Tensor, k: int, temperature: float):
    """The top-k warper's survivors: fp32 scores, token ids [R, K'] and a valid mask (K' >= k).

    The warper keeps every token whose fp32 score logits/T is >= the k-th largest score. Scores
    are monotone in the raw logits, so that set is a top set of the raw logits: topk runs on the
    raw logits (bf16 or fp32, no full-vocabulary conversion or division) with a margin of extra
    candidates, grown while a tie with the k-th score reaches the end of the margin.
    """
    V = logits.shape[-1]
    k = min(k, V)
    k2 = min(V, k + _TIE_MARGIN)
    while True:
        raw, idx = torch.topk(logits, k2, dim=-1)  # [R, k2], descending
        vals = temperature_scale(raw, temperature)  # exactly the warper's fp32 scores of these tokens
        valid = vals >= vals[:, k - 1 : k]
        if k2 == V or not bool(valid[:, -1].any()):
            return vals, idx, valid
        k2 = min(V, 2 * k2)


def order_candidates(vals: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor):
    """Sort candidates by (score descending, token id ascending); invalid ones go last."""
    vals = vals.masked_fill(~valid, float("-inf"))
    by_id = torch.argsort(idx, dim=-1)
    idx = idx.gather(-1, by_id)
    vals = vals.gather(-1, by_id)
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    return vals.gather(-1, order), idx.gather(-1, order)


def nucleus_keep(vals_desc: torch.Tensor, top_p: float, tail_mass: torch.Tensor | None) -> torch.Tensor:
    """TopPLogitsWarper's rule on candidates sorted descending: keep mask [R, K].

    `tail_mass` [R, 1] is the probability outside the candidates (top_k off), else None: the
    softmax is then over the candidates only, as the warper's is after top-k.
    """
    asc = vals_desc.flip(-1)  # ascending, -inf (invalid) first
    if tail_mass is None:
        probs = asc.softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
    else:
        probs = asc.exp()  # already normalised log-probs
        cum = probs.cumsum(dim=-1) + tail_mass
    remove = cum <= (1 - top_p)
    remove[..., -1] = False  # min_tokens_to_keep = 1: the most probable token stays
    return (~remove).flip(-1) & torch.isfinite(vals_desc)


def top_k_top_p_candidates(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0):
    """Candidates that survive Temperature(T), TopK(top_k) then TopP(top_p), sorted by score descending.

    logits [R, V] as the model gives them (bf16 or fp32). Returns (fp32 scores [R, K], ids [R, K],
    keep [R, K]); kept entries form a prefix of each row. K is the candidate count (about top_k),
    or the full vocabulary when neither filter is on.
    """
    R, V = logits.shape
    if top_k and top_k > 0 and top_k < V:
        vals, idx, valid = _top_k_candidates(logits, top_k, temperature)
        vals, idx = order_candidates(vals, idx, valid)
        if top_p >= 1.0:
            return vals, idx, torch.isfinite(vals)
        return vals, idx, nucleus_keep(vals, top_p, None)
    scores = temperature_scale(logits, temperature)
    if top_p >= 1.0:
        vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
        return vals, idx, torch.isfinite(vals)
    # top-p alone: grow the candidate set until the mass outside it is below 1 - top_p for every row.
    logz = torch.logsumexp(scores, dim=-1, keepdim=True)  # [R, 1]
    k = min(_NUCLEUS_K0, V)
    while True:
        vals, idx = torch.topk(scores, k, dim=-1)
        if k == V:
            break
        kth = vals[:, -1:]
        inside = (scores >= kth).sum(-1)
        mass = torch.exp(vals - logz).sum(-1)  # [R]
        # A margin well above fp32 rounding, so a tail token never belongs to the nucleus.
        if bool((mass > top_p + 1e-4).all()) and int(inside.max()) == k:
            break
        k = min(V, k * 4)
    valid = torch.ones_like(vals, dtype=torch.bool)
    vals, idx = order_candidates(vals, idx, valid)
    lp = vals - logz
    tail = (1 - lp.exp().sum(-1, keepdim=True)).clamp(min=0) if k < V else torch.zeros_like(logz)
    return vals, idx, nucleus_keep(lp, top_p, tail)


def draw(vals: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample one token per row from softmax(vals) restricted to `keep`, by inverse CDF with uniforms u [R]."""
    logits = vals.double().masked_fill(~keep, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [R, K], fp64 so the cdf's rounding is far below any probability that matters
    cdf = probs.cumsum(dim=-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)  # scaled by the total: never past the end
    # The first position whose cdf exceeds the target: a zero-probability token is never picked.
    pos = torch.searchsorted(cdf, target, right=True)
    pos = torch.minimum(pos, keep.sum(-1, keepdim=True) - 1)
    return ids.gather(-1, pos).squeeze(-1)


def sample_next(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, repeat: int = 1) -> torch.Tensor:
    """One sampled token id per row, the distribution of temperature + TopK + TopP warpers.

    logits [B, V], u [B * repeat]: row b's candidates serve rows b*repeat .. b*repeat+repeat-1 (the
    n samples of a prompt share its first logits, filtered once). Returns [B * repeat] (long).
    """
    vals, ids, keep = top_k_top_p_candidates(logits, top_k, top_p, temperature)
    if repeat > 1:
        vals, ids, keep = (x.repeat_interleave(repeat, 0) for x in (vals, ids, keep))
    return draw(vals, ids, keep, u)


def greedy_next(logits: torch.Tensor) -> torch.Tensor:
    """argmax per row, as generate(do_sample=False) (first index on ties; bf16 -> fp32 is exact, so no cast)."""
    return torch.argmax(logits, dim=-1)


# ----- per-row random streams --------------------------------------------------------------------

def row_seed(seed: int, prompt: list[int], occurrence: int, sample: int) -> int:
    """A 63-bit seed from (call seed, prompt tokens, which copy of an identical prompt, sample index).

    Keyed by the prompt's content, not its position, so a question's samples do not depend on
    which other questions share the call, their order, or how they were bucketed.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(repr((int(seed), int(occurrence), int(sample), len(prompt))).encode())
    h.update(torch.tensor(prompt, dtype=torch.int64).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFFFFFFFFFF


def row_uniforms(seeds: list[int], steps: int) -> torch.Tensor:
    """[R, steps] uniforms in [0, 1): row r, step t is the t-th draw of a generator seeded seeds[r]."""
    out = torch.empty(len(seeds), steps, dtype=torch.float64)
    g = torch.Generator(device="cpu")
    for r, s in enumerate(seeds):
        g.manual_seed(s)
        out[r] = torch.rand(steps, generator=g, dtype=torch.float64)
    return out
