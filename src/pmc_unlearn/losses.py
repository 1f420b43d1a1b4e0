"""Loss functions on logits and labels: pure tensor code, tested against hand computations.

Shapes: logits [B, T, V], labels [B, T] with -100 where a position does not count. Labels are
aligned with input_ids (HF convention): the logit at t predicts the label at t + 1.
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
    lp, mask = token_logprobs(logits, labels)
    return -lp.sum() / mask.sum().clamp(min=1)
