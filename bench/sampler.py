"""Sampler throughput: the fast backend against plain `generate` on TOFU forget questions.

    python bench/sampler.py                      # defaults below: about 15 min on 2 cores (+2 min per vLLM run)
    python bench/sampler.py --questions 8 --reps 1 --max-new-tokens 32   # a quick look

Same prompts (TOFU forget questions through the library's prompt formatting: chat template),
same model (smollm2-135m, fp32 weights as the trainer holds them), same n, temperature, top-k,
top-p and new-token limit for every configuration:
- `hf`: `HFSampler` = `model.generate(num_return_sequences=n)` in chunks of `rows` rows (the
  library's previous and only path; bf16 = autocast, as the trainer runs it);
- `fast`: `FastSampler` (prefill once per prompt, exact top-k/top-p without a vocabulary sort,
  finished rows dropped; bf16 = a bf16 copy of the weights);
- `static`: `FastSampler(engine="static")` (pmc_unlearn/sampling/static.py: static KV cache, each
  prompt's KV shared by its n samples; CUDA graphs on GPU, eager + prepacked oneDNN on CPU;
  `static:256:static_compile="inductor"` for torch.compile on CPU);
- `vllm`: `VLLMSampler` (vLLM's CPU build, in-process engine, weights from the live model):
  added to the default configurations when vLLM imports, here or in the interpreter given by
  `--vllm-python` (vLLM pins its own transformers, so a separate environment is usual:
  `--vllm-python /path/to/vllm-env/bin/python`; that environment needs the library's
  dependencies, not the library: its source folder is put on PYTHONPATH). The engine's start-up
  (about a minute: compilation, KV cache) is not timed, as the other backends' warm-up is not.

Tokens/s counts generated tokens that are kept (up to and including EOS); `generate`'s work on
rows that already finished is not counted. Fraction of ceiling = tokens/s x FLOPs/token / the
matmul rate measured in the same child just before the run (best of the model's own linear
shapes and a 1024^3 square, fp32 or bf16). FLOPs/token = 2 x the weights of every linear layer
(LM head included); attention's own FLOPs (small at these lengths) are left out. "Of matmul-bound
step" (CPU): tokens/s against rows / the time one step's linear layers take alone at the batch's
rows (measured in the child, prepacked oneDNN weights in bf16): what is left to win outside the
matmuls, at these shapes.
On CUDA (`--device cuda`, e.g. `--model random:1.2b`: a random-init Llama of that shape, no
weights needed) the fraction printed is of the HBM roofline instead: tokens/s over rows x the
copy rate measured in the child / (linear weights' bytes + the KV cache at the mean context),
what a step reading each byte once would allow. `bench/gpu.sh` runs the GPU comparison.
Each measurement runs in a fresh process; configurations are interleaved within each repetition
(order rotated); ratios are medians of per-repetition ratios against `hf` of the same dtype.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


# Random-init Llama shapes for `--model random:<size>` (no weights needed): hidden, layers, heads, KV heads, MLP.
RANDOM_SHAPES = {
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536),  # SmolLM2-135M's shape
    "1.2b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=8192),  # Llama-3.2-1B's shape (issue 16's GPU measurements)
}


def random_model(size: str, device: str):
    """A seeded random-init Llama of a named shape with SmolLM2's tokenizer (prompts stay real TOFU questions)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pmc_unlearn.models import load_tokenizer

    if size not in RANDOM_SHAPES:
        raise SystemExit(f"--model random:{size}: unknown size; choose from {', '.join(RANDOM_SHAPES)}")
    tok = load_tokenizer("smollm2-135m")
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      rms_norm_eps=1e-5, **RANDOM_SHAPES[size])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model, tok


def load_bench_model(spec: dict):
    """(model, tokenizer) on the spec's device: the library's model (fp32 weights, as the trainer holds them),
    or a random one; on CUDA in the spec's dtype (bf16 weights: what a GPU run samples from)."""
    import torch

    from pmc_unlearn.models import load_model

    device = spec.get("device", "cpu")
    if spec["model"].startswith("random:"):
        model, tok = random_model(spec["model"].split(":", 1)[1], device)
    else:
        lm = load_model(spec["model"])
        model, tok = lm.model.to(device), lm.tokenizer
    if device == "cuda" and spec["dtype"] == "bf16":
        model = model.to(torch.bfloat16)
    return model, tok


