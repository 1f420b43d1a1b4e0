"""Where a result came from, and how it reaches the disk: versions, git commit, atomic writes, ranks.

One home for what every output records and how every output file is written:

- `versions()`: the Python version and the versions of the packages a result depends on, one
  set of names (`PACKAGES`). Run manifests and demo.json store it as {name: version};
  summaries (eval, attacks, MUSE) store the same names flat as `version_<name>` (`version_fields`).
- `hardware()`: the machine (platform, CPU, RAM, GPUs).
- `git_hash()`: the commit of the code that ran, with `-dirty` when tracked files were changed
  (None outside a git checkout).
- `write_bytes_atomic` / `write_text_atomic` / `write_json_atomic` / `write_jsonl_atomic`: a
  temporary file beside the target, then a rename, so a reader never sees half a file; a failed
  write removes the temporary file and leaves the old file as it was. `json_safe` turns NaN and
  infinities into null (JSON has neither).
- `rank_world()`, `barrier(world)`, `gather(objs, world)`: this process's rank and the number of
  processes under `accelerate launch` ((0, 1) otherwise), a barrier between them, and every
  process's objects collected on each.

Imports nothing of pmc_unlearn and no torch at import time (`hardware` reads the CPU's bf16 support
from `pmc_unlearn.precision` when called).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# distribution names (as pip knows them); the keys are the same names with '-' as '_'
PACKAGES = ("pmc-unlearn", "torch", "transformers", "accelerate", "peft", "rouge-score", "numpy", "scipy",
            "scikit-learn", "torchao")


def versions() -> dict[str, str | None]:
    """{"python": ..., "torch": ..., ...}: None for a package that is not installed."""
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg.replace("-", "_")] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg.replace("-", "_")] = None
    return out


def version_fields() -> dict[str, str | None]:
    """`versions()` as flat summary fields: {"version_python": ..., "version_torch": ..., ...}."""
    return {f"version_{k}": v for k, v in versions().items()}


def git_hash() -> str | None:
    """The commit of this source tree (`-dirty` when tracked files differ from it); None outside git."""
    here = str(Path(__file__).resolve().parent)
    try:
        r = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if r.returncode != 0 or not r.stdout.strip():
            return None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return r.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware() -> dict[str, Any]:
    """The machine a result was computed on: platform, CPU (model, cores, native bf16), RAM, GPUs."""
    import torch

    from pmc_unlearn.precision import cpu_native_bf16

    hw: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_native_bf16": cpu_native_bf16()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                hw["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        hw["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return hw


# ----- atomic writes ---------------------------------------------------------------------------------

def json_safe(x: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null (in nested dicts, lists and tuples)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def tmp_path(path: Path) -> Path:
    """The temporary file a write of `path` goes through (one per process: concurrent writers never share one)."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = 2, ensure_ascii: bool = True,
                      default: Any = str) -> None:
    """`obj` as JSON (`json.dumps` with these options), written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii, default=default))


def jsonl_text(rows: Iterable[Any], *, ensure_ascii: bool = False, default: Any = None) -> str:
    """Rows as JSON lines (by default with UTF-8 kept as is), each ending in a newline."""
    return "".join(json.dumps(r, ensure_ascii=ensure_ascii, default=default) + "\n" for r in rows)


def write_jsonl_atomic(path: str | Path, rows: Iterable[Any], *, ensure_ascii: bool = False, default: Any = None) -> None:
    """Rows as JSON lines (`jsonl_text`), written atomically."""
    write_text_atomic(path, jsonl_text(rows, ensure_ascii=ensure_ascii, default=default))


# ----- processes under `accelerate launch` ----------------------------------------------------------

def launched_processes() -> int:
    """How many processes `accelerate launch` (or torchrun) started: WORLD_SIZE, 1 when unset."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_world() -> tuple[int, int]:
    """(this process's index, number of processes): accelerate's state when launched with several, else (0, 1)."""
    if launched_processes() > 1:
        from accelerate import PartialState

        st = PartialState()
        return st.process_index, st.num_processes
    return 0, 1


def barrier(world: int) -> None:
    """Wait for every process (a no-op for one process)."""
    if world > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def gather(objs: list, world: int) -> list:
    """Every process's `objs`, concatenated in rank order, on every process (`objs` itself for one process)."""
    if world == 1:
        return objs
    from accelerate.utils import gather_object

    return gather_object(objs)
