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
Stages, caching and resuming are the TOFU demo's (`demo.Demo`); only the data, the stage list
and the evaluation differ.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmc_unlearn.demo import DEMO_VERSION, EVAL_DTYPES, Demo, Stage, _RATES, _write_jsonl, digest, speed_scale
from pmc_unlearn.errors import UserError
from pmc_unlearn.precision import default_device, resolve_dtype

BENCHMARK = "muse-news"
MUSE_KEYS = {"forget_articles", "retain_texts"}
MUSE_EVAL_KEYS = {"max_examples", "batch_size", "dtype", "max_length"}


def validate_muse_profile(p: dict[str, Any]) -> None:
    m = p.get("muse")
    if not isinstance(m, dict) or set(m) - MUSE_KEYS:
        raise UserError(f"demo profile: section 'muse' takes {', '.join(sorted(MUSE_KEYS))}")
    for k, hi in (("forget_articles", 888), ("retain_texts", 100)):
        v = m.get(k)
        if not isinstance(v, int) or not 1 <= v <= hi:
            raise UserError(f"muse.{k}={v!r}: a number of texts, 1 to {hi}")
    for sec in ("finetune", "unlearn", "evaluate"):
        if not isinstance(p.get(sec), dict):
            raise UserError(f"demo profile: section '{sec}' is missing or not a mapping")
    if "pmc" not in p["unlearn"]:
        raise UserError("demo profile: unlearn.pmc is missing (the demo is about PMC)")
    ev = p["evaluate"]
    bad = set(ev) - MUSE_EVAL_KEYS
    if bad:
        raise UserError(f"evaluate.{sorted(bad)[0]}: unknown key for a muse-news profile; known: "
                        f"{', '.join(sorted(MUSE_EVAL_KEYS))}")
    if ev.get("dtype", "auto") not in EVAL_DTYPES:
        raise UserError(f"evaluate.dtype={ev.get('dtype')!r}: choose one of {', '.join(EVAL_DTYPES)}")
    for k in ("max_examples", "batch_size", "max_length"):
        v = ev.get(k)
        if not (v is None and k != "batch_size") and (not isinstance(v, int) or v < 1):
            raise UserError(f"evaluate.{k}={v!r}: must be a positive integer" + (" (or null: the default)" if k != "batch_size" else ""))


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
    _write_jsonl(d / "forget.jsonl", forget)
    _write_jsonl(d / "retain.jsonl", ret)
    _write_jsonl(d / "target.jsonl", forget + ret)
    h = hashlib.sha256()
    for f in ("forget.jsonl", "retain.jsonl", "target.jsonl"):
        h.update((d / f).read_bytes())
    return MuseData(d / "forget.jsonl", d / "retain.jsonl", d / "target.jsonl", fdocs, list(range(len(retain))),
                    answerable(kf, [arts[j] for j in fdocs]), h.hexdigest()[:16])