def make_sampler(config: str, tok, bf16: bool):
    """`backend:batch_rows[:option=json...]`; `static` = the fast sampler with the static engine."""
    from pmc_unlearn.sampling import SAMPLERS

    backend, batch_rows, *opts = config.split(":")
    extra = {k: json.loads(v) for k, v in (o.split("=", 1) for o in opts)}  # e.g. drop_frac=0.25
    if backend == "static":
        backend = "fast"
        extra.setdefault("engine", "static")
    return SAMPLERS[backend](tok, batch_rows=int(batch_rows), bf16=bf16, **extra)


def hbm_gbps(device: str) -> float:
    """This GPU's memory rate now, GB/s: a 1 GiB device-to-device copy (bytes read + written), best of 5."""
    import torch

    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(6):
        torch.cuda.synchronize()
        t = time.perf_counter()
        y.copy_(x)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * x.numel() / best / 1e9


def roofline_tok_s(model, rows: int, context: float, gbps: float) -> float:
    """Tokens/s if every step only read the weights and the KV cache once at `gbps` (rows decoded per step)."""
    import torch

    cfg = model.config
    wbytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * hd * next(model.parameters()).element_size()
    step_bytes = wbytes + rows * context * kv
    return rows * gbps * 1e9 / step_bytes


def step_matmul_s(model, rows: int, dtype: str, reps: int = 5) -> float:
    """Seconds one decode step's linear layers take alone at `rows` rows (CPU; bf16 through oneDNN's
    prepacked weights, as the fast and static engines run them): the matmul-bound step at these shapes."""
    import collections
    import statistics

    import torch

    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    shapes = collections.Counter((m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear))
    total = 0.0
    for (k, n), count in shapes.items():
        x, w = torch.randn(rows, k, dtype=dt), torch.randn(n, k, dtype=dt)
        f = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
        if dt == torch.bfloat16:
            try:
                p = torch.ops.mkldnn._reorder_linear_weight(w, rows)
                f = lambda: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")  # noqa: E731
            except (RuntimeError, AttributeError):
                pass
        f()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        total += count * statistics.median(ts)
    return total


