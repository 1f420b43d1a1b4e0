"""The output folder of a run: manifest, logs, checkpoints. All run-dir disk I/O lives here.

Layout:
    config.yaml      resolved config (what --resume reads back)
    manifest.json    versions, git hash, seed, hardware, wall time per phase, status
    log.jsonl        one line per optimizer step
    samples.jsonl    every sampled candidate (PMC) with its score and whether it was chosen
    checkpoints/     step-XXXXXX/ folders, written to a temporary name then renamed
    model/           the final model (save_pretrained, safetensors)
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pmc_unlearn.errors import UserError


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "peft", "rouge_score", "numpy", "scipy", "pmc_unlearn"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except ImportError:
            pass
    try:
        from importlib.metadata import version

        out["rouge_score"] = version("rouge-score")
    except Exception:
        pass
    return out


def git_hash() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if r.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return r.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def hardware() -> dict[str, Any]:
    hw: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
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


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


class Manifest:
    """manifest.json, rewritten after every change so a crash leaves an accurate record."""

    def __init__(self, path: Path, data: dict[str, Any] | None = None):
        self.path = path
        self.data = data or {}
        self.data.setdefault("phases_s", {})

    @classmethod
    def start(cls, path: Path, seed: int, command: list[str], extra: dict | None = None) -> "Manifest":
        old = json.loads(path.read_text()) if path.exists() else {}
        m = cls(path, old)
        m.data.update({
            "status": "running", "seed": seed, "versions": versions(), "git": git_hash(),
            "hardware": hardware(), "command": command, **(extra or {}),
        })
        m.data.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        m.data.setdefault("resumes", 0)
        m.save()
        return m

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    @contextmanager
    def phase(self, name: str):
        """Time a phase; times add up over resumes."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.data["phases_s"][name] = round(self.data["phases_s"].get(name, 0.0) + time.perf_counter() - t, 3)
            self.save()

    def finish(self, status: str = "completed", **extra) -> None:
        self.data.update({"status": status, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra})
        # "a/b" names a sub-phase timed inside phase "a": counted there already.
        self.data["wall_time_s"] = round(sum(v for k, v in self.data["phases_s"].items() if "/" not in k), 3)
        self.save()


class JsonlWriter:
    """Append-only JSON lines; flushed per write so a crash loses at most the line in flight."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, rows: list[dict] | dict) -> None:
        if not self.enabled:
            return
        rows = [rows] if isinstance(rows, dict) else rows
        if not rows:
            return
        with self.path.open("a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, default=float) + "\n")

    def truncate_after(self, key: str, value: int) -> None:
        """Drop lines with row[key] > value (lines written after the checkpoint we resume from)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get(key, -1) <= value]
        self.path.write_text("".join(ln + "\n" for ln in keep))


def prepare_output(out: Path, resume: bool) -> None:
    """Refuse to overwrite a finished run or to silently mix two runs in one folder."""
    manifest = out / "manifest.json"
    if resume:
        if not (out / "config.yaml").exists():
            raise UserError(f"--resume {out}: no config.yaml there; pass the output folder of an earlier run")
        return
    if manifest.exists():
        status = json.loads(manifest.read_text()).get("status")
        if status == "completed":
            raise UserError(f"--output {out}: already holds a finished run; choose another folder or delete it")
        raise UserError(f"--output {out}: holds an unfinished run ({status}); continue it with --resume {out} or delete it")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--output {out}: folder is not empty; choose a new folder")


# ----- checkpoints ---------------------------------------------------------------------------------

def checkpoint_dirs(out: Path) -> list[Path]:
    d = out / "checkpoints"
    if not d.exists():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").exists())


def save_checkpoint(out: Path, step: int, tensors: dict[str, Any], state: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step-N atomically (temporary folder, then rename); keep the newest `keep`."""
    from safetensors.torch import save_file

    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors["model"].items()}, str(tmp / "model.safetensors"))
    torch.save(tensors["optimizer"], tmp / "optimizer.pt")
    torch.save(tensors["scheduler"], tmp / "scheduler.pt")
    torch.save(tensors["rng"], tmp / "rng.pt")
    (tmp / "method.json").write_text(json.dumps(state.pop("method", {})))
    (tmp / "state.json").write_text(json.dumps(state, indent=2))  # written last: marks the folder complete
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    tensors = {
        "model": load_file(str(path / "model.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=False),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=False),
        "rng": torch.load(path / "rng.pt", weights_only=False),
    }
    state = json.loads((path / "state.json").read_text())
    state["method"] = json.loads((path / "method.json").read_text())
    return tensors, state


def command_line() -> list[str]:
    return [Path(sys.argv[0]).name, *sys.argv[1:]]
