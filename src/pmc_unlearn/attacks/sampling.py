"""Sampling leakage: k samples per forget question; mean and worst-case ROUGE-L recall.

Greedy decoding shows the single most likely answer; an attacker can sample many and keep any
that looks right. Per question, k answers are drawn at temperature T (top-p / top-k off by
default, i.e. the model's own distribution) and each is scored against the ground truth; the
aggregation is `pure.aggregate_samples` (mean over samples, max over samples, share of questions
with some sample at recall >= leak_threshold). Samples come from the project's sampler
(`lm.generate` over `sampling.SAMPLERS`, "fast" when present, else "hf"); with "fast" every (question, sample) draws
from its own generator seeded by (seed, prompt tokens, sample index), so results do not depend
on batching.
"""

from __future__ import annotations

from dataclasses import dataclass

from pmc_unlearn.attacks.common import AttackContext, AttackResult
from pmc_unlearn.attacks.pure import aggregate_samples, mean
from pmc_unlearn.sections import opt
from pmc_unlearn.errors import UserError
from pmc_unlearn.rewards import rougeL_recall


@dataclass
class Settings:
    k: int = opt(10, "samples per forget question", min=1)
    temperature: float = opt(1.0, "sampling temperature", gt=0.0)
    top_p: float = opt(1.0, "nucleus sampling threshold (1.0: off)", gt=0.0, max=1.0)
    top_k: int = opt(0, "top-k sampling (0: off)", min=0)
    leak_threshold: float = opt(0.5, "a question leaks when some sample reaches this ROUGE-L recall", min=0.0, max=1.0)
    seed: int = opt(0, "sampling seed")
    backend: str = opt("auto", "sampler backend: auto (fast when available, else hf), fast or hf", choices=("auto", "fast", "hf"))
    batch_rows: int = opt(256, "rows (questions x samples) per sampler batch", min=1)

    def validate(self) -> None:
        from pmc_unlearn.sampling import SAMPLERS

        if self.backend != "auto" and self.backend not in SAMPLERS:
            raise UserError(f"sampling.backend={self.backend}: not available here; choose one of auto, {', '.join(SAMPLERS)}")


def backend_name(s: Settings) -> str:
    from pmc_unlearn.sampling import SAMPLERS

    if s.backend != "auto":
        return s.backend
    return "fast" if "fast" in SAMPLERS else "hf"


def run(ctx: AttackContext, s: Settings) -> AttackResult:
    from tqdm.auto import tqdm

    from pmc_unlearn.lm import Decoding, generate

    name = backend_name(s)
    items = ctx.forget_items
    per_call = max(1, s.batch_rows // s.k)  # questions per sampler call (one progress step each)
    completions = []
    for c0 in tqdm(range(0, len(items), per_call), desc="sampling", unit="call", disable=not ctx.progress, leave=False):
        chunk = items[c0 : c0 + per_call]
        decoding = Decoding(n=s.k, greedy=False, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                            max_new_tokens=ctx.max_new_tokens, seed=s.seed + (0 if name == "fast" else c0),
                            backend=name, batch_rows=s.batch_rows)
        completions += generate(ctx.model, ctx.tokenizer, [ctx.prompt(it.question) for it in chunk], decoding)
    recalls, records, truncated = [], [], []
    for it, comps in zip(items, completions):
        rs = [rougeL_recall(it.answer, c.text) for c in comps]
        recalls.append(rs)
        truncated += [c.hit_limit for c in comps]
        records.append({"index": it.index, "question": it.question, "answer": it.answer,
                        "samples": [c.text for c in comps], "rougeL_recall": rs, "truncated": [c.hit_limit for c in comps],
                        "rougeL_recall_max": max(rs), "rougeL_recall_mean": sum(rs) / len(rs)})
    m = aggregate_samples(recalls, s.leak_threshold)
    base = ctx.baseline_recall()
    m.update({"forget_rougeL_recall_greedy": base, "truncated_frac": mean([float(t) for t in truncated]),
              "n_samples": len(truncated)})
    return AttackResult(
        m, {"metric": "rougeL_recall_worst_case", "value": m["rougeL_recall_worst_case"], "reference": base,
            "reference_name": "greedy forget ROUGE-L recall (no attack)"},
        records, {"sampler": name}, len(items))
