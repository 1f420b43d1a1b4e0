"""Supervised fine-tuning (the TOFU target/retain models): token-mean NLL on (question, answer), or on text chunks."""

from __future__ import annotations

from dataclasses import dataclass

from pmc_unlearn.formatting import collate_train, encode_row
from pmc_unlearn.lm import score_batch
from pmc_unlearn.losses import split_nll
from pmc_unlearn.methods.base import Method, Prepared, RunContext


@dataclass
class SFTConfig:
    """SFT has no options of its own; train.* holds the recipe."""


class SFT(Method):
    name = "sft"
    uses_retain = False

    def prepare(self, ctx: RunContext, idx, ridx) -> Prepared:
        ex = [encode_row(ctx.tokenizer, ctx.primary[i], ctx.fmt) for i in idx]  # QA pairs or text chunks
        batch = collate_train(ex, ctx.tokenizer.pad_token_id)
        return Prepared(batch, len(ex), {"data/truncated_frac": sum(e.truncated for e in ex) / len(ex)},
                        tokens=sum(len(e.answer) for e in ex))

    def loss(self, ctx, model, prep):
        s = score_batch(model, prep.batch)
        nll, _ = split_nll(s.logprobs, s.mask, prep.n_primary)
        return nll, {"train/nll": float(nll.detach())}

