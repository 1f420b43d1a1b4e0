"""What both demos share (`demo.Demo` on TOFU, `demo_muse.MuseDemo` on MUSE-News).

- A demo profile is a YAML file of sections. `finetune` and `unlearn.<method>` hold run-config
  sections (`model`, `data`, `train`, `<method>`) resolved by `config.load_config`, exactly as an
  `unlearn --config` file; the demo's own sections (`authors`, `evaluate`, `prompt`, `attacks`,
  `report`, `muse`) are typed sections (`pmc_unlearn.sections`) checked by `check_sections`. Both
  report a bad value the same way (`evaluate.forget=0: must be >= 1`).
- `DemoBase` turns a profile into run configs (`_cfg`: the profile's prompt settings below each
  method's sections), trains (`_train_runner`) and runs its stages through `pipeline.run_stages`
  in a folder it owns (`DEMO_MARKER`), writing `demo.json` as it goes and the report at the end.
- The first ETA comes from a table of seconds per unit of work (`RATES`), scaled by this machine's
  matmul rate (`speed_scale`).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pmc_unlearn import pipeline
from pmc_unlearn.errors import UserError
from pmc_unlearn.pipeline import Stage, StageFolders, digest
from pmc_unlearn.precision import default_device, resolve_bf16
from pmc_unlearn.provenance import hardware, versions, write_json_atomic
from pmc_unlearn.sections import build_section, deep_merge, opt

DEMO_VERSION = 1  # bump when a stage's meaning changes: every cached stage is redone
DEMO_FILE = "demo.json"
DEMO_MARKER = ".pmc-unlearn-demo"  # written into a folder the demo created or found empty: the demo owns it
EVAL_DTYPES = ("auto", "float32", "bfloat16")
# What each kind of stage writes in its folder (top-level names; subfolders listed here are the
# stage's own). A stage is redone only by removing these: any other file there is the user's.
STAGE_OUTPUTS = {
    "finetune": {"config.yaml", "manifest.json", "log.jsonl", "samples.jsonl", "checkpoints", "model"},
    "unlearn": {"config.yaml", "manifest.json", "log.jsonl", "samples.jsonl", "checkpoints", "model"},
    "eval": {"records.jsonl", "summary.json", "TOFU_EVAL.json", "TOFU_SUMMARY.json"},
    "attacks": {"attacks.json", "attacks_records.jsonl", "relearning"},
}
STORE = StageFolders(STAGE_OUTPUTS, "demo")


# ----- the profile's own sections ----------------------------------------------------------------

@dataclass
class PromptSettings:
    use_chat_template: bool = opt(True, "the tokenizer's chat template (data.use_chat_template of every run)")
    system_prompt: str | None = opt(None, "system prompt of every run and of the base model's evaluation: a string, "
                                          "'' for an empty system turn, or null for the chat template's default")


@dataclass
class ReportSettings:
    examples: int = opt(3, "forget and retain questions shown side by side", min=0)


def check_sections(p: dict[str, Any], sections: dict[str, type], required: tuple[str, ...] = ()) -> None:
    """Each of the profile's sections present in `sections` is valid as that typed section (the profile keeps
    its values as written: they are part of the stage keys); the `required` ones must be there."""
    for sec in required:
        if not isinstance(p.get(sec), dict):
            raise UserError(f"demo profile: section '{sec}' is missing or not a mapping")
    for sec, cls in sections.items():
        if p.get(sec) is not None:
            build_section(cls, sec, p[sec])
    if "pmc" not in p["unlearn"]:
        raise UserError("demo profile: unlearn.pmc is missing (the demo is about PMC)")


# ----- ETA -----------------------------------------------------------------------------------------

# Rough seconds per unit of work on a 2-core CPU for the stage-line ETA, per precision, with the
# 1024^3 matmul rate (GFLOP/s) of the machine they were measured on. At the start the estimates are
# scaled by that rate over this machine's (`matmul_gflops`); after each stage, by how the finished
# stages compared with their estimates (`pipeline.Eta`).
RATES = {
    # Zen 4 (AVX-512 bf16), bf16 autocast training and bf16 evaluation
    "bf16": {"train_example": 0.35, "sample_token": 0.0035, "gen_token": 0.004, "nll_seq": 0.07, "fixed": 6.0},
    # AVX2 without native bf16, fp32 training and evaluation (fitted to the quick and default runs in
    # docs/demo.md: an AVX-512 Xeon restricted to AVX2, 143 GFLOP/s fp32)
    "fp32": {"train_example": 0.72, "sample_token": 0.008, "gen_token": 0.005, "nll_seq": 0.09, "fixed": 8.0},
}
REF_GFLOPS = {"bf16": 410.0, "fp32": 143.0}


def matmul_gflops(bf16: bool, size: int = 1024, reps: int = 3) -> float:
    """This machine's rate for one [size, size] matmul in bf16 or fp32 (best of `reps`), GFLOP/s."""
    import torch

    dt = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(size, size).to(dt), torch.randn(size, size).to(dt)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / max(best, 1e-9) / 1e9


