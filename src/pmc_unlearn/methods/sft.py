"""Supervised fine-tuning (the TOFU target/retain models): token-mean NLL on (question, answer), or on text chunks."""

from __future__ import annotations

from dataclasses import dataclass

from pmc_unlearn.formatting import collate_train, encode_row
from pmc_unlearn.lm import score_batch
from pmc_unlearn.losses import split_nll
from pmc_unlearn.methods.base import Method, Prepared, RunContext
from pmc_unlearn.sections import opt


# The recipe of `pmc-unlearn finetune` and the demo's target and retain models: TOFU's (5 epochs,
# warm-up 1 epoch, weight decay 0.01) except learning rate and batch. TOFU uses lr 1e-5 to 2e-5 at
# effective batch 32 for 1B+ models; the bundled 135M model needed lr 1e-4 at batch 8 to learn the
# facts in 5 epochs (measured: greedy ROUGE-L recall 0.39 -> 0.97 on 200 pairs). For big models
# pass train.lr=1e-5 train.grad_accum=4. The layer above the built-in defaults (load_config's `defaults`).
FINETUNE_DEFAULTS = {
    "train": {"epochs": 5.0, "warmup_epochs": 1.0, "lr": 1e-4, "weight_decay": 0.01, "batch_size": 8, "grad_accum": 1},
}


@dataclass
class SFTConfig:
    """SFT's own key is its training data; train.* holds the recipe."""

    data: str = opt("", "training data (question/answer pairs, or texts): tofu:full, tofu:retain90, a "
                        ".json/.jsonl/.csv/.parquet file, or a hub dataset (`finetune --data`); older configs "
                        "gave it as data.forget, which is still read")


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

