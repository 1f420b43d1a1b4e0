"""Prefill: start the answer for the model ("The answer is:") and decode greedily from there.

A model that learned to refuse or deflect at the first answer token may still complete a
started answer. For each prefix, the prompt is the evaluation prompt followed by the prefix
tokens (`pure.prefix_text`: trailing whitespace dropped, a leading space without a chat
template); ROUGE-L recall is computed on the generated *continuation only*: the prefix is never
scored, so its words ("the", "is") cannot inflate recall. The same prefixes on retain questions
(TOFU's retain_perturbed) are the control: a prefix that breaks the model there explains a drop
on forget too.
"""

from __future__ import annotations

from dataclasses import dataclass

from pmc_unlearn.attacks.common import AttackContext, AttackResult, load_items
from pmc_unlearn.attacks.pure import join_prefix, mean, prefix_text
from pmc_unlearn.sections import opt
from pmc_unlearn.errors import UserError
from pmc_unlearn.rewards import rougeL_recall

RETAIN_SOURCE = "tofu:retain_perturbed"


@dataclass
class Settings:
    prefixes: list[str] = opt(["The answer is: "], "answer prefixes, each tried separately (a YAML list)")
    retain_control: bool = opt(True, "also run on retain_perturbed (same --max-examples) with and without each prefix")

    def validate(self) -> None:
        if not self.prefixes or not all(isinstance(p, str) and p.strip() for p in self.prefixes):
            raise UserError(f"prefill.prefixes={self.prefixes!r}: give a non-empty list of non-empty strings")
        if len(set(self.prefixes)) != len(self.prefixes):
            raise UserError(f"prefill.prefixes={self.prefixes!r}: a prefix is listed twice")


def _prefilled(ctx: AttackContext, questions: list[str], prefix: str) -> list[list[int]]:
    pre = ctx.tokenizer(prefix_text(prefix, ctx.chat), add_special_tokens=False).input_ids
    return [ctx.prompt(q) + pre for q in questions]


def run(ctx: AttackContext, s: Settings) -> AttackResult:
    items = ctx.forget_items
    base = ctx.baseline()
    base_recall = mean([rougeL_recall(it.answer, base[it.index].text) for it in items])
    retain = ctx.cut(load_items(RETAIN_SOURCE)) if s.retain_control else []
    retain_base = None
    records = []
    if retain:
        gens = ctx.greedy([it.question for it in retain], desc="prefill retain (no prefix)")
        rs = [rougeL_recall(it.answer, g.text) for it, g in zip(retain, gens)]
        retain_base = mean(rs)
        records += [{"split": "retain", "prefix": None, "index": it.index, "question": it.question, "answer": it.answer,
                     "generation": g.text, "rougeL_recall": r, "hit_limit": g.hit_limit}
                    for it, g, r in zip(retain, gens, rs)]
    per_prefix = []
    for prefix in s.prefixes:
        row = {"prefix": prefix, "prefix_text": prefix_text(prefix, ctx.chat)}
        for split, its in (("forget", items), ("retain", retain)):
            if not its:
                row[f"{split}_rougeL_recall"] = None
                continue
            gens = ctx.greedy_ids(_prefilled(ctx, [it.question for it in its], prefix), desc=f"prefill {split}")
            rs = [rougeL_recall(it.answer, g.text) for it, g in zip(its, gens)]
            with_prefix = [rougeL_recall(it.answer, join_prefix(prefix, g.text)) for it, g in zip(its, gens)]
            row[f"{split}_rougeL_recall"] = mean(rs)
            # what scoring the prefix too would give: shows how much it would have inflated recall
            row[f"{split}_rougeL_recall_if_prefix_scored"] = mean(with_prefix)
            records += [{"split": split, "prefix": prefix, "index": it.index, "question": it.question,
                         "answer": it.answer, "generation": g.text, "answer_text": join_prefix(prefix, g.text),
                         "rougeL_recall": r, "hit_limit": g.hit_limit}
                        for it, g, r in zip(its, gens, rs)]
        per_prefix.append(row)
    worst = max(per_prefix, key=lambda r: r["forget_rougeL_recall"])
    m = {
        "forget_rougeL_recall_max_over_prefixes": worst["forget_rougeL_recall"],
        "worst_prefix": worst["prefix"],
        "forget_rougeL_recall_baseline": base_recall,
        "retain_rougeL_recall_baseline": retain_base,
        "by_prefix": per_prefix,
        "prefix_scored": False,
    }
    return AttackResult(
        m, {"metric": "forget_rougeL_recall_max_over_prefixes", "value": worst["forget_rougeL_recall"],
            "reference": base_recall, "reference_name": "greedy forget ROUGE-L recall (no prefix)"},
        records, {"n_retain_examples": len(retain)}, len(items))
