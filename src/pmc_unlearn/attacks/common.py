"""What every attack shares: the forget items, the model context, greedy decoding and scoring.

An attack module defines `Settings` (a dataclass whose fields carry help texts and bounds, the
`<attack>.key=value` overrides; `validate()` checks them), `run(ctx, settings) -> AttackResult`,
and optionally `check(ctx, settings)`: model-dependent checks that run before any attack does.
Greedy decoding here is the evaluation's (`evaluation.scoring.generate_greedy_ids`, through
`lm.generate`: left-padded batches sorted by length, cut at EOS) on token ids, so a prompt can
carry a prefilled answer start; with no prefix the generations are the evaluation's own.
Generations are `sampling.Completion`s; answers are compared by `rewards.rougeL_recall`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pmc_unlearn.formatting import PromptFormat, prompt_ids, uses_chat
from pmc_unlearn.rewards import rougeL_recall
from pmc_unlearn.sampling import Completion

log = logging.getLogger(__name__)

Record = dict[str, Any]


@dataclass
class Item:
    """One forget question with its ground truth, paraphrase and perturbed (wrong) answers."""

    index: int  # row in tofu:<forget split>_perturbed (the same rows, in the same order, as tofu:<forget split>)
    question: str
    answer: str
    para_question: str
    para_answer: str
    pert_answers: list[str]


def load_items(source: str) -> list[Item]:
    """Every row of a TOFU *_perturbed split as Items (answers, paraphrases, perturbed answers)."""
    from pmc_unlearn.data import load_rows

    return [Item(i, r["question"], r["answer"], r.get("paraphrased_question", r["question"]),
                 r.get("paraphrased_answer", r["answer"]), list(r.get("perturbed_answer") or []))
            for i, r in enumerate(load_rows(source))]


@dataclass
class AttackResult:
    """What one attack returns: its numbers, a headline for tables, per-example records, extras."""

    metrics: dict[str, Any]
    headline: dict[str, Any]  # {"metric": name, "value": x, "reference": y, "reference_name": what y is}
    records: list[Record] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # attack-specific facts (split, backend, ...)
    n_examples: int = 0


@dataclass
class AttackContext:
    """The model under attack and the run-wide settings every attack reads."""

    model: Any
    tokenizer: Any
    fmt: PromptFormat
    forget_split: str
    items: list[Item]  # every forget row (relearning splits all of them by author)
    max_examples: int | None
    max_new_tokens: int
    batch_size: int
    out: Path
    dtype: str
    device: str
    model_name: str
    model_folder: str | None  # a save_pretrained folder holding these exact weights, when there is one
    progress: bool = True
    _baseline: dict[int, Completion] = field(default_factory=dict)

    @property
    def chat(self) -> bool:
        return uses_chat(self.tokenizer, self.fmt)

    def cut(self, xs: Sequence) -> list:
        return list(xs[: self.max_examples] if self.max_examples else xs)

    @property
    def forget_items(self) -> list[Item]:
        """The forget items attacked (the first max_examples rows)."""
        return self.cut(self.items)

    def prompt(self, question: str) -> list[int]:
        return prompt_ids(self.tokenizer, question, self.fmt)

    @torch.inference_mode()
    def greedy_ids(self, prompts: Sequence[list[int]], model=None, desc: str = "greedy") -> list[Completion]:
        """Greedy continuations of token-id prompts (evaluation.scoring.generate_greedy_ids), in input order."""
        from tqdm.auto import tqdm

        from pmc_unlearn.evaluation.scoring import generate_greedy_ids

        model = self.model if model is None else model
        step = 4 * self.batch_size  # a progress update every few batches; results do not depend on it
        out: list[Completion] = []
        with tqdm(total=len(prompts), desc=desc, unit="ex", disable=not self.progress, leave=False) as bar:
            for c0 in range(0, len(prompts), step):
                part = generate_greedy_ids(model, self.tokenizer, prompts[c0 : c0 + step], self.max_new_tokens,
                                           self.batch_size)
                out += part
                bar.update(len(part))
        return out

    def greedy(self, questions: Sequence[str], model=None, desc: str = "greedy") -> list[Completion]:
        return self.greedy_ids([self.prompt(q) for q in questions], model, desc)

    def baseline(self) -> dict[int, Completion]:
        """Greedy answers of the unattacked model to the attacked forget questions (computed once)."""
        todo = [it for it in self.forget_items if it.index not in self._baseline]
        if todo:
            for it, g in zip(todo, self.greedy([it.question for it in todo], desc="baseline")):
                self._baseline[it.index] = g
        return {it.index: self._baseline[it.index] for it in self.forget_items}

    def baseline_recall(self) -> float | None:
        from pmc_unlearn.attacks.pure import mean

        b = self.baseline()
        return mean([rougeL_recall(it.answer, b[it.index].text) for it in self.forget_items])


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t
