"""Relearning: fine-tune a copy briefly on part of the forget set; does the *rest* come back?

If unlearning only suppressed the knowledge, a few steps on some forget facts revive the others
(Hu et al. 2024, Lynch et al. 2024). Steps:
1. split the forget set by author (`pure.author_split`: TOFU rows come 20 per author; `fraction`
   of the authors, shuffled by `seed`, train; the others are measured), so the measured answers
   were never in the relearning data;
2. greedy ROUGE-L recall on the measured rows (and on the trained rows) with the attacked model;
3. fine-tune a copy on the trained rows with the shared loop (`trainer.train`, method sft, the
   same code as `pmc-unlearn finetune`) into `<output>/relearning/forget_ft/`;
4. control: the same recipe on as many retain rows (whole authors of tofu:retainXX, drawn with
   `seed`) into `<output>/relearning/retain_ft/`: generic fine-tuning that revives the forget
   set says less about the forget data than relearning on it does;
5. greedy recall on the measured rows (and the trained rows) after each fine-tune.
`--max-examples N` keeps the first N trained rows, N measured rows (and N retain rows).
The fine-tuned weights are deleted after measuring unless `relearning.keep_models=true`; the
config.yaml, manifest.json and log.jsonl of each fine-tune stay.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from pmc_unlearn.attacks.common import AttackContext, AttackResult, Item, Timer
from pmc_unlearn.attacks.pure import AUTHOR_SIZE, author_rows, author_split, mean, n_authors, pick_authors
from pmc_unlearn.sections import opt
from pmc_unlearn.errors import UserError
from pmc_unlearn.rewards import rougeL_recall

log = logging.getLogger(__name__)

SUBDIR = "relearning"


@dataclass
class Settings:
    fraction: float = opt(0.5, "share of the forget authors to fine-tune on (the others are measured)", gt=0.0, max=1.0)
    seed: int = opt(0, "seed of the author split, the retain authors and the fine-tuning")
    epochs: float = opt(1.0, "fine-tuning epochs over the chosen rows", gt=0.0)
    max_steps: int = opt(-1, "stop after this many optimizer steps (-1: all epochs)", min=-1)
    lr: float = opt(2e-5, "peak learning rate (AdamW, linear decay; no warm-up by default)", gt=0.0)
    warmup_epochs: float = opt(0.0, "linear warm-up length in epochs", min=0.0)
    batch_size: int = opt(4, "rows per micro-batch", min=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", min=1)
    weight_decay: float = opt(0.01, "AdamW weight decay", min=0.0)
    bf16: bool | str = opt("auto", "bf16 autocast while fine-tuning (train.bf16: auto, true or false)", auto=True)
    retain_control: bool = opt(True, "also fine-tune a copy on retain rows only (the control)")
    keep_models: bool = opt(False, "keep the fine-tuned weights in <output>/relearning/*/model")

    def validate(self) -> None:
        if self.fraction >= 1.0:
            raise UserError(f"relearning.fraction={self.fraction}: must be below 1 (some authors must stay unseen)")


def _rows(items: list[Item], idx: list[int]) -> list[Item]:
    return [items[i] for i in idx]


def _recall(ctx: AttackContext, items: list[Item], model, desc: str) -> tuple[float | None, list]:
    gens = ctx.greedy([it.question for it in items], model=model, desc=desc)
    rs = [rougeL_recall(it.answer, g.text) for it, g in zip(items, gens)]
    return mean(rs), list(zip(items, gens, rs))


def _finetune(ctx: AttackContext, s: Settings, base_folder: str, rows: list[dict], out: Path) -> dict:
    """Fine-tune base_folder on rows with the shared loop; returns the trained model's folder and loss facts."""
    from pmc_unlearn import rundir
    from pmc_unlearn.config import load_config
    from pmc_unlearn.trainer import train

    shutil.rmtree(out, ignore_errors=True)
    data = out.with_name(out.name + ".data.jsonl")
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}, ensure_ascii=False) + "\n"
                            for r in rows), encoding="utf-8")
    extra = {
        "model": {"name": base_folder, "dtype": ctx.dtype},
        "sft": {"data": str(data)},
        "data": {"use_chat_template": ctx.fmt.use_chat_template,
                 "system_prompt": ctx.fmt.system_prompt, "max_length": ctx.fmt.max_length},
        "train": {"epochs": s.epochs, "max_steps": s.max_steps, "lr": s.lr, "warmup_epochs": s.warmup_epochs,
                  "batch_size": s.batch_size, "grad_accum": s.grad_accum, "weight_decay": s.weight_decay,
                  "bf16": s.bf16, "seed": s.seed, "save_every": 0, "keep_checkpoints": 1},
    }
    cfg = load_config(method="sft", extra=extra)
    rundir.prepare_output(out, resume=False)
    with Timer() as t:
        man = train(cfg, out, command=["pmc-unlearn", "attack", "relearning", out.name])
    losses = [json.loads(x).get("train/loss") for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
    return {"model_folder": str(out / "model"), "steps": man.get("steps"), "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None, "time_s": round(t.s, 3), "n_rows": len(rows),
            "run_folder": f"{SUBDIR}/{out.name}"}


def _cleanup(out: Path) -> None:
    shutil.rmtree(out / "model", ignore_errors=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def run(ctx: AttackContext, s: Settings) -> AttackResult:
    import torch

    from pmc_unlearn.data import load_qa
    from pmc_unlearn.evaluation.suite import retain_for
    from pmc_unlearn.models import load_model, save_model

    root = ctx.out / SUBDIR
    split = author_split(len(ctx.items), s.fraction, s.seed)
    train_idx, eval_idx = ctx.cut(split.train_rows), ctx.cut(split.eval_rows)
    train_items, eval_items = _rows(ctx.items, train_idx), _rows(ctx.items, eval_idx)

    retain_src = f"tofu:{retain_for(ctx.forget_split)}"
    retain_rows, retain_authors, retain_idx = [], [], []
    if s.retain_control:
        all_retain = load_qa(retain_src, role="retain")
        count = min(n_authors(len(all_retain)), len(split.train_authors))
        retain_authors = pick_authors(len(all_retain), count, s.seed)
        retain_idx = author_rows(retain_authors, len(all_retain))[: len(train_idx)]
        retain_rows = [all_retain[i] for i in retain_idx]

    before_eval, recs_before = _recall(ctx, eval_items, None, "relearning: measured rows, before")
    before_train, _ = _recall(ctx, train_items, None, "relearning: trained rows, before")

    base_folder, saved_here = ctx.model_folder, False
    if base_folder is None:  # an alias or an in-memory model: give the loop these exact weights
        base_folder = str(root / "base_model")
        save_model(ctx.model, ctx.tokenizer, Path(base_folder), prompt_format=ctx.fmt)
        saved_here = True

    variants = [("forget_ft", [{"question": it.question, "answer": it.answer} for it in train_items])]
    if s.retain_control:
        variants.append(("retain_ft", retain_rows))
    runs, records = {}, []
    records += [{"phase": "before", "role": "measured", "index": it.index, "question": it.question, "answer": it.answer,
                 "generation": g.text, "rougeL_recall": r} for it, g, r in recs_before]
    try:
        for name, rows in variants:
            info = _finetune(ctx, s, base_folder, rows, root / name)
            lm = load_model(info["model_folder"], ctx.dtype, device=ctx.device)
            lm.model.eval()
            info["heldout_rougeL_recall"], recs = _recall(ctx, eval_items, lm.model, f"relearning: measured rows, after {name}")
            info["trained_rougeL_recall"], _ = _recall(ctx, train_items, lm.model, f"relearning: trained rows, after {name}")
            records += [{"phase": f"after_{name}", "role": "measured", "index": it.index, "question": it.question,
                         "answer": it.answer, "generation": g.text, "rougeL_recall": r} for it, g, r in recs]
            del lm
            if not s.keep_models:
                _cleanup(root / name)
                info["model_folder"] = None  # deleted (relearning.keep_models=false)
            runs[name] = info
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        if saved_here and not s.keep_models:
            shutil.rmtree(base_folder, ignore_errors=True)

    after = runs["forget_ft"]["heldout_rougeL_recall"]
    m = {
        "heldout_rougeL_recall_before": before_eval,
        "heldout_rougeL_recall_after_forget_ft": after,
        "heldout_rougeL_recall_after_retain_ft": runs["retain_ft"]["heldout_rougeL_recall"] if "retain_ft" in runs else None,
        "trained_rougeL_recall_before": before_train,
        "trained_rougeL_recall_after_forget_ft": runs["forget_ft"]["trained_rougeL_recall"],
        "forget_ft": runs["forget_ft"],
        "retain_ft": runs.get("retain_ft"),
    }
    extra = {"split": {
        "by": f"author ({AUTHOR_SIZE} consecutive rows each, in TOFU order)", "seed": s.seed, "fraction": s.fraction,
        "rng": "numpy default_rng([seed, 0]).permutation(authors) for the forget split, default_rng([seed, 1]) for retain authors",
        "forget_source": f"tofu:{ctx.forget_split}_perturbed (rows = tofu:{ctx.forget_split})",
        "train_authors": split.train_authors, "eval_authors": split.eval_authors,
        "train_rows": train_idx, "eval_rows": eval_idx,
        "retain_source": retain_src if s.retain_control else None,
        "retain_authors": retain_authors, "retain_rows": retain_idx,
    }, "base_model": "saved copy of the attacked weights" if saved_here else base_folder}
    return AttackResult(
        m, {"metric": "heldout_rougeL_recall_after_forget_ft", "value": after, "reference": before_eval,
            "reference_name": "held-out forget ROUGE-L recall before relearning"},
        records, extra, len(eval_items))
