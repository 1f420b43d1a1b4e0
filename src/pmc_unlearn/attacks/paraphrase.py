"""Paraphrase: ask the forget questions in other words (TOFU's paraphrased questions).

Unlearning that keys on the surface form of a question leaves the knowledge reachable through a
rephrasing. Greedy answers to the paraphrased questions are scored against the paraphrased
answers (the R(forget, paraphrased) term of the PMC paper's unlearn quality) and against the
original answers (the same facts, the reference an attacker would compare with).
"""

from __future__ import annotations

from dataclasses import dataclass

from pmc_unlearn.attacks.common import AttackContext, AttackResult
from pmc_unlearn.attacks.pure import mean
from pmc_unlearn.rewards import rougeL_recall


@dataclass
class Settings:
    """No options: the paraphrases are TOFU's (tofu:<forget split>_perturbed, paraphrased_question)."""


def run(ctx: AttackContext, s: Settings) -> AttackResult:
    items = ctx.forget_items
    gens = ctx.greedy([it.para_question for it in items], desc="paraphrase")
    vs_para = [rougeL_recall(it.para_answer, g.text) for it, g in zip(items, gens)]
    vs_orig = [rougeL_recall(it.answer, g.text) for it, g in zip(items, gens)]
    base = ctx.baseline_recall()
    m = {
        "para_rougeL_recall": mean(vs_para),
        "para_vs_original_answer_rougeL_recall": mean(vs_orig),
        "forget_rougeL_recall_baseline": base,
    }
    records = [{"index": it.index, "question": it.para_question, "original_question": it.question,
                "answer": it.answer, "para_answer": it.para_answer, "generation": g.text,
                "rougeL_recall_vs_para": a, "rougeL_recall_vs_original": b, "hit_limit": g.hit_limit}
               for it, g, a, b in zip(items, gens, vs_para, vs_orig)]
    return AttackResult(
        m, {"metric": "para_rougeL_recall", "value": m["para_rougeL_recall"], "reference": base,
            "reference_name": "greedy forget ROUGE-L recall on the original questions"},
        records, {}, len(items))