class MuseDemo(Demo):
    """The demo's stage runner with MUSE-News data, models and evaluation."""

    def _data_info(self) -> dict[str, Any]:
        return {"benchmark": BENCHMARK, "forget_articles": self.data.forget_docs,
                "retain_texts": len(self.data.retain_docs), "knowmem_forget_covered": self.data.knowmem_forget}

    def build(self) -> list[Stage]:
        from pmc_unlearn.demo import check_output
        from pmc_unlearn.evaluation.records import SCHEMA_VERSION

        check_output(self.root)
        p, root = self.p, self.root.resolve()
        self.data = data = prepare_muse_data(p, root)
        self.specs = []
        base, ev = p["model"], p["evaluate"]
        dev = default_device()
        self.eval_dtype = resolve_dtype(ev.get("dtype", "auto"), "cpu", "evaluate.dtype").dtype
        scale = speed_scale(False) if dev == "cpu" else 0.25
        r = _RATES["fp32"]
        n_tok = {f: sum(len(x) for x in f.read_text(encoding="utf-8").splitlines()) / 4.0  # ~4 characters a token
                 for f in (data.forget_file, data.retain_file, data.target_file)}

        def train_est(cfg, f: Path) -> float:
            t = cfg.train
            chunks = max(1.0, n_tok[f] / cfg.data.max_length)
            ex = chunks * t.epochs if t.max_steps < 0 else min(chunks * t.epochs, t.max_steps * t.batch_size * t.grad_accum)
            return (r["fixed"] + ex * r["train_example"] * cfg.data.max_length / 100.0) * scale

        n_eval = ev.get("max_examples") or 100
        eval_est = (r["fixed"] + n_eval * (128 + 2 * 32) * r["gen_token"] + 2 * n_eval * r["nll_seq"] * 10) * scale
        stages: list[Stage] = []
        models: dict[str, tuple[str, str | None]] = {"base": (base, None)}
        keys: dict[str, str] = {}
        for name, f in (("target", data.target_file), ("retain", data.retain_file)):
            cfg = self._cfg("sft", p["finetune"], base, str(f), None)
            key = digest({"v": DEMO_VERSION, "benchmark": BENCHMARK, "cfg": self._normal(cfg), "data": data.digest})
            d = root / "runs" / name
            stages.append(Stage(f"finetune/{name}", "finetune", d, key, self._train_runner(cfg, d), train_est(cfg, f)))
            models[name] = (str(d / "model"), f"finetune/{name}")
            keys[f"finetune/{name}"] = key
        unlearned: list[str] = []
        for m, sections in p["unlearn"].items():
            d = root / "runs" / m
            name = f"unlearn/{m}"
            if not self._unlearn_wanted(m, sections, d, stages):
                continue
            cfg = self._cfg(m, dict(sections or {}), models["target"][0], str(data.forget_file), str(data.retain_file))
            key = digest({"v": DEMO_VERSION, "benchmark": BENCHMARK, "cfg": self._normal(cfg),
                          "target": keys["finetune/target"], "data": data.digest})
            est = train_est(cfg, data.forget_file) * 2
            if m == "pmc":
                mc = cfg.method_cfg
                est += n_tok[data.forget_file] / cfg.data.max_length * cfg.train.epochs * mc.n_samples * mc.max_new_tokens \
                    * r["sample_token"] * scale
            stages.append(Stage(name, "unlearn", d, key, self._train_runner(cfg, d), est,
                                needs=["finetune/target"], optional=(m != "pmc")))
            models[m] = (str(d / "model"), name)
            unlearned.append(m)
            keys[name] = key
        common = {"v": DEMO_VERSION, "benchmark": BENCHMARK, "records_schema": SCHEMA_VERSION, "evaluate": ev,
                  "dtype": self.eval_dtype, "data": data.digest}
        eval_keys: dict[str, str] = {}
        by_name = {s.name: s for s in stages}
        for mname in ["retain", "target", "base"] + unlearned:
            path, producer = models[mname]
            ref = None if mname == "retain" else eval_keys["retain"]
            key = digest({**common, "model": keys.get(producer) if producer else f"alias:{path}", "reference": ref})
            d = root / "eval" / mname
            needs = ([producer] if producer else []) + ([] if mname == "retain" else ["eval/retain"])
            reference = None if mname == "retain" else root / "eval" / "retain" / "records.jsonl"
            stages.append(Stage(f"eval/{mname}", "eval", d, key, self._muse_eval_runner(path, d, reference, mname),
                                eval_est, needs=needs, optional=bool(producer and by_name[producer].optional)))
            eval_keys[mname] = key
        self.notes.append("attacks: not run on muse-news (the attack suite is TOFU's)")
        self.stages = stages
        return stages

    def _muse_eval_runner(self, model: str, d: Path, reference: Path | None, role: str):
        def run(resume: bool) -> dict:
            import json

            from pmc_unlearn.evaluation.muse import SUMMARY_KEYS, evaluate_muse

            ev = self.p["evaluate"]
            s = evaluate_muse(model, d, retain_records=reference, require_privleak=False, self_reference=reference is None,
                              max_examples=ev.get("max_examples"), forget_texts=str(self.data.forget_file),
                              **({"max_length": ev["max_length"]} if ev.get("max_length") else {}),
                              batch_size=ev["batch_size"], dtype=self.eval_dtype, progress=self.progress,
                              device="cpu")
            s["demo_role"] = role
            (d / "summary.json").write_text(json.dumps(s, indent=2))
            return {k: s.get(k) for k in (*SUMMARY_KEYS, "privleak_min_k_auc", "time_collect_s")}

        return run


__all__ = ["MuseDemo", "prepare_muse_data", "validate_muse_profile"]
