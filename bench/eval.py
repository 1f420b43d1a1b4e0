"""TOFU evaluation throughput: the library's whole evaluation suite on one model, timed by part.

    python bench/eval.py --json bench/results/eval.json     # full suite on forget01, 1 rep: ~20-45 min (estimate)
    python bench/eval.py --max-examples 40 --reps 3         # 40 rows of every split, 3 interleaved reps
    python bench/eval.py --model tiny-random --max-examples 2 --max-new-tokens 8 --reps 1   # smoke test

(Time: smollm2-135m on 2 busy cores, estimated; forget01's suite is about 4,000 scored
(question, answer) pairs and 697 greedy answers of up to 200 tokens, the answers taking most of it.)

What runs: one real `pmc_unlearn.evaluation.evaluate(model, forget_split, None,
require_forget_quality=False, use_cache=False, ...)` call per child process (a fresh process per
measurement, with an empty temporary `PMC_UNLEARN_EVAL_CACHE` as well, so nothing is reused
between repetitions or variants). "total s" is that call's wall time: loading the model, every
split of the suite (`suite.tofu_suite`: forget, forget paraphrased, retain_perturbed, real
authors, world facts, holdout; the first `--max-examples` rows of each), ROUGE and aggregation.
Forget quality needs a retain model's records, so it is not computed (null in the summary).

The parts are timed inside that same call, in the child only, by timed wrappers around the
real functions of `pmc_unlearn.evaluation.scoring`, which `evaluate` calls through
`collect_records` exactly as it otherwise would:
- the teacher-forced NLL part: `scoring.question_scores` (a question's answer, paraphrased and
  perturbed answers scored with its prompt run once) or, for models without a KV cache, its
  fallback `scoring.answer_scores` (one prompt + answer sequence per answer), with the EM/ES/MIA
  statistics computed from the same forward;
- the greedy generation part: `scoring.generate_greedy` (and `generate_greedy_ids` under it).
A call made from inside another call of the same part counts once. What a wrapper records (the
arguments and the outputs) is counted only after `evaluate` has returned, so counting costs the
measured call nothing. "other s" = total - NLL - generation: model load (also shown apart, from
the summary's `time_load_s`), record building, ROUGE, bookkeeping and aggregation. The total is
thus one real `evaluate` call, and the parts are its real parts.

How to read the table (medians over repetitions; one row per variant):
- NLL seq/s: (question, answer) pairs scored per second; NLL tok/s: their prompt + answer
  tokens per second, as if every pair ran as its own sequence (the same count whatever the
  implementation, so it compares implementations); NLL run tok/s: the tokens actually run,
  each prompt once per question where `question_scores` shares it (the hardware's rate);
- gen new tok/s: new tokens kept per second (up to the stop token, as `Completion.n_tokens`
  counts them; steps a finished row of a batch may spend waiting are not counted); "hit limit"
  (line above the table) is the share of answers cut at `--max-new-tokens`;
- peak RSS: the child's peak resident memory (the whole evaluation); cpu/wall: the child's CPU
  time over its wall time (1.0 = one full core), which with the load average says how contended
  the machine was;
- model utility / forget ROUGE-L: the summary's values, to check that variants agree.

Variants (`--variants`): `fp32` = the model in float32 (evaluate's default, the exact path);
`bf16` = `evaluate(..., dtype="bfloat16")`, the weights in bfloat16 (what the demo profiles use,
and how open-unlearning evaluates). "speed vs" is the median of per-repetition ratios of the
first variant's total time to this one's.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VARIANTS = {"fp32": "float32", "bf16": "bfloat16"}  # variant -> evaluate(dtype=...)
# The functions a part is made of, outermost first (a call nested in another of the same part
# counts once: question_scores falls back to answer_scores for models without a KV cache).
PARTS = {"nll": ("question_scores", "answer_scores"), "gen": ("generate_greedy", "generate_greedy_ids")}


def _count(nll_calls: list[dict], gen_calls: list[dict]) -> dict:
    """Work done by the recorded calls: scored pairs and their tokens, generations and their tokens."""
    from pmc_unlearn.formatting import encode_pair, prompt_ids

    pairs = pair_tokens = run_tokens = 0
    for c in nll_calls:
        if c["fn"] == "question_scores":  # several answers per question, the prompt run once
            groups = list(zip(c["questions"], c["answers"]))
        else:
            groups = [(q, [a]) for q, a in zip(c["questions"], c["answers"])]
        for q, answers in groups:
            exs = [encode_pair(c["tokenizer"], q, a, c["fmt"]) for a in answers]
            pairs += len(exs)
            pair_tokens += sum(len(e.prompt) + len(e.answer) for e in exs)
            shared = c["fn"] == "question_scores" and exs
            run_tokens += (len(exs[0].prompt) + sum(len(e.answer) for e in exs) if shared else
                           sum(len(e.prompt) + len(e.answer) for e in exs))
    gens = prompt_tokens = new = hit = 0
    for c in gen_calls:
        prompts = c["prompts"] if c["fn"] == "generate_greedy_ids" else [prompt_ids(c["tokenizer"], q, c["fmt"])
                                                                            for q in c["questions"]]
        prompt_tokens += sum(len(x) for x in prompts)
        gens += len(c["out"])
        new += sum(g.n_tokens for g in c["out"])
        hit += sum(bool(g.hit_limit) for g in c["out"])
    return {"nll_pairs": pairs, "nll_pair_tokens": pair_tokens, "nll_run_tokens": run_tokens, "generations": gens,
            "gen_prompt_tokens": prompt_tokens, "gen_new_tokens": new, "gen_hit_limit": hit / max(1, gens)}


def child(spec: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="pmc-bench-eval-") as cache:
        os.environ["PMC_UNLEARN_EVAL_CACHE"] = cache  # belt and braces: use_cache=False already reads/writes none
        from pmc_unlearn.evaluation import api, scoring

        originals = {f: getattr(scoring, f) for fs in PARTS.values() for f in fs}

        sw = C.Stopwatch()
        calls: dict[str, list[dict]] = {"nll": [], "gen": []}
        for part, fs in PARTS.items():
            for f in fs:
                if f in originals:
                    sig = inspect.signature(originals[f])

                    def keep(args, kwargs, out, f=f, sig=sig, part=part):
                        b = sig.bind(*args, **kwargs)
                        b.apply_defaults()
                        calls[part].append({"fn": f, **b.arguments, "out": out})

                    setattr(scoring, f, sw.wrap(part, originals[f], keep))

        c0, t0 = time.process_time(), time.perf_counter()
        summary = api.evaluate(spec["model"], spec["split"], None, require_forget_quality=False,
                               max_examples=spec["max_examples"], batch_size=spec["batch_size"],
                               max_new_tokens=spec["max_new_tokens"], use_cache=False, progress=False,
                               dtype=VARIANTS[spec["variant"]])
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = C.peak_rss_mb()
        for f, fn in originals.items():
            setattr(scoring, f, fn)

    n = _count(calls["nll"], calls["gen"])  # counted after the measured call
    nll_s, gen_s = sw.seconds.get("nll", 0.0), sw.seconds.get("gen", 0.0)
    rate = lambda x, s: x / s if s else None  # noqa: E731
    C.emit({"total_s": total, "cpu_s": cpu, "peak_rss_mb": peak, "load_s": summary.get("time_load_s"),
            "collect_s": summary.get("time_collect_s"), "dtype": summary.get("dtype"),
            "nll_fns": sorted({c["fn"] for c in calls["nll"]}), "gen_fns": sorted({c["fn"] for c in calls["gen"]}),
            "nll_s": nll_s, "nll_calls": sw.calls.get("nll", 0), "gen_s": gen_s, "gen_calls": sw.calls.get("gen", 0),
            **n, "nll_seq_s": rate(n["nll_pairs"], nll_s), "nll_tok_s": rate(n["nll_pair_tokens"], nll_s),
            "nll_run_tok_s": rate(n["nll_run_tokens"], nll_s), "gen_tok_s": rate(n["gen_new_tokens"], gen_s),
            "other_s": total - nll_s - gen_s,
            "model_utility": summary.get("model_utility"), "forget_rougeL": summary.get("forget_rougeL_recall"),
            "n_examples": {k.removeprefix("n_examples_"): v for k, v in summary.items() if k.startswith("n_examples_")}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--split", default="forget01", help="TOFU forget split (forget01, forget05, forget10)")
    ap.add_argument("--max-examples", type=int, default=None, help="first N rows of every split (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--variants", default="fp32,bf16",
                    help=f"comma-separated, the baseline first, from {', '.join(VARIANTS)}")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--json", help="write all measurements here")
    a = ap.parse_args()
    if a.child:
        return child(json.loads(a.child))

    variants = a.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    info, load0 = C.start()

    def run(v, rep):
        spec = {"model": a.model, "split": a.split, "max_examples": a.max_examples, "max_new_tokens": a.max_new_tokens,
                "batch_size": a.batch_size, "variant": v}
        return C.run_child("eval.py", spec, timeout=6 * 3600)

    def describe(v, r):
        return (f"{v:12s} total {r['total_s']:7.1f} s  NLL {r['nll_s']:6.1f} s ({r['nll_tok_s'] or 0:6.0f} tok/s)  "
                f"gen {r['gen_s']:6.1f} s ({r['gen_tok_s'] or 0:5.1f} tok/s)  cpu/wall {r['cpu_s'] / r['total_s']:.2f}  "
                f"peak {r['peak_rss_mb']:.0f} MB")

    res = C.interleaved(variants, a.reps, run, describe)
    load1 = C.loadavg()
    base = variants[0]
    rows = []
    for v in variants:
        rs = res[v]
        rows.append([v, C.median(r["total_s"] for r in rs), C.speedup(rs, res[base], "total_s"), C.median(r["load_s"] for r in rs),
                     C.median(r["nll_s"] for r in rs), C.median(r["nll_seq_s"] for r in rs),
                     C.median(r["nll_tok_s"] for r in rs), C.median(r["nll_run_tok_s"] for r in rs),
                     C.median(r["gen_s"] for r in rs),
                     C.median(r["gen_tok_s"] for r in rs), C.median(r["other_s"] for r in rs),
                     C.median(r["peak_rss_mb"] for r in rs), C.median(r["cpu_s"] / r["total_s"] for r in rs),
                     C.median(r["model_utility"] for r in rs), C.median(r["forget_rougeL"] for r in rs)])
    r0 = res[base][0]
    cut = f"first {a.max_examples} rows of each split" if a.max_examples else "every row"
    print(f"\nTOFU evaluation suite, {a.model}, {a.split} ({cut}: {r0['n_examples']}), batch {a.batch_size}, "
          f"greedy max_new_tokens={a.max_new_tokens}, no forget quality; {a.reps} interleaved reps, medians; "
          f"load avg before {load0}, after {load1}")
    print(f"Work per run ({base}): {r0['nll_pairs']} scored (question, answer) pairs = {r0['nll_pair_tokens']} "
          f"prompt + answer tokens, {r0['nll_run_tokens']} run (prompts once per question where shared; "
          f"{', '.join(r0['nll_fns'])}); {r0['generations']} greedy generations from {r0['gen_prompt_tokens']} prompt "
          f"tokens ({', '.join(r0['gen_fns'])}); "
          + ", ".join(f"{v}: {res[v][0]['gen_new_tokens']} new tokens, hit limit {100 * res[v][0]['gen_hit_limit']:.0f}%"
                      for v in variants) + "\n")
    print(C.table(["variant", "total s", f"speed vs {base}", "load s", "NLL s", "NLL seq/s", "NLL tok/s",
                   "NLL run tok/s", "gen s", "gen new tok/s", "other s", "peak RSS MB", "cpu/wall", "model utility", "forget ROUGE-L"], rows))
    C.save_json(a.json, a, info, load0, load1, res)


if __name__ == "__main__":
    main()
