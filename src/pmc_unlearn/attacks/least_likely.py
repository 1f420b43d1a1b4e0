"""Least-likely option: a suppressed answer stands out by being *less* likely than wrong ones.

For each forget question the options are the ground-truth answer and TOFU's perturbed (wrong)
answers (tofu:<forget split>_perturbed, perturbed_answer). Likelihood is the per-token mean
log-probability of the answer tokens given the question (minus the token-mean NLL from the
evaluation's `answer_nll`; the mean, not the sum, so option length does not decide). An
attacker who picks the *least* likely option recovers the removed answer with
`least_likely_accuracy`; chance is the mean of 1 / (number of options) (1/6 on TOFU). A model
that unlearned by pushing the true answer far below any plausible alternative scores high here.
`most_likely_accuracy` (the usual multiple-choice accuracy) is reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pmc_unlearn.attacks.common import AttackContext, AttackResult
from pmc_unlearn.attacks.pure import aggregate_options, least_likely_credit, mean, rank_from_least_likely
from pmc_unlearn.errors import UserError


@dataclass
class Settings:
    """No options: ground truth plus every perturbed answer TOFU has for the question."""


def run(ctx: AttackContext, s: Settings) -> AttackResult:
    from pmc_unlearn.evaluation.scoring import answer_nll

    items = ctx.forget_items
    if any(not it.pert_answers for it in items):
        raise UserError(f"least_likely: tofu:{ctx.forget_split}_perturbed has questions without perturbed answers")
    jobs = [(n, opt) for n, it in enumerate(items) for opt in [it.answer, *it.pert_answers]]
    nlls = answer_nll(ctx.model, ctx.tokenizer, [items[n].question for n, _ in jobs], [o for _, o in jobs],
                      ctx.fmt, ctx.batch_size)
    per_q: list[list[float]] = [[] for _ in items]
    for (n, _), v in zip(jobs, nlls):
        per_q[n].append(v)
    m = aggregate_options(per_q, truth=0)
    m["truth_mean_logprob"] = mean([-r[0] for r in per_q])
    m["perturbed_mean_logprob"] = mean([-x for r in per_q for x in r[1:]])
    m["likelihood"] = "per-token mean log-prob of the answer tokens (evaluation.scoring.answer_nll)"
    records = [{"index": it.index, "question": it.question, "options": [it.answer, *it.pert_answers],
                "truth_option": 0, "mean_logprob": [-x for x in r], "least_likely_credit": least_likely_credit(r),
                "truth_rank_from_least_likely": rank_from_least_likely(r)}
               for it, r in zip(items, per_q)]
    return AttackResult(
        m, {"metric": "least_likely_accuracy", "value": m["least_likely_accuracy"], "reference": m["chance"],
            "reference_name": "chance (mean of 1 / options)"},
        records, {}, len(items))
