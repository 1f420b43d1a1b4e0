"""Loss functions on logits and labels: pure tensor code, tested against hand computations.

Shapes: logits [B, T, V], labels [B, T] with -100 where a position does not count. Labels are
aligned with input_ids (HF convention): the logit at t predicts the label at t + 1. Every loss of
every method is here; the methods only build batches, run the model (`lm.score_batch`) and call
these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pmc_unlearn.formatting import IGNORE


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align predictions with targets: logits[:, :-1] predict labels[:, 1:]."""
    return logits[:, :-1, :], labels[:, 1:]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token and the mask of counted positions, both [B, T-1] (fp32)."""
    lg, tg = shift(logits, labels)
    mask = tg != IGNORE
    safe = tg.masked_fill(~mask, 0)
    # cross_entropy fuses log_softmax and the gather. Rows of [B*T, V] keep the vocabulary
    # contiguous: the [B, V, T] layout is about 3x slower on CPU. fp32 for an exact loss.
    B, T, V = lg.shape
    lp = -F.cross_entropy(lg.reshape(B * T, V).float(), safe.reshape(B * T), reduction="none").view(B, T)
    return lp * mask, mask


def per_example_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL of each example's answer, [B]. An example with no answer tokens gives NaN."""
    lp, mask = token_logprobs(logits, labels)
    return -lp.sum(1) / mask.sum(1)


def sum_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """S(y): summed answer log-prob per example, [B]."""
    lp, _ = token_logprobs(logits, labels)
    return lp.sum(1)


def token_mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL averaged over every answer token in the batch (HF's causal-LM loss), scalar."""
    return mean_nll(*token_logprobs(logits, labels))


# ----- from token log-probs (lm.Scored.logprobs / .mask, [B, T-1]) ---------------------------------

def mean_nll(lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL of rows given their token log-probs and mask (every answer token weighs the same)."""
    return -lp.sum() / mask.sum().clamp(min=1)


def split_nll(lp: torch.Tensor, mask: torch.Tensor, n_primary: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-mean NLL of the primary rows [0, n_primary) and of the retain rows after them (None if none)."""
    p = mean_nll(lp[:n_primary], mask[:n_primary])
    if n_primary == lp.shape[0]:
        return p, None
    return p, mean_nll(lp[n_primary:], mask[n_primary:])


def npo_loss(s_theta: torch.Tensor, s_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO: -(2/beta) mean log sigmoid(-beta (S_theta - S_ref)); S are summed log-probs, [B]."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (s_theta - s_ref)).mean()


def simnpo_loss(s_theta: torch.Tensor, lengths: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimNPO (paper form): -(2/beta) mean log sigmoid(-beta S_theta / |y| - gamma); [B] -> scalar."""
    return -(2.0 / beta) * F.logsigmoid(-beta * s_theta / lengths - gamma).mean()


def dpo_loss(s_win: torch.Tensor, s_win_ref: torch.Tensor, s_lose: torch.Tensor, s_lose_ref: torch.Tensor,
             beta: float) -> torch.Tensor:
    """DPO scaled by 2/beta (open-unlearning's form): -(2/beta) mean log sigmoid(beta (win log-ratio - lose log-ratio))."""
    margin = (s_win - s_win_ref) - (s_lose - s_lose_ref)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


# ----- RMU (Li et al. 2024): activations ----------------------------------------------------------

def masked_mse(acts: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked tokens of the per-token mean squared error: acts [B, T, D], target broadcastable, mask [B, T]."""
    per_token = (acts.float() - target.float()).pow(2).mean(-1)  # [B, T]
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1)


# ----- SCRUB (Kurmanji et al. 2023): distillation from the frozen starting model ------------------

def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """Token-mean KL(teacher || student) over answer positions, at temperature T, times T^2.

    Both distributions are softmax(logits / T) over the vocabulary; the KL of each position that
    predicts a counted label is summed over the vocabulary and averaged over those positions
    (every answer token of the batch weighs the same, as the token-mean NLL). The T^2 factor
    (Hinton et al.'s distillation convention, kept by SCRUB) keeps gradients comparable across T.
    Logits [B, T, V] (same window for both), labels [B, T]; fp32 math; 0 when nothing counts.
    """
    s, tg = shift(student_logits, labels)
    t, _ = shift(teacher_logits, labels)
    mask = tg != IGNORE  # [B, T-1]
    if not bool(mask.any()):
        return student_logits.sum() * 0.0
    s, t = s[mask].float(), t[mask].float()  # [N, V]: only the counted positions
    log_q = F.log_softmax(s / temperature, dim=-1)  # student
    log_p = F.log_softmax(t / temperature, dim=-1)  # teacher
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [N]
    return kl.mean() * temperature**2


def scrub_max_loss(forget_kl: torch.Tensor) -> torch.Tensor:
    """SCRUB's max-step: descend -KL(teacher || student) on the forget answers (move away from the teacher)."""
    return -forget_kl


def scrub_min_loss(retain_kl: torch.Tensor, retain_nll: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """SCRUB's min-step on the retain set: alpha x KL(teacher || student) + gamma x task NLL."""
    return alpha * retain_kl + gamma * retain_nll


def scrub_phase(epoch: int, max_epochs: int) -> str:
    """"max" or "min" for a loop epoch (0-based): the odd epochs below 2 x max_epochs are max passes,
    every other epoch a min pass (min, max, min, max, ..., min, min, ...).

    SCRUB's own order puts each max pass before its min pass. Its first max pass would start with
    the student equal to the teacher, where KL(teacher || student) and its gradient are exactly 0
    (a language model has no dropout or batch-norm noise to break the tie), so it could not move:
    each SCRUB epoch here starts with its min pass instead.
    """
    return "max" if epoch < 2 * max_epochs and epoch % 2 == 1 else "min"
