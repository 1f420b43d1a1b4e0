"""Per-example scores from token log-probabilities: pure functions, no model, no files.

Each function turns what one teacher-forced forward pass gives for one example (the answer
tokens' log-probabilities, whether each argmax prediction hit its token, the Min-K%++ z value
of each token) into one number, as docs/metrics.md defines it, under one of two conventions:

- `open-unlearning` (the default): their code's definitions. EM, ES, Min-K% and Min-K%++ drop
  the last answer token (the closing EOS), Min-K% averages max(1, int(0.4 T)) tokens, ES is
  1/T when no suffix matches, the truth ratio divides by P(paraphrase) + 1e-10, ZLib compresses
  the decoded answer tokens.
- `pmc-unlearn`: every answer token including the EOS, ceil(0.4 T) tokens, ES 0 when no suffix
  matches, the truth ratio exact in log space, ZLib on the answer text.

The collector stores the per-token lists (convention-free); `example_scores` turns them into the
per-example numbers of a convention. Shapes: `n` = number of answer tokens, `V` = vocabulary size.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch

MIN_K = 0.4  # the fraction of lowest-probability tokens Min-K% and Min-K%++ average over
VAR_FLOOR = 1e-6  # Min-K%++ clamps the variance of log p at this value
OPEN_UNLEARNING = "open-unlearning"
PMC_UNLEARN = "pmc-unlearn"
CONVENTIONS = (OPEN_UNLEARNING, PMC_UNLEARN)
DEFAULT_CONVENTION = OPEN_UNLEARNING
OU_EPS = 1e-10  # open-unlearning adds this to the denominators of the truth ratio, normalised prob and PrivLeak


def check_convention(convention: str) -> str:
    """The convention name, or ValueError naming the choices (callers turn it into a UserError)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention {convention!r}: choose one of {', '.join(CONVENTIONS)}")
    return convention


def _k_count(n: int, k: float) -> int:
    """ceil(k * n), at least 1. The epsilon keeps float noise from adding a token (0.4 * 15 = 6.000000000000001)."""
    return max(1, math.ceil(k * n - 1e-9))


def _k_count_ou(n: int, k: float) -> int:
    """open-unlearning's count: max(1, int(n * k)) (0.4 * 3 = 1.2 -> 1 token, ceil would take 2)."""
    return max(1, int(n * k))


def min_k_score(token_logprobs: Sequence[float] | torch.Tensor, k: float = MIN_K,
                convention: str = PMC_UNLEARN) -> float:
    """Min-K%: minus the mean of the lowest k-share of the token log-probs. Higher = less likely a member.

    The count is ceil(k * n) under pmc-unlearn (NaN for no tokens), max(1, int(n * k)) under
    open-unlearning (0 for no tokens, as their code returns). The tokens given are used as they
    are: which tokens count (with or without the EOS) is `example_scores`' business.
    """
    lp = torch.as_tensor(token_logprobs, dtype=torch.float64).reshape(-1)
    ou = check_convention(convention) == OPEN_UNLEARNING
    if lp.numel() == 0:
        return 0.0 if ou else float("nan")
    count = _k_count_ou(lp.numel(), k) if ou else _k_count(lp.numel(), k)
    low = torch.sort(lp).values[:count]
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


def z_scores(token_logprobs: Sequence[float] | torch.Tensor, mu: Sequence[float] | torch.Tensor,
             var: Sequence[float] | torch.Tensor) -> list[float]:
    """Min-K%++'s per-token z_t = (log p(y_t) - mu_t) / sqrt(max(var_t, 1e-6))."""
    lp = torch.as_tensor(token_logprobs, dtype=torch.float64).reshape(-1)
    m = torch.as_tensor(mu, dtype=torch.float64).reshape(-1)
    v = torch.as_tensor(var, dtype=torch.float64).reshape(-1).clamp(min=VAR_FLOOR)
    return ((lp - m) / v.sqrt()).tolist()


def min_k_plus_plus_score(
    token_logprobs: Sequence[float] | torch.Tensor,
    mu: Sequence[float] | torch.Tensor,
    var: Sequence[float] | torch.Tensor,
    k: float = MIN_K,
    convention: str = PMC_UNLEARN,
) -> float:
    """Min-K%++: Min-K% over z_t = (log p(y_t) - mu_t) / sqrt(max(var_t, 1e-6))."""
    return min_k_score(z_scores(token_logprobs, mu, var), k, convention)


def zlib_bytes(text: str) -> int:
    """Size in bytes of the zlib-compressed UTF-8 text (zlib's default level)."""
    return len(zlib.compress(text.encode("utf-8")))


def zlib_score(avg_nll: float, text: str) -> float:
    """ZLib attack score: answer NLL divided by the zlib-compressed size (bytes) of the text."""
    return float(avg_nll) / zlib_bytes(text)


