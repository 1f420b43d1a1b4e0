"""The MUSE-News demo (`pmc-unlearn demo --profile muse-quick`): the demo's stages on news articles.

    data/                  forget.jsonl (the chosen forget articles), retain.jsonl (retain texts),
                           target.jsonl (both): text rows {"text": ...}
    runs/target            fine-tune the base model on target.jsonl (plain language modelling)
    runs/retain            fine-tune the base model on retain.jsonl only (PrivLeak's reference)
    eval/retain, eval/target, eval/base
    runs/pmc -> eval/pmc   unlearn the forget articles from the target with PMC
    runs/npo -> eval/npo   ... and with the baselines the profile lists
    report.html, report.md

The forget articles are the `muse.forget_articles` articles of `muse-news:forget` that cover the
most knowmem forget questions (`evaluation.muse.pick_docs`: the answer and most of the question's
words occur in the article), so that KnowMem-forget has questions the target can know; the
evaluation runs VerbMem and KnowMem-forget on the items those articles cover and uses them as
PrivLeak's forget side (`evaluate_muse(..., forget_texts=...)`). The retain texts are the first
`muse.retain_texts` of `muse-news:retain` (MUSE's raw retain corpus is missing upstream).
Stages, caching and resuming are both demos' (`demo_base.DemoBase`); only the data, the stage
list and the evaluation differ from the TOFU demo's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmc_unlearn.demo_base import (
    DEMO_VERSION, EVAL_DTYPES, RATES, DemoBase, ReportSettings, check_output, check_sections, speed_scale,
)
from pmc_unlearn.errors import UserError
from pmc_unlearn.pipeline import Stage
from pmc_unlearn.precision import default_device, resolve_dtype
from pmc_unlearn.provenance import write_json_atomic, write_jsonl_atomic
from pmc_unlearn.sections import opt

BENCHMARK = "muse-news"


@dataclass
class MuseSettings:
    forget_articles: int = opt(10, "forget articles (muse-news:forget articles covering the most knowmem questions)",
                               min=1, max=888, required=True)
    retain_texts: int = opt(10, "retain texts (the first N of muse-news:retain)", min=1, max=100, required=True)


@dataclass
class MuseEvaluateSettings:
    max_examples: int | None = opt(None, "items per split (null: the evaluation's default)", min=1)
    batch_size: int = opt(16, "examples per evaluation batch", min=1, required=True)
    dtype: str = opt("auto", "weights during evaluation: auto, float32, bfloat16", choices=EVAL_DTYPES)
    max_length: int | None = opt(None, "tokens of each privleak text scored (null: the evaluation's default)", min=1)


MUSE_SECTIONS = {"muse": MuseSettings, "evaluate": MuseEvaluateSettings, "report": ReportSettings}


def validate_muse_profile(p: dict[str, Any]) -> None:
    check_sections(p, MUSE_SECTIONS, required=("muse", "finetune", "unlearn", "evaluate"))


@dataclass
class MuseData:
    forget_file: Path
    retain_file: Path
    target_file: Path
    forget_docs: list[int]  # indices into muse-news:forget (empty documents skipped, as the loader does)
    retain_docs: list[int]
    knowmem_forget: list[int]  # knowmem forget questions the forget articles cover
    digest: str


def prepare_muse_data(profile: dict[str, Any], root: Path) -> MuseData:
    """Write data/forget.jsonl, retain.jsonl and target.jsonl (text rows) for the profile."""
    from pmc_unlearn.data import load_qa, load_rows
    from pmc_unlearn.evaluation.muse import answerable, pick_docs

    arts = [r["text"] for r in load_qa("muse-news:forget", require_answers=False, allow_text=True)]
    kf = load_rows("muse-news:knowmem_forget")
    fdocs = pick_docs(kf, arts, profile["muse"]["forget_articles"])
    if not fdocs:
        raise UserError("muse-news: no forget article covers a knowmem question (check the bundled data)")
    retain = [r["text"] for r in load_rows("muse-news:retain")][: profile["muse"]["retain_texts"]]
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    forget = [{"text": arts[j], "muse_forget_doc": j} for j in fdocs]
    ret = [{"text": t, "muse_retain_doc": j} for j, t in enumerate(retain)]
    write_jsonl_atomic(d / "forget.jsonl", forget)
    write_jsonl_atomic(d / "retain.jsonl", ret)
    write_jsonl_atomic(d / "target.jsonl", forget + ret)
    h = hashlib.sha256()
    for f in ("forget.jsonl", "retain.jsonl", "target.jsonl"):
        h.update((d / f).read_bytes())
    return MuseData(d / "forget.jsonl", d / "retain.jsonl", d / "target.jsonl", fdocs, list(range(len(retain))),
                    answerable(kf, [arts[j] for j in fdocs]), h.hexdigest()[:16])


class MuseDemo(DemoBase):
    """The demo's stage runner with MUSE-News data, models and evaluation."""

    def _data_info(self) -> dict[str, Any]:
        return {"benchmark": BENCHMARK, "forget_articles": self.data.forget_docs,
                "retain_texts": len(self.data.retain_docs), "knowmem_forget_covered": self.data.knowmem_forget}

    def build(self) -> list[Stage]:
        from pmc_unlearn.evaluation.records import SCHEMA_VERSION

        check_output(self.root)
        p, root = self.p, self.root.resolve()
        self.data = data = prepare_muse_data(p, root)
        self.specs = []
        ev = p["evaluate"]
        dev = default_device()
        self.eval_dtype = resolve_dtype(ev.get("dtype", "auto"), "cpu", "evaluate.dtype").dtype
        scale = speed_scale(False) if dev == "cpu" else 0.25
        r = RATES["fp32"]
        n_tok = {f: sum(len(x) for x in f.read_text(encoding="utf-8").splitlines()) / 4.0  # ~4 characters a token
                 for f in (data.forget_file, data.retain_file, data.target_file)}

        def train_est(cfg, f: Path) -> float:
            t = cfg.train
            chunks = max(1.0, n_tok[f] / cfg.data.max_length)
            ex = chunks * t.epochs if t.max_steps < 0 else min(chunks * t.epochs, t.max_steps * t.batch_size * t.grad_accum)
            return (r["fixed"] + ex * r["train_example"] * cfg.data.max_length / 100.0) * scale

        n_eval = ev.get("max_examples") or 100
        eval_est = (r["fixed"] + n_eval * (128 + 2 * 32) * r["gen_token"] + 2 * n_eval * r["nll_seq"] * 10) * scale

        def est(cfg, f: Path | None) -> float:
            if f is not None:
                return train_est(cfg, f)
            e = train_est(cfg, data.forget_file) * 2
            if cfg.method == "pmc":
                mc = cfg.method_cfg
                e += n_tok[data.forget_file] / cfg.data.max_length * cfg.train.epochs * mc.n_samples * mc.max_new_tokens \
                    * r["sample_token"] * scale
            return e

        stages, models, keys, unlearned = self._training_stages(
            [("target", data.target_file, data.target_file), ("retain", data.retain_file, data.retain_file)],
            data.forget_file, data.retain_file, data.digest, {"benchmark": BENCHMARK}, est)
        common = {"v": DEMO_VERSION, "benchmark": BENCHMARK, "records_schema": SCHEMA_VERSION, "evaluate": ev,
                  "dtype": self.eval_dtype, "data": data.digest}
        stages += self._eval_stages(["retain", "target", "base"] + unlearned, models, keys, stages, common, eval_est)
        self.notes.append("attacks: not run on muse-news (the attack suite is TOFU's)")
        self.stages = stages
        return stages

    def _eval_runner(self, model: str, d: Path, reference: Path | None, role: str):
        def run(resume: bool) -> dict:
            from pmc_unlearn.evaluation.muse import SUMMARY_KEYS, evaluate_muse

            ev = self.p["evaluate"]
            s = evaluate_muse(model, d, retain_records=reference, require_privleak=False, self_reference=reference is None,
                              max_examples=ev.get("max_examples"), forget_texts=str(self.data.forget_file),
                              **({"max_length": ev["max_length"]} if ev.get("max_length") else {}),
                              batch_size=ev["batch_size"], dtype=self.eval_dtype, progress=self.progress,
                              device="cpu")
            s["demo_role"] = role
            write_json_atomic(d / "summary.json", s)
            return {k: s.get(k) for k in (*SUMMARY_KEYS, "privleak_min_k_auc", "time_collect_s")}

        return run


__all__ = ["MuseDemo", "prepare_muse_data", "validate_muse_profile"]
