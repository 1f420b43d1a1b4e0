"""PMC cost per forget question on forget01, forget05 and forget10: does it stay flat as the set grows?

    python bench/scaling.py --json bench/results/scaling.json   # 8/16/32 questions, 2 reps: ~10-15 min (estimate)
    python bench/scaling.py --full --reps 1                     # whole splits (40/200/400): an hour or more
    python bench/scaling.py --model tiny-random --max-new-tokens 4 --n-samples 2 --reps 1     # smoke test

(Times are estimates for smollm2-135m on 2 busy cores, from bench/pmc_step.py's epochs.)

What runs: one PMC run of `pmc_unlearn.trainer.train` per child process (a fresh process per
measurement; the splits interleaved within each repetition, the order rotated), on the first
`--questions` forget questions of each split (8, 16 and 32 by default, one number per split;
TOFU has 40, 200 and 400; multiples of the micro-batch keep every step full) or all of them
with `--full`, with the retain set that completes the split (retain99, retain95, retain90).
Config, the same for every split (library defaults otherwise: T=1.25, top_p=0.95, top_k=50,
lr 5e-5, retain weight 1.5): `train.sampler=fast` (with `pmc.sample_batch_rows=256`), bf16
autocast, micro-batch `--batch-size` 8, grad_accum 1, `--epochs` 1 without warm-up,
`pmc.n_samples` 3, `pmc.max_new_tokens` 48, seed 0. The run's output folder is temporary.

Fixed and per-question costs come from the run's manifest.json (`phases_s`, see
`pmc_unlearn.rundir`): "variable" = the `setup` phase (PMC's greedy reference answers, one per
question) + the `train` phase less its `train/checkpoint` sub-phase (sampling, scoring and the
optimizer steps); "fixed" = everything else in the `train()` call: `load_model`, the
end-of-epoch checkpoint, `save` of the final model, and what no phase times ("outside phases":
data loading, the accelerator, the closing fingerprint). The
`sampling` column is the wall time spent in the sampler's `sample` calls (references and
samples, timed by a wrapper in the child); sampled tokens come from the run's samples.jsonl
(every candidate's token count; the references are not logged, so not counted).

How to read the table (medians over repetitions; one row per split):
- s/question = variable / questions: the cost that should not depend on the split;
  "vs forget01" is the median of per-repetition ratios of a split's s/question to forget01's
  (the target: every ratio within 1.00 +- 0.20, printed under the table); with the same
  micro-batch size, every split runs the same kind of steps, only more of them;
- marginal s/question = (variable - forget01's variable) / (questions - forget01's questions),
  per repetition: the cost of one more question, free of any one-time cost that the variable
  time still holds (the first optimizer step pays for first-call kernel setup and AdamW's state;
  with the default 8 questions, forget01 is that one step). "first step s" and "later steps
  s/question" (from log.jsonl's `time/step_s`: sampling, loss, backward and optimizer step,
  the steps after the first divided by their questions) show that split directly;
- sampled tok/question tells whether the splits' questions drew answers of similar length
  (sampling time follows it); peak RSS is the child's, cpu/wall its CPU time over wall time
  (1.0 = one full core), which with the load average says how contended the machine was.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SPLITS = ("forget01", "forget05", "forget10")
SIZES = {"forget01": 40, "forget05": 200, "forget10": 400}
DEFAULT_QUESTIONS = {"forget01": 8, "forget05": 16, "forget10": 32}


def child(spec: dict) -> None:
    import pmc_unlearn.trainer as T
    from pmc_unlearn.config import load_config
    from pmc_unlearn.data import read_jsonl_dicts
    from pmc_unlearn.models import load_tokenizer
    from pmc_unlearn.precision import resolve_bf16
    from pmc_unlearn.sampling import SAMPLERS

    split = spec["split"]
    retain = f"retain{100 - int(split.removeprefix('forget'))}"
    cfg = load_config(None, [
        f"model.name={spec['model']}", f"data.forget=tofu:{split}", f"data.retain=tofu:{retain}",
        f"data.max_forget={spec['questions']}", f"train.batch_size={spec['batch_size']}", "train.grad_accum=1",
        f"train.epochs={spec['epochs']}", "train.warmup_epochs=0", "train.bf16=true", "train.sampler=fast",
        "train.seed=0", f"pmc.n_samples={spec['n_samples']}", f"pmc.max_new_tokens={spec['max_new_tokens']}",
        "pmc.sample_batch_rows=256"], method="pmc")
    sw = C.Stopwatch()
    # the sampler PMC would build (train.sampler, pmc.sample_batch_rows, the run's bf16 on this CPU), its calls
    # timed: references and samples
    sampler = SAMPLERS[cfg.train.sampler](load_tokenizer(spec["model"]), batch_rows=cfg.method_cfg.sample_batch_rows,
                                          bf16=resolve_bf16(cfg.train.bf16, "cpu").bf16)
    sampler.sample = sw.wrap("sampling", sampler.sample)
    with tempfile.TemporaryDirectory(prefix="pmc-bench-scaling-") as tmp:
        out = Path(tmp) / "run"
        c0, t0 = time.process_time(), time.perf_counter()
        manifest = T.train(cfg, out, sampler=sampler)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = C.peak_rss_mb()
        samples = read_jsonl_dicts(out / "samples.jsonl")
        steps = read_jsonl_dicts(out / "log.jsonl")
    ph = dict(manifest.get("phases_s") or {})
    ph["outside phases"] = wall - manifest.get("wall_time_s", 0.0)  # data loading, accelerator, final fingerprint
    questions = manifest["plan"]["forget_questions"]
    variable = ph.get("setup", 0.0) + ph.get("train", 0.0) - ph.get("train/checkpoint", 0.0)
    C.emit({"split": split, "questions": questions, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak,
            "phases": ph, "variable_s": variable, "fixed_s": wall - variable, "s_per_question": variable / questions,
            "wall_s_per_question": wall / questions, "sampling_s": sw.seconds.get("sampling", 0.0),
            "sampler_calls": sw.calls.get("sampling", 0), "samples": len(samples),
            "sampled_tokens": sum(int(s.get("tokens", 0)) for s in samples),
            "optimizer_steps": manifest.get("steps"), "step_s": [r.get("time/step_s") for r in steps],
            "truncated_frac": sum(bool(s.get("truncated")) for s in samples) / max(1, len(samples)),
            "unresolved_after": steps[-1].get("sample/unresolved") if steps else None})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--splits", default=",".join(SPLITS), help="TOFU forget splits, the baseline first")
    ap.add_argument("--questions", help="first N forget questions of each split, one per split, multiples of "
                                        "--batch-size (default 8 of forget01, 16 of forget05, 32 of forget10)")
    ap.add_argument("--full", action="store_true", help="every question of each split (40, 200, 400)")
    ap.add_argument("--batch-size", type=int, default=8, help="forget questions per micro-batch (= per optimizer step)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--n-samples", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", help="write all measurements here")
    a = ap.parse_args()
    if a.child:
        return child(json.loads(a.child))

    splits = a.splits.split(",")
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        ap.error(f"--splits: unknown {', '.join(bad)}; choose from {', '.join(SPLITS)}")
    if a.full:
        counts = {s: SIZES[s] for s in splits}
    else:
        ns = [int(x) for x in a.questions.split(",")] if a.questions else [DEFAULT_QUESTIONS[s] for s in splits]
        if len(ns) != len(splits) or any(not 1 <= n <= SIZES[s] for n, s in zip(ns, splits)):
            ap.error(f"--questions: one count per split ({', '.join(splits)}), each from 1 to the split's size "
                     f"({', '.join(str(SIZES[s]) for s in splits)})")
        counts = dict(zip(splits, ns))
    info, load0 = C.start()

    def run(split, rep):
        spec = {"model": a.model, "split": split, "questions": counts[split], "batch_size": a.batch_size,
                "epochs": a.epochs, "n_samples": a.n_samples, "max_new_tokens": a.max_new_tokens}
        return C.run_child("scaling.py", spec, timeout=12 * 3600)

    def describe(split, r):
        ph = {k: round(v, 1) for k, v in r["phases"].items()}
        return (f"{split} {r['questions']:3d} q  wall {r['wall_s']:7.1f} s  fixed {r['fixed_s']:5.1f} s  "
                f"{r['s_per_question']:5.2f} s/q  sampling {r['sampling_s']:6.1f} s  phases {ph}  "
                f"cpu/wall {r['cpu_s'] / r['wall_s']:.2f}  peak {r['peak_rss_mb']:.0f} MB")

    res = C.interleaved(splits, a.reps, run, describe)
    load1 = C.loadavg()
    base = splits[0]
    rows, worst = [], 0.0
    for s in splits:
        rs = res[s]
        ratio = C.median(r["s_per_question"] / b["s_per_question"] for r, b in zip(rs, res[base]))
        worst = max(worst, abs(ratio - 1))
        q = rs[0]["questions"]
        qb = res[base][0]["questions"]
        marginal = (C.median((r["variable_s"] - b["variable_s"]) / (q - qb) for r, b in zip(rs, res[base]))
                    if q != qb else "-")
        later = C.median(sum(r["step_s"][1:]) / (q - a.batch_size) if len(r["step_s"]) > 1 else None for r in rs)
        rows.append([s, q, C.median(r["optimizer_steps"] for r in rs), C.median(r["wall_s"] for r in rs),
                     C.median(r["fixed_s"] for r in rs), C.median(r["variable_s"] for r in rs),
                     C.median(r["s_per_question"] for r in rs), f"{ratio:.2f}x", marginal,
                     C.median(r["step_s"][0] if r["step_s"] else None for r in rs), "-" if later != later else later,
                     C.median(r["sampling_s"] / q for r in rs),
                     C.median(r["sampled_tokens"] / q for r in rs), C.median(r["peak_rss_mb"] for r in rs),
                     C.median(r["cpu_s"] / r["wall_s"] for r in rs)])
    phases = {s: {k: round(C.median(r["phases"].get(k) for r in res[s]), 1) for k in res[s][0]["phases"]}
              for s in splits}
    which = "every question" if a.full else "the first " + "/".join(str(counts[s]) for s in splits) + " questions"
    print(f"\nPMC, {a.model}, {which} of tofu:{'/'.join(splits)}; micro-batch {a.batch_size}, grad_accum 1, "
          f"{a.epochs:g} epoch(s), n={a.n_samples}, max_new_tokens={a.max_new_tokens}, fast sampler, bf16 autocast; "
          f"{a.reps} interleaved reps, medians; load avg before {load0}, after {load1}")
    print("Phases (s, medians): " + "; ".join(f"{s} {p}" for s, p in phases.items()) + "\n")
    print(C.table(["split", "questions", "steps", "wall s", "fixed s", "variable s", "s/question", f"vs {base}",
                   f"marginal s/question vs {base}", "first step s", "later steps s/question", "sampling s/question",
                   "sampled tok/question", "peak RSS MB", "cpu/wall"], rows))
    print(f"\nPer-question cost (variable) {'flat' if worst <= 0.2 else 'NOT flat'} within 20% "
          f"(largest departure from {base}: {100 * worst:.0f}%; the marginal and later-steps columns leave "
          "one-time costs out)")
    C.save_json(a.json, a, info, load0, load1, res)


if __name__ == "__main__":
    main()