def speed_scale(bf16: bool) -> float:
    """How much longer than the rate table's machine this one should take (clipped to 0.25-8)."""
    kind = "bf16" if bf16 else "fp32"
    return min(8.0, max(0.25, REF_GFLOPS[kind] / matmul_gflops(bf16)))


# ----- the demo folder -----------------------------------------------------------------------------

def owns(root: Path) -> bool:
    """The demo created this folder (its marker), or an earlier version did (demo.json)."""
    return (root / DEMO_MARKER).is_file() or (root / DEMO_FILE).is_file()


def check_output(root: Path) -> None:
    """Refuse a folder the demo does not own: a file, an unwritable place, or a non-empty folder without its marker."""
    pipeline.check_owned(root, owns(root), f"--output {root}: folder is not empty and holds no demo ({DEMO_MARKER}); "
                                           "choose a new folder (the demo writes only into folders it created)")


def claim(root: Path) -> None:
    """Create the demo folder and mark it as the demo's (check_output first)."""
    pipeline.claim(root, DEMO_MARKER, "pmc-unlearn demo folder: stages here are rewritten by `pmc-unlearn demo`\n")


class DemoBase:
    """A profile's stages and their running; subclasses build the stage list (`build`) and say what
    the demo's data is (`_data_info`)."""

    def __init__(self, profile: dict[str, Any], root: Path, progress: bool = True, stream=None):
        self.p = profile
        self.root = Path(root)
        self.progress = progress
        self.stream = stream or sys.stderr
        self.stages: list[Stage] = []
        self.notes: list[str] = []

    def build(self) -> list[Stage]:
        raise NotImplementedError

    def _data_info(self) -> dict[str, Any]:
        raise NotImplementedError

    # ----- run configs ------------------------------------------------------------------------
    def _prompt_sections(self) -> dict:
        """The profile's prompt settings as config sections (data.system_prompt, data.use_chat_template)."""
        return {"data": dict(self.p.get("prompt") or {})}

    def _cfg(self, method: str, sections: dict, model: str, primary: str, retain: str | None):
        """The run config of one stage: the profile's prompt settings < `sections` < the model and data files
        (`primary`: sft.data for fine-tuning, data.forget for unlearning)."""
        from pmc_unlearn.config import load_config
        from pmc_unlearn.methods import FINETUNE_DEFAULTS

        files = {"sft": {"data": primary}} if method == "sft" else {"data": {"forget": primary}}
        if retain:
            files = deep_merge(files, {"data": {"retain": retain}})
        extra = deep_merge(deep_merge(self._prompt_sections(), sections), {"model": {"name": model}, **files})
        return load_config(None, None, method=method, extra=extra, defaults=FINETUNE_DEFAULTS if method == "sft" else None)

    def _normal(self, cfg) -> dict:
        """The resolved config with paths inside the demo folder made relative (keys do not depend on where it lives)."""
        d = cfg.to_dict()
        if "data" in d.get(cfg.method, {}):  # sft.data: keyed where fine-tuning data was before it had its own key
            d["data"]["forget"] = d[cfg.method].pop("data")
        # the precision that will run here, not the setting: `auto` differs between machines
        d["train"]["bf16"] = resolve_bf16(cfg.train.bf16, default_device()).bf16
        root = str(self.root.resolve())
        for sec in ("model", "data"):
            for k, v in d[sec].items():
                if isinstance(v, str) and v.startswith(root):
                    d[sec][k] = os.path.relpath(v, root)
        return d

    def _check_configs(self) -> None:
        """Resolve the fine-tuning and unlearning configs (placeholder data paths): bad settings fail before any
        output. Methods must exist; a baseline whose settings do not fit it is only skipped later, with a note."""
        from pmc_unlearn.methods import METHODS

        data = str(self.root / "data" / "x.jsonl")
        self._cfg("sft", self.p["finetune"], self.p["model"], data, None)
        for m, sections in self.p["unlearn"].items():
            if m not in METHODS or m == "sft":
                raise UserError(f"unlearn.{m}: unknown unlearning method; choose from "
                                f"{', '.join(sorted(x for x in METHODS if x != 'sft'))}")
            if m == "pmc":
                self._cfg(m, dict(sections or {}), data, data, data)

    def _unlearn_wanted(self, m: str, sections) -> bool:
        """Whether method `m` gets an unlearning stage: not when the profile turns it off (a note)."""
        if sections is False or (sections is None and m != "pmc"):
            self.notes.append(f"{m}: turned off in the profile (unlearn.{m}: null)")
            return False
        return True

    # ----- stages both demos build alike -------------------------------------------------------
    def _training_stages(self, fine_tunes: list[tuple[str, Path, Any]], forget: Path, retain: Path, data_digest: str,
                         key_extra: dict[str, Any], est: Callable[[Any, Any], float]):
        """finetune/<name> for each (name, data file, size) of `fine_tunes` (target first), then unlearn/<method>
        for the methods the profile turns on, from the target. `est(cfg, size)` estimates a stage (size None:
        unlearning). Returns (stages, models: name -> (model path, producing stage), keys, unlearned names)."""
        p, root = self.p, self.root.resolve()
        stages: list[Stage] = []
        models: dict[str, tuple[str, str | None]] = {"base": (p["model"], None)}
        keys: dict[str, str] = {}
        for name, f, size in fine_tunes:
            cfg = self._cfg("sft", p["finetune"], p["model"], str(f), None)
            key = digest({"v": DEMO_VERSION, **key_extra, "cfg": self._normal(cfg), "data": data_digest})
            d = root / "runs" / name
            stages.append(Stage(f"finetune/{name}", "finetune", d, key, self._train_runner(cfg, d), est(cfg, size)))
            models[name] = (str(d / "model"), f"finetune/{name}")
            keys[f"finetune/{name}"] = key
        unlearned: list[str] = []
        for m, sections in p["unlearn"].items():
            d = root / "runs" / m
            name = f"unlearn/{m}"
            if not self._unlearn_wanted(m, sections):
                continue
            try:
                cfg = self._cfg(m, dict(sections or {}), models["target"][0], str(forget), str(retain))
            except UserError as e:
                if m == "pmc":
                    raise
                stages.append(Stage(name, "unlearn", d, "", lambda resume: {}, 0.0, optional=True,
                                    skip_reason=f"{m}: the profile's settings do not fit this method ({e}); skipped"))
                continue
            key = digest({"v": DEMO_VERSION, **key_extra, "cfg": self._normal(cfg), "target": keys["finetune/target"],
                          "data": data_digest})
            stages.append(Stage(name, "unlearn", d, key, self._train_runner(cfg, d), est(cfg, None),
                                needs=["finetune/target"], optional=(m != "pmc")))
            models[m] = (str(d / "model"), name)
            unlearned.append(m)
            keys[name] = key
        return stages, models, keys, unlearned

    def _eval_stages(self, order: list[str], models: dict[str, tuple[str, str | None]], keys: dict[str, str],
                     producers: list[Stage], common: dict[str, Any], est_s: float) -> list[Stage]:
        """eval/<model> for each model of `order`, the retain model first: its records are the others'
        reference (forget quality, PrivLeak). Adds the stages' keys to `keys`."""
        root = self.root.resolve()
        optional = {s.name: s.optional for s in producers}
        stages: list[Stage] = []
        for mname in order:
            path, producer = models[mname]
            ref = None if mname == "retain" else keys["eval/retain"]
            key = digest({**common, "model": keys.get(producer) if producer else f"alias:{path}", "reference": ref})
            d = root / "eval" / mname
            needs = ([producer] if producer else []) + ([] if mname == "retain" else ["eval/retain"])
            reference = None if mname == "retain" else root / "eval" / "retain" / "records.jsonl"
            stages.append(Stage(f"eval/{mname}", "eval", d, key, self._eval_runner(path, d, reference, mname), est_s,
                                needs=needs, optional=bool(producer and optional[producer])))
            keys[f"eval/{mname}"] = key
        return stages

    def _eval_runner(self, model: str, d: Path, reference: Path | None, role: str) -> Callable[[bool], dict]:
        raise NotImplementedError

    # ----- runners ----------------------------------------------------------------------------
    def _train_runner(self, cfg, d: Path) -> Callable[[bool], dict]:
        def run(resume: bool) -> dict:
            from pmc_unlearn.trainer import train

            man = train(cfg, d, resume=resume, command=["pmc-unlearn", "demo", f"--profile={self.p['profile']}"])
            # The final model is saved: checkpoints only served resuming (1-2 GB each for a 135M model).
            shutil.rmtree(d / "checkpoints", ignore_errors=True)
            return {"wall_time_s": man.get("wall_time_s"), "steps": man.get("steps"), "phases_s": man.get("phases_s")}

        return run

    # ----- running ----------------------------------------------------------------------------
    def _line(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)

    def run(self) -> dict[str, Any]:
        from pmc_unlearn.rundir import OutputLock

        check_output(self.root)
        if not self.stages:
            self._check_configs()  # bad settings: an error before the folder exists
        claim(self.root)
        with OutputLock(self.root):  # (build() writes data/: under the lock too)
            return self._run()

    def _run(self) -> dict[str, Any]:
        t_start = time.time()
        if not self.stages:
            self.build()
        STORE.check(self.stages)  # stages to redo must not hold the user's files: refuse before any work
        demo = {"profile": self.p["profile"], "profile_settings": {k: v for k, v in self.p.items() if k != "profile"},
                "demo_version": DEMO_VERSION, "started": pipeline.now(),
                "load_avg_start": list(os.getloadavg()), "stages": [], "notes": list(self.notes),
                "data": self._data_info(), "versions": versions(), "hardware": hardware()}

        def save() -> None:
            write_json_atomic(self.root / DEMO_FILE, demo)

        def record(entry: dict[str, Any], note: str | None) -> None:
            demo["stages"].append(entry)
            if note:
                demo["notes"].append(note)
            save()

        dev = default_device()
        prec = resolve_bf16("auto", dev)
        demo["precision"] = {"device": dev, "auto_bf16": prec.bf16, "reason": prec.reason, "eval_dtype": self.eval_dtype}
        self._line(f"[demo] {len(self.stages)} stages, about {pipeline.fmt_s(pipeline.pending_s(self.stages, STORE))} "
                   f"of work to do on this machine ({prec.reason}: {'bf16' if prec.bf16 else 'fp32'} where the profile "
                   "says auto)")
        pipeline.run_stages(self.stages, STORE, label="demo", say=self._line, record=record, root=self.root)

        # the report (always rebuilt: cheap); the demo's wall time is known before it is written
        demo["finished"] = pipeline.now()
        demo["wall_time_s"] = round(time.time() - t_start, 3)
        demo["load_avg_end"] = list(os.getloadavg())
        save()
        t = time.time()
        from pmc_unlearn.report import build_report

        out = build_report([self.root], self.root / "report.html", force=True)  # (the demo folder is ours)
        demo["report_s"] = round(time.time() - t, 3)
        save()
        self._line(f"[demo] done in {pipeline.fmt_s(demo['wall_time_s'])}: {out['html']} and {out['md']}")
        return demo
