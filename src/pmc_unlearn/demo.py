"""`pmc-unlearn demo`: the whole unlearning story on a small model, as cached, resumable stages.

The pipeline (one folder per stage under the demo folder, each with a `stage.json`):

    data/                 the TOFU subset: target.jsonl (retain + forget authors), retain.jsonl
    runs/target           fine-tune the base model on retain + forget authors   (the model to unlearn)
    runs/retain           fine-tune the base model on the retain authors only   (the gold standard)
    eval/retain           evaluate the retain model (its forget truth ratios are forget quality's reference)
    eval/target, eval/base
    runs/pmc  -> eval/pmc   unlearn the forget authors from the target with PMC
    runs/npo  -> eval/npo   ... and with the baselines the profile turns on
    runs/gd   -> eval/gd
    attacks/<model>       the attack suite (`pmc_unlearn.attacks.run_attacks`) on the models in attacks.models
    report.html, report.md

Profiles (`configs/demo-*.yaml`) and their sections: `demo_base`. Stages run through
`pmc_unlearn.pipeline`; each evaluation is `pmc_unlearn.evaluation.evaluate` on the demo's subset.

Caching: every stage has a key, a hash of its own resolved settings and of the keys of the
stages it reads (a fine-tune's key covers its config and the bytes of its data; an evaluation's
covers the model stage's key, the evaluation settings and the retain model's evaluation key). A
stage whose `stage.json` holds the same key and status "done" is skipped; a different key
removes what the stage wrote (`STAGE_OUTPUTS`) and redoes it, and so every stage downstream of it
(their keys change too); a stage folder holding anything else stops the demo before any stage
runs. The demo writes only into a folder it created or found empty (`DEMO_MARKER`). An
interrupted stage (same key, status "running") resumes: training from its last
checkpoint (`trainer.train(..., resume=True)`), evaluation from its records.jsonl.

Evaluation ("utility" on a subset). TOFU's utility splits assume a model fine-tuned on all 200
authors; a model fine-tuned on a few authors knows nothing of `tofu:retain_perturbed` in general.
The demo therefore takes its retain authors from the first authors of TOFU, whose rows *are*
`tofu:retain_perturbed`'s (TOFU authors 0-19, with their paraphrased and perturbed answers), and
evaluates the retain split only on those rows: questions the target model learned beside the
forget authors. Utility then asks "did unlearning keep the facts it should keep?", with both
metric families intact (truth ratios need the perturbed answers). Real authors and world facts
measure general knowledge as in TOFU. The forget split is TOFU's own (`forget01_perturbed`, its
paraphrases and perturbed answers), and the holdout split for membership inference too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pmc_unlearn import demo_muse
from pmc_unlearn.demo_base import (
    DEMO_VERSION, EVAL_DTYPES, RATES, STORE, DemoBase, PromptSettings, ReportSettings, check_output, check_sections,
    claim, speed_scale,
)
from pmc_unlearn.errors import UserError
from pmc_unlearn.pipeline import Stage, digest
from pmc_unlearn.precision import default_device, resolve_bf16, resolve_dtype
from pmc_unlearn.provenance import write_jsonl_atomic
from pmc_unlearn.sections import load_yaml, opt, parse_override, set_dotted

PROFILES = ("quick", "default", "muse-quick")  # shown in --help; "test"/"muse-test" (tiny-random) are for the tests
PROFILE_KEYS = {"description", "model", "prompt", "authors", "finetune", "unlearn", "evaluate", "attacks", "report",
                "benchmark", "muse"}
EVAL_CONVENTIONS = ("open-unlearning", "pmc-unlearn")  # evaluation.scores.CONVENTIONS (not imported: no torch here)
AUTHOR_SIZE = 20


# ----------------------------------------------------------------------------- profiles

@dataclass
class AuthorsSettings:
    retain: int = opt(1, "retain authors: TOFU authors 0..N-1, the ones tofu:retain_perturbed evaluates (1 to 20)",
                      min=1, max=20, required=True)
    forget_split: str = opt("forget01", "the forget authors: a TOFU forget split", choices=("forget01", "forget05", "forget10"),
                            required=True)
    forget: int | None = opt(None, "only the first N authors of the forget split (null: all)", min=1)
    rows: int = opt(AUTHOR_SIZE, f"questions per author, 1 to {AUTHOR_SIZE} (each TOFU author has {AUTHOR_SIZE})",
                    min=1, max=AUTHOR_SIZE)


@dataclass
class EvaluateSettings:
    max_new_tokens: int = opt(40, "greedy generation limit", min=1, required=True)
    batch_size: int = opt(32, "examples per evaluation batch", min=1, required=True)
    forget: int = opt(30, "forget questions evaluated", min=1, required=True)
    retain: int = opt(16, "rows of the retain authors in tofu:retain_perturbed evaluated (utility)", min=1, required=True)
    real_authors: int = opt(10, "real-author questions", min=1, required=True)
    world_facts: int = opt(10, "world-fact questions", min=1, required=True)
    holdout: int = opt(20, "holdout questions (NLL only: membership inference)", min=1, required=True)
    dtype: str = opt("auto", "weights during evaluation: auto (bfloat16 where the CPU runs it natively), float32, bfloat16",
                     choices=EVAL_DTYPES)
    base: bool = opt(True, "evaluate the untuned base model too")
    convention: str = opt(EVAL_CONVENTIONS[0], "metric definitions (docs/metrics.md)", choices=EVAL_CONVENTIONS)


@dataclass
class AttackSettings:
    enabled: bool = opt(True, "run the attack suite")
    models: list | None = opt(None, "models to attack (null: the target and the unlearned models)")
    names: list | None = opt(None, "attacks to run (null: all of pmc_unlearn.attacks.ATTACK_NAMES)")
    settings: dict = opt({}, "{attack: {key: value}} over each attack's defaults")
    max_examples: int | None = opt(None, "forget questions attacked (null: all)", min=1)
    max_new_tokens: int | None = opt(None, "generation limit (null: the attack suite's default)", min=1)


TOFU_SECTIONS = {"authors": AuthorsSettings, "evaluate": EvaluateSettings, "prompt": PromptSettings,
                 "attacks": AttackSettings, "report": ReportSettings}


def profile_path(name: str) -> Path:
    """A profile name (quick, default, test) or a YAML file."""
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise UserError(f"--profile {name}: file not found")
        return p
    f = Path(str(resources.files("pmc_unlearn") / "configs" / f"demo-{name}.yaml"))
    if not f.exists():
        raise UserError(f"--profile {name}: unknown profile; choose one of {', '.join(PROFILES)} or pass a YAML file")
    return f


def load_profile(name: str = "default", overrides: list[str] | None = None) -> dict[str, Any]:
    """The profile as a dict, with `a.b.c=value` overrides applied in order (values parsed as YAML)."""
    path = profile_path(name)
    prof = load_yaml(path, "--profile")
    for item in overrides or []:
        key, value = parse_override(item, "unlearn.pmc.train.epochs=6", parse_value=True, sectioned=False)
        top = key.split(".")[0]
        if top not in PROFILE_KEYS:
            raise UserError(f"override '{item}': unknown profile section '{top}'; known: {', '.join(sorted(PROFILE_KEYS))}")
        set_dotted(prof, key, value)
    prof["profile"] = path.stem.removeprefix("demo-")
    validate_profile(prof)
    return prof


def validate_profile(p: dict[str, Any]) -> None:
    unknown = set(p) - PROFILE_KEYS - {"profile"}
    if unknown:
        raise UserError(f"demo profile: unknown key '{sorted(unknown)[0]}'; known: {', '.join(sorted(PROFILE_KEYS))}")
    bench = p.get("benchmark", "tofu")
    if bench == demo_muse.BENCHMARK:
        return demo_muse.validate_muse_profile(p)
    if bench != "tofu":
        raise UserError(f"benchmark={bench!r}: choose tofu (the default) or {demo_muse.BENCHMARK}")
    check_sections(p, TOFU_SECTIONS, required=("authors", "finetune", "unlearn", "evaluate"))


# ----------------------------------------------------------------------------- data

@dataclass
class DemoData:
    """The TOFU subset of a demo: files written under data/ and the evaluation items."""

    target_file: Path
    retain_file: Path
    forget_file: Path  # the forget rows (question, answer): PMC reads the questions, the baselines the answers too
    retain_authors: list[int]
    forget_authors: list[int]
    retain_eval_index: list[int]  # rows of tofu:retain_perturbed that belong to the retain authors
    forget_eval_index: list[int]  # rows of tofu:<forget split>_perturbed that are the forget rows
    digest: str  # hash of the files' bytes
    n_forget: int  # forget questions


def prepare_data(profile: dict[str, Any], root: Path) -> DemoData:
    """Write data/target.jsonl and data/retain.jsonl (question, answer, author) for the profile."""
    from pmc_unlearn.data import load_rows

    full = load_rows("tofu:full")
    fsplit = profile["authors"]["forget_split"]
    frows = load_rows(f"tofu:{fsplit}")
    n_authors = profile["authors"].get("forget")
    if n_authors is not None:  # only the first N authors of the forget split (20 rows each, in order)
        frows = frows[: n_authors * AUTHOR_SIZE]
    rows = profile["authors"].get("rows", AUTHOR_SIZE)  # the first `rows` questions of every author
    frows = [r for k, r in enumerate(frows) if k % AUTHOR_SIZE < rows]
    forget_q = {r["question"] for r in frows}
    forget_idx = [i for i, r in enumerate(full) if r["question"] in forget_q]
    forget_authors = sorted({i // AUTHOR_SIZE for i in forget_idx})
    retain_authors = list(range(profile["authors"]["retain"]))
    clash = set(retain_authors) & set(forget_authors)
    if clash:
        raise UserError(f"authors.retain={len(retain_authors)}: overlaps the {fsplit} authors {sorted(clash)}; use fewer")
    retain_idx = [a * AUTHOR_SIZE + j for a in retain_authors for j in range(rows)]

    def row(i: int) -> dict:
        return {"question": full[i]["question"], "answer": full[i]["answer"], "author": i // AUTHOR_SIZE, "tofu_full_row": i}

    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    target = [row(i) for i in sorted(retain_idx + forget_idx)]
    retain = [row(i) for i in retain_idx]
    write_jsonl_atomic(d / "target.jsonl", target)
    write_jsonl_atomic(d / "retain.jsonl", retain)
    forget = [row(i) for i in forget_idx]
    write_jsonl_atomic(d / "forget.jsonl", forget)
    fp_rows = load_rows(f"tofu:{fsplit}_perturbed")
    fpos = {r["question"]: k for k, r in enumerate(fp_rows)}
    missing = [r["question"] for r in forget if r["question"] not in fpos]
    if missing:
        raise UserError(f"tofu:{fsplit}_perturbed lacks {len(missing)} forget question(s), e.g. {missing[0]!r}")
    forget_eval_idx = [fpos[r["question"]] for r in forget]
    author_of = {r["question"]: r["author"] for r in retain}
    rp = load_rows("tofu:retain_perturbed")
    by_author: dict[int, list[int]] = {}
    for i, r in enumerate(rp):
        if r["question"] in author_of:
            by_author.setdefault(author_of[r["question"]], []).append(i)
    # round-robin over the retain authors, so a cut (evaluate.retain) covers all of them
    cols = [by_author[a] for a in sorted(by_author)]
    eval_idx = [c[k] for k in range(max(map(len, cols), default=0)) for c in cols if k < len(c)]
    h = hashlib.sha256()
    for f in ("target.jsonl", "retain.jsonl", "forget.jsonl"):
        h.update((d / f).read_bytes())
    return DemoData(d / "target.jsonl", d / "retain.jsonl", d / "forget.jsonl", retain_authors, forget_authors,
                    eval_idx, forget_eval_idx, h.hexdigest()[:16], len(forget))


# ----------------------------------------------------------------------------- evaluation on the subset

def demo_suite(forget_split: str, retain_index: list[int], sizes: dict[str, int], forget_index: list[int] | None = None):
    """TOFU's evaluation splits, cut to the profile's sizes; the retain split keeps only the retain authors' rows,
    the forget split (and its paraphrases) only the forget rows (`forget_index`, all when None).

    Items keep their index in the TOFU file they come from (and the split's source string), so
    records are shared with full evaluations through the evaluation cache.
    """
    from pmc_unlearn.evaluation import metrics as M
    from pmc_unlearn.evaluation.suite import tofu_suite

    specs = tofu_suite(forget_split, "perturbed", None)
    limit = {M.FORGET: sizes["forget"], M.FORGET_PARA: sizes["forget"], M.RETAIN: sizes["retain"],
             M.REAL_AUTHORS: sizes["real_authors"], M.WORLD_FACTS: sizes["world_facts"], M.HOLDOUT: sizes["holdout"]}
    for s in specs:
        if s.name == M.RETAIN:  # the retain authors' rows, in the order given (round-robin over authors)
            by_index = {it.index: it for it in s.items}
            items = [by_index[i] for i in retain_index if i in by_index]
        elif s.name in (M.FORGET, M.FORGET_PARA) and forget_index is not None:
            by_index = {it.index: it for it in s.items}
            items = [by_index[i] for i in forget_index if i in by_index]
        else:
            items = s.items
        s.items = items[: limit.get(s.name, len(items))]
    return specs


class Demo(DemoBase):
    """The TOFU demo: builds the stage list for a profile (see the module docstring); `DemoBase` runs it."""

    def build(self) -> list[Stage]:
        check_output(self.root)
        self._check_configs()  # every stage's config, before anything is written
        claim(self.root)
        p, root = self.p, self.root.resolve()
        data = prepare_data(p, root)
        self.data = data
        ev = p["evaluate"]
        specs = demo_suite(p["authors"]["forget_split"], data.retain_eval_index,
                           {**ev, "forget": min(ev["forget"], data.n_forget)}, data.forget_eval_index)
        self.specs = specs
        suite_key = digest([(s.name, s.source, [it.index for it in s.items]) for s in specs])
        n_target = sum(1 for _ in data.target_file.open())
        n_retain = sum(1 for _ in data.retain_file.open())

        dev = default_device()
        self.eval_dtype = resolve_dtype(ev.get("dtype", "auto"), "cpu", "evaluate.dtype").dtype
        speeds: dict[bool, float] = {}

        def rate(bf16: bool) -> tuple[dict[str, float], float]:
            if bf16 not in speeds:
                speeds[bf16] = speed_scale(bf16) if dev == "cpu" else 0.25
            return RATES["bf16" if bf16 else "fp32"], speeds[bf16]

        def train_est(cfg, n_rows: int, sampling: bool = False) -> float:
            t = cfg.train
            r, k = rate(resolve_bf16(t.bf16, dev).bf16)
            n = min(n_rows, cfg.data.max_forget or n_rows)
            ex = n * t.epochs if t.max_steps < 0 else min(n * t.epochs, t.max_steps * t.batch_size * t.grad_accum)
            est = r["fixed"] + ex * r["train_example"] * (2 if cfg.method != "sft" else 1)
            if sampling:
                m = cfg.method_cfg
                est += ex * m.n_samples * m.max_new_tokens * r["sample_token"] + n * m.max_new_tokens * r["sample_token"]
            return est * k

        def eval_est() -> float:
            r, k = rate(self.eval_dtype == "bfloat16")
            n_gen = sum(len(s.items) for s in specs if s.generate)
            n_nll = sum(len(s.items) * (1 + (1 if s.items and s.items[0].para_answer else 0) +
                                        len(s.items[0].pert_answers or []) if s.items else 0) for s in specs if s.nll)
            return (r["fixed"] + n_gen * ev["max_new_tokens"] * r["gen_token"] + n_nll * r["nll_seq"]) * k

        # fine-tuning (target and retain model), then unlearning (PMC first, then the profile's baselines)
        def est(cfg, size) -> float:
            return train_est(cfg, size) if size is not None else train_est(cfg, data.n_forget, sampling=cfg.method == "pmc")

        stages, models, keys, unlearned = self._training_stages(
            [("target", data.target_file, n_target), ("retain", data.retain_file, n_retain)],
            data.forget_file, data.retain_file, data.digest, {}, est)

        # evaluation: the retain model first (its records are forget quality's reference)
        from pmc_unlearn.evaluation.records import SCHEMA_VERSION

        eval_common = {"v": DEMO_VERSION, "records_schema": SCHEMA_VERSION, "suite": suite_key,
                       "max_new_tokens": ev["max_new_tokens"]}
        # The dtype that will run here, not the setting: `auto` differs between machines.
        if self.eval_dtype != "float32":  # (float32 keys stay as they were before the option)
            eval_common["dtype"] = self.eval_dtype
        eval_common["convention"] = ev.get("convention", EVAL_CONVENTIONS[0])
        if p.get("prompt"):  # the base model is evaluated with the profile's prompt format
            eval_common["prompt"] = p["prompt"]
        # the base model's row is optional (evaluate.base): the report's target check then compares
        # the target with the retain model, which never saw the forget authors either
        order = ["retain", "target"] + (["base"] if ev.get("base", True) else []) + unlearned
        stages += self._eval_stages(order, models, keys, stages, eval_common, eval_est())

        # attacks on the models the profile names (default: the target and the unlearned models)
        at = p.get("attacks") or {}
        if at.get("enabled", True):
            wanted = at.get("models") or ["target"] + unlearned
            for mname in [x for x in ["target"] + unlearned if x in wanted]:
                path, producer = models[mname]
                akey = {"v": DEMO_VERSION, "model": keys[producer], "attacks": at}
                if self.eval_dtype != "float32":
                    akey["dtype"] = self.eval_dtype
                key = digest(akey)
                d = root / "attacks" / mname
                stages.append(Stage(f"attacks/{mname}", "attacks", d, key, self._attack_runner(path, d),
                                    rate(self.eval_dtype == "bfloat16")[0]["fixed"] + len(at.get("names") or [1] * 6) * eval_est() / 4
                                    * at.get("max_examples", 20) / max(1, ev["forget"]),
                                    needs=[producer], optional=True))
        else:
            self.notes.append("attacks: disabled by the profile (attacks.enabled: false)")
        self.stages = stages
        return stages

    def _prompt_format(self):
        """The prompt format of models without a saved one (the base model): the profile's."""
        from pmc_unlearn.evaluation.suite import EVAL_FORMAT
        from pmc_unlearn.formatting import PromptFormat

        pr = self.p.get("prompt") or {}
        return PromptFormat(pr.get("use_chat_template", True), pr.get("system_prompt"), EVAL_FORMAT.max_length)

    def _eval_runner(self, model: str, d: Path, reference: Path | None, role: str):
        """`evaluation.evaluate` on the demo's subset; the retain model (no `reference`) is its own reference."""
        def run(resume: bool) -> dict:
            from pmc_unlearn.evaluation import evaluate

            ev = self.p["evaluate"]
            # evaluate() takes the format the model was trained with (saved beside it); else the profile's
            s = evaluate(model, self.p["authors"]["forget_split"], d, specs=self.specs, retain_records=reference,
                         self_reference=reference is None, require_forget_quality=False,
                         max_new_tokens=ev["max_new_tokens"], batch_size=ev["batch_size"], dtype=self.eval_dtype,
                         default_fmt=self._prompt_format(), progress=self.progress, device="cpu",
                         convention=ev.get("convention", EVAL_CONVENTIONS[0]),
                         extra={"demo_role": role, "retain_split_note": (
                             f"tofu:retain_perturbed rows of the retain author(s) {self.data.retain_authors} "
                             "(TOFU author indices), facts the target learned beside the forget authors")})
            return {k: s.get(k) for k in ("unlearn_quality", "utility", "forget_quality", "model_utility",
                                          "forget_rougeL_recall", "retain_rougeL_recall", "time_collect_s")}

        return run

    def _attack_runner(self, model: str, d: Path):
        """`attacks.run_attacks` with the profile's attack settings (unset ones: the suite's defaults)."""
        def run(resume: bool) -> dict:
            from pmc_unlearn.attacks import run_attacks

            at = self.p.get("attacks") or {}
            given = {"attacks": at.get("names"), "settings": at.get("settings"), "max_examples": at.get("max_examples"),
                     "max_new_tokens": at.get("max_new_tokens")}
            run_attacks(model, self.p["authors"]["forget_split"], d, batch_size=self.p["evaluate"]["batch_size"],
                        progress=self.progress, dtype=self.eval_dtype, **{k: v for k, v in given.items() if v is not None})
            return {"attacks_json": str(d / "attacks.json")}

        return run

    def _data_info(self) -> dict[str, Any]:
        return {"retain_authors": self.data.retain_authors, "forget_authors": self.data.forget_authors,
                "target_rows": sum(1 for _ in self.data.target_file.open()),
                "retain_rows": sum(1 for _ in self.data.retain_file.open()),
                "retain_eval_rows": len([s for s in self.specs if s.name == "retain"][0].items)}


# ----------------------------------------------------------------------------- entry point

def demo_class(prof: dict[str, Any]) -> type[DemoBase]:
    """Demo for TOFU profiles, demo_muse.MuseDemo for `benchmark: muse-news` ones."""
    return demo_muse.MuseDemo if prof.get("benchmark") == demo_muse.BENCHMARK else Demo


def run_demo(profile: str = "default", output: str | Path = "demo_out", overrides: list[str] | None = None,
             progress: bool = True, stream=None) -> dict[str, Any]:
    prof = load_profile(profile, overrides)
    demo = demo_class(prof)(prof, Path(output), progress=progress, stream=stream)
    return demo.run()  # (builds the stages once it holds the folder's lock)


def plan(profile: str = "default", overrides: list[str] | None = None) -> dict[str, Any]:
    """What a demo would run (profile settings and stages); writes only the small data files."""
    import tempfile

    prof = load_profile(profile, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        d = demo_class(prof)(prof, Path(tmp))
        d.build()
        return {"profile": prof, "stages": [{"name": s.name, "key": s.key, "est_s": round(s.est_s),
                                             **({"skip": s.skip_reason} if s.skip_reason else {})} for s in d.stages]}


__all__ = ["STORE", "Demo", "demo_suite", "load_profile", "plan", "prepare_data", "run_demo"]
