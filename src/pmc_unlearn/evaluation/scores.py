"""Per-example scores from token log-probabilities: pure functions, no model, no files.

Each function turns what one teacher-forced forward pass gives for one example (the answer
tokens' log-probabilities, the argmax predictions, the moments of the full next-token
distribution) into one number, exactly as docs/metrics.md defines it. The collector calls
them per example; the tests call them on hand-made tensors.

Shapes: `n` = number of answer tokens of one example, `V` = vocabulary size.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch

MIN_K = 0.4  # the fraction of lowest-probability tokens Min-K% and Min-K%++ average over
VAR_FLOOR = 1e-6  # Min-K%++ clamps the variance of log p at this value


def _k_count(n: int, k: float) -> int:
    """ceil(k * n), at least 1. The epsilon keeps float noise from adding a token (0.4 * 15 = 6.000000000000001)."""
    return max(1, math.ceil(k * n - 1e-9))


def min_k_score(token_logprobs: Sequence[float] | torch.Tensor, k: float = MIN_K) -> float:
    """Min-K%: minus the mean of the lowest ceil(k * n) token log-probs. Higher = less likely a member."""
    lp = torch.as_tensor(token_logprobs, dtype=torch.float64).reshape(-1)
    if lp.numel() == 0:
        return float("nan")
    low = torch.sort(lp).values[: _k_count(lp.numel(), k)]
    return float(-low.mean())


def vocab_moments(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of log p under p at each position, from logits [n, V]; both [n] (fp32).

    mu = sum_v p_v log p_v, var = sum_v p_v (log p_v)^2 - mu^2 (not yet clamped). The variance is
    computed in the centred form sum_v p_v (log p_v - mu)^2 (the same number): the textbook form
    cancels catastrophically in fp32 when log p is large and nearly constant (a flat distribution).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * (logp - mu[:, None]).square()).sum(-1)
    return mu, var


def min_k_plus_plus_score(
    token_logprobs: Sequence[float] | torch.Tensor,
    mu: Sequence[float] | torch.Tensor,
    var: Sequence[float] | torch.Tensor,
    k: float = MIN_K,
) -> float:
    """Min-K%++: Min-K% over z_t = (log p(y_t) - mu_t) / sqrt(max(var_t, 1e-6))."""
    lp = torch.as_tensor(token_logprobs, dtype=torch.float64).reshape(-1)
    m = torch.as_tensor(mu, dtype=torch.float64).reshape(-1)
    v = torch.as_tensor(var, dtype=torch.float64).reshape(-1).clamp(min=VAR_FLOOR)
    return min_k_score((lp - m) / v.sqrt(), k)


def zlib_score(avg_nll: float, text: str) -> float:
    """ZLib attack score: answer NLL divided by the zlib-compressed size (bytes) of the answer text."""
    return float(avg_nll) / len(zlib.compress(text.encode("utf-8")))


def exact_memorization(predictions: Sequence[int], targets: Sequence[int]) -> float:
    """EM: the share of answer tokens whose teacher-forced argmax prediction is the token itself."""
    if len(targets) == 0:
        return float("nan")
    return sum(int(p) == int(t) for p, t in zip(predictions, targets, strict=True)) / len(targets)


def extraction_strength(predictions: Sequence[int], targets: Sequence[int]) -> float:
    """ES = 1 - k / n, k the smallest position from which every prediction matches the answer.

    When even the last prediction is wrong, k = n (the empty suffix) and ES = 0. (open-unlearning's
    loop stops at k = n - 1 there and reports 1/n; docs/metrics.md's definition gives 0.)
    """
    n = len(targets)
    if n == 0:
        return float("nan")
    k = n
    while k > 0 and int(predictions[k - 1]) == int(targets[k - 1]):
        k -= 1
    return 1.0 - k / n


def truth_ratio(pert_nlls: Sequence[float], para_nll: float) -> float:
    """R = Pbar(perturbed) / P(paraphrase) = exp(-mean_j nll_j) / exp(-nll_para), computed in log space."""
    if len(pert_nlls) == 0:
        return float("nan")
    return math.exp(min(700.0, float(para_nll) - sum(pert_nlls) / len(pert_nlls)))


def normalised_prob(nll: float, pert_nlls: Sequence[float]) -> float:
    """P(a) / (P(a) + sum_j P(pert_j)), with P = exp(-avg_nll); shifted in log space so tiny P stay exact."""
    logs = [-float(nll)] + [-float(x) for x in pert_nlls]
    m = max(logs)
    ws = [math.exp(x - m) for x in logs]
    return ws[0] / sum(ws)