def child(spec: dict) -> None:
    import torch

    from pmc_unlearn.data import load_qa
    from pmc_unlearn.formatting import PromptFormat, prompt_ids

    device = spec.get("device", "cpu")
    model, tok = load_bench_model(spec)
    model.train()  # as the trainer hands it over
    rows = load_qa(f"tofu:{spec['split']}", require_answers=False, role="forget")[: spec["questions"]]
    prompts = [prompt_ids(tok, r["question"], PromptFormat()) for r in rows]
    sampler = make_sampler(spec["config"], tok, spec["dtype"] == "bf16")
    kw = dict(temperature=spec["temperature"], top_p=spec["top_p"], top_k=spec["top_k"])
    t_warm = time.perf_counter()
    # warm-up (bf16 copy, oneDNN kernels, compilation) at the measured shape, on the first prompts, few tokens
    sampler.sample(model, prompts, spec["n"], max_new_tokens=4, seed=1, **kw)
    t_warm = time.perf_counter() - t_warm
    flops = 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    rates = C.matmul_rates() if device == "cpu" else {}
    gbps = hbm_gbps(device) if device == "cuda" else None
    rss0 = C.rss_mb()
    if device == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    res = sampler.sample(model, prompts, spec["n"], max_new_tokens=spec["max_new_tokens"], seed=spec["seed"], **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    comps = [c for r in res for c in r]
    tokens = sum(len(c.ids) for c in comps)
    peak = C.peak_rss_mb()  # before any profiling
    frac = {}
    if device == "cpu":
        frac["ceiling_frac"] = tokens / wall * flops / (rates[spec["dtype"]] * 1e9)
        # against the step's own matmuls at the batch's rows (all rows live: an upper bound on tok/s)
        frac["matmul_step_s"] = step_matmul_s(model, len(comps), spec["dtype"])
        frac["matmul_bound_frac"] = tokens / wall / (len(comps) / frac["matmul_step_s"])
    else:
        context = sum(map(len, prompts)) / len(prompts) + tokens / len(comps) / 2
        frac["roofline_tok_s"] = roofline_tok_s(model, len(comps), context, gbps)
        frac["ceiling_frac"] = tokens / wall / frac["roofline_tok_s"]
        frac["hbm_gbps"] = gbps
        frac["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    profile = None
    if spec.get("profile"):  # the same call again under torch's profiler (after the timed one: it slows ops)
        from torch.profiler import ProfilerActivity, profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            sampler.sample(model, prompts, spec["n"], max_new_tokens=spec["max_new_tokens"], seed=spec["seed"], **kw)
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops) or 1.0
        profile = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
                    "calls": e.count} for e in ops[:15]]
    C.emit({"profile": profile, "wall_s": wall, "cpu_s": cpu, "tokens": tokens, "tok_s": tokens / wall,
            "truncated": sum(c.hit_limit for c in comps) / len(comps), "flops_per_token": flops,
            "rate_gflops": rates, "rss_before_mb": rss0, "peak_rss_mb": peak, "warmup_s": t_warm, **frac,
            "mean_len": tokens / len(comps), "versions": C.versions(),
            "engine_stats": dict(getattr(getattr(sampler, "_static", None), "stats", None) or {})})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child")
    ap.add_argument("--model", default="smollm2-135m",
                    help=f"a model the library loads, or random:<size> for a random-init Llama ({', '.join(RANDOM_SHAPES)})")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: the model in the dtype's precision on the GPU; the fraction printed is of the HBM "
                         "roofline (weights + KV cache read once per step at the measured copy rate)")
    ap.add_argument("--split", default="forget10", help="TOFU forget split the questions come from")
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128, help="PMC's default limit")
    ap.add_argument("--temperature", type=float, default=1.25)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--configs", default=None,
                    help="backend:batch_rows[:option=json...], comma-separated, the baseline first "
                         "(e.g. fast:256:drop_frac=1.0 never drops finished rows; static:256 = fast with the "
                         "static engine, static:256:static_compile=\"inductor\" compiled on CPU); default "
                         "hf:64,fast:64,fast:256 and vllm:256 when vLLM is available")
    ap.add_argument("--vllm-python", default=None,
                    help="interpreter of an environment with vLLM installed, for the vllm configurations "
                         "(default: this one, when it imports vllm)")
    ap.add_argument("--omp", default="library",
                    help="OpenMP policies, comma-separated: library (the CLI's: a short spin, threads following "
                         "the load; pmc_unlearn/cpu.py), passive (OMP_WAIT_POLICY=PASSIVE), passive-1 (passive, one "
                         "thread), spin-fixed (the short spin, thread count not adapted); ratios are against the "
                         "first configuration under the first policy")
    ap.add_argument("--profile", action="store_true",
                    help="after each timed call, run it again under torch's profiler and print the top ops by self time")
    ap.add_argument("--busy", action="store_true",
                    help="keep one core busy (a `while True: pass` process) during every measurement: the "
                         "machine another process shares")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write all measurements here")
    a = ap.parse_args()
    if a.child:
        return child(json.loads(a.child))

    vllm_py = a.vllm_python or C.PY
    if a.configs is None:
        a.configs = "hf:64,fast:64,fast:256"
        if C.has_module(vllm_py, "vllm"):
            a.configs += ",vllm:256"
        else:
            print("# vLLM not importable (pip install pmc-unlearn[vllm], or --vllm-python): skipping it", flush=True)
    configs = a.configs.split(",")
    omps = a.omp.split(",")
    unknown = [o for o in omps if o not in C.OMP_POLICIES]
    if unknown:
        ap.error(f"--omp: unknown {', '.join(unknown)}; choose from {', '.join(C.OMP_POLICIES)}")
    runs = [(d, c, o) for d in a.dtypes.split(",") for o in omps for c in configs]
    info = C.machine()
    load0 = C.loadavg()
    print(f"# machine: {info}\n# device: {a.device}\n# load before: {load0}", flush=True)
    results: dict[tuple, list] = {r: [] for r in runs}
    for rep in range(a.reps):
        order = runs[rep % len(runs):] + runs[: rep % len(runs)]
        for dtype, config, omp in order:
            spec = {"model": a.model, "device": a.device, "split": a.split, "questions": a.questions, "n": a.n, "seed": a.seed + rep,
                    "max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": a.top_p,
                    "top_k": a.top_k, "dtype": dtype, "config": config, "profile": a.profile}
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if a.busy else None
            try:
                r = C.run_child("sampler.py", spec, python=a.vllm_python if config.startswith("vllm") else None, omp=omp)
            finally:
                if hog is not None:
                    hog.kill()
            results[(dtype, config, omp)].append(r)
            print(f"rep {rep} {dtype:4s} {config:9s} {omp:8s} {r['tok_s']:7.1f} tok/s  {r['wall_s']:6.1f} s  "
                  f"{100 * r['ceiling_frac']:.0f}% of {'roofline' if a.device == 'cuda' else 'ceiling'}  "
                  + (f"{100 * r['matmul_bound_frac']:.0f}% of the matmul-bound step "
                     f"({1000 * r['matmul_step_s']:.1f} ms)  " if "matmul_bound_frac" in r else "") +
                  f"warm-up {r['warmup_s']:.1f} s  cpu/wall {r['cpu_s'] / r['wall_s']:.2f}  "
                  f"peak {r['peak_rss_mb']:.0f} MB  load {C.loadavg()}  {r.get('engine_stats') or ''}", flush=True)
            for op in r.get("profile") or []:
                print(f"    {op['share']:6.1%}  {op['self_ms']:9.0f} ms  {op['calls']:7d} calls  {op['op']}", flush=True)
    load1 = C.loadavg()
    rows = []
    for dtype, config, omp in runs:
        rs = results[(dtype, config, omp)]
        base = results[(dtype, configs[0], omps[0])]
        ratios = [r["tok_s"] / b["tok_s"] for r, b in zip(rs, base)]
        rows.append([config.replace(":", " ", 1).replace(":", " "), dtype, omp, C.median(r["tok_s"] for r in rs), f"{C.median(ratios):.2f}x",
                     f"{100 * C.median(r['ceiling_frac'] for r in rs):.0f}%",
                     f"{100 * C.median(r.get('matmul_bound_frac') for r in rs):.0f}%" if a.device == "cpu" else "-",
                     C.median(r["rate_gflops"][dtype] if a.device == "cpu" else r["hbm_gbps"] for r in rs),
                     C.median(r["peak_rss_mb"] for r in rs),
                     C.median(r["cpu_s"] / r["wall_s"] for r in rs), C.median(r["mean_len"] for r in rs),
                     f"{100 * C.median(r['truncated'] for r in rs):.0f}%"])
    fpt = results[runs[0]][0]["flops_per_token"]
    print(f"\n{a.questions} questions of tofu:{a.split} x n={a.n}, max_new_tokens={a.max_new_tokens}, "
          f"T={a.temperature}, top_p={a.top_p}, top_k={a.top_k}; {a.reps} interleaved reps, medians; "
          f"{fpt / 1e9:.3f} GFLOP/token; load avg before {load0}, after {load1}\n")
    lib = {k: v for k, v in C.env("library").items() if k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    print(f"OpenMP: library = {lib} + threads following the load; others: {C.OMP_POLICIES}"
          f"{'; one core kept busy by another process throughout' if a.busy else ''}\n")
    cpu = a.device == "cpu"
    print(C.table(["sampler x rows", "dtype", "OpenMP", "tok/s", f"vs {configs[0]} {omps[0]}",
                   "of ceiling" if cpu else "of HBM roofline", "of matmul-bound step",
                   "matmul GFLOP/s" if cpu else "HBM GB/s (copy)",
                   "peak RSS MB", "cpu/wall", "tokens/sample", "truncated"], rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "machine": info, "load_before": load0, "load_after": load1,
                                            "runs": {f"{d}|{c}|{o}": v for (d, c, o), v in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