def exact_memorization(predictions: Sequence[int], targets: Sequence[int]) -> float:
    """EM: the share of answer tokens whose teacher-forced argmax prediction is the token itself."""
    if len(targets) == 0:
        return float("nan")
    return sum(int(p) == int(t) for p, t in zip(predictions, targets, strict=True)) / len(targets)


def em_from_hits(hits: Sequence[int | bool]) -> float | None:
    """EM from per-token hits (1 where the argmax prediction is the token); None without tokens."""
    return sum(int(bool(h)) for h in hits) / len(hits) if len(hits) else None


def es_from_hits(hits: Sequence[int | bool], convention: str = PMC_UNLEARN) -> float:
    """ES = 1 - k / n, k the smallest position from which every prediction hits its token.

    When even the last prediction misses, only the empty suffix matches: pmc-unlearn takes k = n
    and gives 0; open-unlearning's loop stops at k = n - 1 and gives 1/n. Without tokens: NaN
    (pmc-unlearn) or 0 (open-unlearning's value there).
    """
    ou = check_convention(convention) == OPEN_UNLEARNING
    n = len(hits)
    if n == 0:
        return 0.0 if ou else float("nan")
    k = n
    while k > 0 and hits[k - 1]:
        k -= 1
    if ou and k == n:
        k = n - 1
    return 1.0 - k / n


def extraction_strength(predictions: Sequence[int], targets: Sequence[int], convention: str = PMC_UNLEARN) -> float:
    """ES from predictions and targets (see `es_from_hits`)."""
    return es_from_hits([int(p) == int(t) for p, t in zip(predictions, targets, strict=True)], convention)


def truth_ratio(pert_nlls: Sequence[float], para_nll: float, convention: str = PMC_UNLEARN) -> float:
    """R = Pbar(perturbed) / P(paraphrase), Pbar = exp(-mean_j nll_j) (the geometric mean).

    pmc-unlearn: exp(nll_para - mean_j nll_j), exact in log space (capped at e^700).
    open-unlearning: exp(-mean_j nll_j) / (exp(-nll_para) + 1e-10): when P(para) falls below
    about 1e-8 (a collapsed model) the epsilon dominates and R shrinks toward Pbar / 1e-10.
    """
    if len(pert_nlls) == 0:
        return float("nan")
    mean_pert = sum(float(x) for x in pert_nlls) / len(pert_nlls)
    if check_convention(convention) == OPEN_UNLEARNING:
        return math.exp(-mean_pert) / (math.exp(-float(para_nll)) + OU_EPS)
    return math.exp(min(700.0, float(para_nll) - mean_pert))


def normalised_prob(nll: float, pert_nlls: Sequence[float], convention: str = PMC_UNLEARN) -> float:
    """P(a) / (P(a) + sum_j P(pert_j)), with P = exp(-avg_nll).

    pmc-unlearn: shifted in log space so tiny P stay exact; open-unlearning: the plain ratio with
    + 1e-10 in the denominator.
    """
    if check_convention(convention) == OPEN_UNLEARNING:
        p = math.exp(-float(nll))
        return p / (p + sum(math.exp(-float(x)) for x in pert_nlls) + OU_EPS)
    logs = [-float(nll)] + [-float(x) for x in pert_nlls]
    m = max(logs)
    ws = [math.exp(x - m) for x in logs]
    return ws[0] / sum(ws)


def example_scores(tok_lp: Sequence[float], tok_hit: Sequence[int | bool], tok_z: Sequence[float], nll: float,
                   zlib_bytes_answer: int, zlib_bytes_labels: int, convention: str) -> dict:
    """EM, ES and the four MIA scores of one example from its per-token lists, under a convention.

    `tok_lp`, `tok_hit`, `tok_z`: log p, argmax hit (0/1) and Min-K%++ z of every answer token in
    order, the last being the closing EOS (unless the answer was cut at the length limit).
    open-unlearning drops the last token for EM, ES, Min-K% and Min-K%++ ("ignore eos
    prediction"; EM is None when nothing is left, as theirs); LOSS is the NLL over all tokens in
    both; ZLib divides it by the compressed size of the decoded answer tokens
    (`zlib_bytes_labels`, open-unlearning) or of the answer text (`zlib_bytes_answer`).
    """
    ou = check_convention(convention) == OPEN_UNLEARNING
    cut = slice(0, max(0, len(tok_lp) - 1)) if ou else slice(0, len(tok_lp))
    lp, hit, z = list(tok_lp)[cut], list(tok_hit)[cut], list(tok_z)[cut]
    em = em_from_hits(hit)
    return {
        "em": em if (ou or em is not None) else float("nan"),
        "es": es_from_hits(hit, convention),
        "mia_loss": float(nll),
        "mia_zlib": float(nll) / (zlib_bytes_labels if ou else zlib_bytes_answer),
        "mia_min_k": min_k_score(lp, MIN_K, convention),
        "mia_min_k_plus_plus": min_k_score(z, MIN_K, convention),
    }
