"""Staged pipelines: cached, resumable steps with a content-hash key, a status and an ETA.

A `Stage` is one step of work with a `key`: a hash (`digest`) of everything its result depends
on (its own settings and the keys of the stages it reads). A `StageStore` remembers each
stage's last key and status. `run_stages` then goes through the stages in order:

    skipped   the stage cannot run (`skip_reason`), or a stage it `needs` did not finish
    cached    the store holds the same key with status "done": nothing to do
    resuming  the same key with status running / failed / interrupted: `run(resume=True)`
    running   anything else: the store clears what the stage wrote, then `run(resume=False)`

and prints one line per stage with the estimated time left. Estimates (`est_s`) are rescaled
by how long the finished stages took against their estimates (`Eta`).

Who uses it: the demo (`StageFolders`: one folder per stage with its `stage.json`), sweeps (one
stage per point, its store the point's `point.json`) and the attack suite (one stage per attack,
its store the sections of `attacks.json`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pmc_unlearn.errors import UserError
from pmc_unlearn.provenance import write_json_atomic

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"
RESUMABLE = ("running", "failed", "interrupted")  # a stage left in one of these states resumes
FINISHED = ("done", "cached")


def digest(obj: Any) -> str:
    """A stage key: sha256 of `obj` as sorted JSON (non-JSON values by str), 16 hex digits."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fmt_s(s: float) -> str:
    """Seconds as '42s' or '3m07s'."""
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class Stage:
    name: str  # e.g. "unlearn/pmc"
    kind: str  # what it is (the demo: finetune | unlearn | eval | attacks); a store may clear by kind
    dir: Path | None
    key: str
    run: Callable[[bool], dict[str, Any]]  # resume -> info (stored with the status)
    est_s: float = 0.0
    needs: list[str] = field(default_factory=list)  # stages that must be done (or cached) first
    optional: bool = False  # a failure is noted, the pipeline goes on
    skip_reason: str | None = None  # set when the stage cannot run at all


class StageStore(Protocol):
    """Where a pipeline keeps each stage's key and status."""

    def read(self, st: Stage) -> dict[str, Any]: ...  # {"key": ..., "status": ...} or {}

    def begin(self, st: Stage, resume: bool, rec: dict[str, Any]) -> None: ...  # before run (fresh: clear it)

    def end(self, st: Stage, rec: dict[str, Any]) -> None: ...  # after run (rec["status"]: done, failed, ...)


def state_of(st: Stage, store: StageStore) -> str:
    """cached, resume or fresh: what `run_stages` would do with `st` now (ignoring skips)."""
    rec = store.read(st)
    if rec.get("key") != st.key:
        return "fresh"
    if rec.get("status") == "done":
        return "cached"
    return "resume" if rec.get("status") in RESUMABLE else "fresh"


def pending_s(stages: Sequence[Stage], store: StageStore) -> float:
    """Estimated seconds of the stages that are neither skipped nor cached."""
    return sum(st.est_s for st in stages if not st.skip_reason and state_of(st, store) != "cached")


class Eta:
    """Stage estimates rescaled by how the stages that ran here compared with theirs."""

    def __init__(self) -> None:
        self.measured = 0.0
        self.estimated = 0.0

    @property
    def scale(self) -> float:
        return self.measured / self.estimated if self.estimated else 1.0

    def observe(self, est_s: float, took_s: float) -> None:
        if took_s > 0.2 * est_s:  # (a stage served from a cache says nothing about this machine)
            self.measured += took_s
            self.estimated += est_s


def run_stages(stages: Sequence[Stage], store: StageStore, *, label: str, say: Callable[[str], None],
               record: Callable[[dict[str, Any], str | None], None] = lambda entry, note: None,
               root: Path | None = None) -> dict[str, str]:
    """Run `stages` in order (see the module docstring); returns {name: skipped | cached | done | failed}.

    `say` gets one line per stage event; `record(entry, note)` one summary entry per stage (name,
    kind, dir relative to `root`, key, status, time_s, ...) with the note worth keeping, if any.
    A non-optional stage's failure, and Ctrl-C, are recorded (status failed / interrupted, so the
    next run resumes it) and raised.
    """
    status: dict[str, str] = {}
    eta = Eta()
    t_start = time.time()
    n = len(stages)
    for i, st in enumerate(stages, 1):
        head = f"[{label} {i}/{n}] {st.name}"
        entry: dict[str, Any] = {"name": st.name, "kind": st.kind, "key": st.key}
        if st.dir is not None and root is not None:
            entry = {"name": st.name, "kind": st.kind, "dir": os.path.relpath(st.dir, root), "key": st.key}
        if st.skip_reason:
            status[st.name] = "skipped"
            say(f"{head}: skipped ({st.skip_reason})")
            record({**entry, "status": "skipped", "note": st.skip_reason}, st.skip_reason)
            continue
        blocked = [x for x in st.needs if status.get(x) not in FINISHED]
        if blocked:
            status[st.name] = "skipped"
            say(f"{head}: skipped (needs {', '.join(blocked)})")
            record({**entry, "status": "skipped", "note": f"{st.name}: skipped because {', '.join(blocked)} did not finish"},
                   None)
            continue
        prev = store.read(st)
        state = state_of(st, store)
        if state == "cached":
            status[st.name] = "cached"
            say(f"{head}: cached (key {st.key}, took {fmt_s(prev.get('time_s', 0))} when run)")
            record({**entry, "status": "cached", "time_s": prev.get("time_s"), "load_avg": prev.get("load_avg_end")}, None)
            continue
        resume = state == "resume"
        before = float(prev.get("time_s", 0.0)) if resume else 0.0
        remaining = sum(s.est_s for s in stages[i - 1:] if status.get(s.name) is None)
        say(f"{head}: {'resuming' if resume else 'running'} (est. {fmt_s(st.est_s * eta.scale)}; "
            f"{label} elapsed {fmt_s(time.time() - t_start)}, ETA ~{fmt_s(remaining * eta.scale)})")
        rec: dict[str, Any] = {"name": st.name, "key": st.key, "status": "running", "time_s": before, "started": now(),
                               "load_avg_start": list(os.getloadavg()),
                               "resumes": int(prev.get("resumes", 0)) + (1 if resume else 0)}
        store.begin(st, resume, rec)
        t = time.time()
        try:
            info = st.run(resume)
            result = "done"
        except KeyboardInterrupt:
            rec.update(status="interrupted", time_s=round(before + time.time() - t, 3))
            store.end(st, rec)
            record({**entry, "status": "interrupted"}, None)
            raise
        except Exception as e:  # noqa: BLE001 - an optional stage's failure of any kind is noted, not fatal
            if not st.optional:
                rec.update(status="failed", error=f"{type(e).__name__}: {e}", time_s=round(before + time.time() - t, 3))
                store.end(st, rec)
                record({**entry, "status": "failed", "note": str(e)}, None)
                raise
            info, result = {"error": f"{type(e).__name__}: {e}"}, "failed"
            log.warning("%s failed: %s", st.name, e)
        dt = time.time() - t
        rec.update(status=result, time_s=round(before + dt, 3), finished=now(), load_avg_end=list(os.getloadavg()),
                   info=info)
        store.end(st, rec)
        status[st.name] = result
        if result == "done" and not resume:
            eta.observe(st.est_s, dt)
        note = info.get("note") or info.get("error")
        say(f"{head}: {result} in {fmt_s(dt)} (load {os.getloadavg()[0]:.1f})" + (f"; {note}" if note else ""))
        record({**entry, "status": result, "time_s": rec["time_s"], "load_avg": rec["load_avg_end"],
                **({"note": note} if note else {})}, f"{st.name}: {note}" if note and result != "done" else None)
    return status


class StageFolders:
    """A stage store of one folder per stage: `stage.json` holds the key and status, and a stage is
    cleared by removing what its kind writes (`outputs`: kind -> top-level names). Anything else in a
    stage folder is the user's: a stage that must be redone there is refused, never removed."""

    def __init__(self, outputs: dict[str, set[str]], what: str = "demo"):
        self.outputs = outputs
        self.what = what

    def read(self, st: Stage) -> dict[str, Any]:
        return read_stage(st.dir) if st.dir is not None else {}

    def foreign_files(self, d: Path, kind: str) -> list[str]:
        """Entries of a stage folder its stage did not write (its outputs, stage.json, temporary files, the lock)."""
        from pmc_unlearn.rundir import folder_entries

        mine = self.outputs.get(kind, set()) | {STAGE_FILE}
        return [n for n in folder_entries(d) if n not in mine and not n.endswith(".tmp") and not n.startswith(".tmp-")]

    def check(self, stages: Sequence[Stage]) -> None:
        """UserError, before any work, when a stage to redo shares its folder with files it did not write."""
        for st in stages:
            if st.skip_reason or st.dir is None or state_of(st, self) != "fresh":
                continue
            other = self.foreign_files(st.dir, st.kind)
            if other:
                raise UserError(f"{self.what}: {st.dir / other[0]} was not written by the {self.what}, and stage "
                                f"{st.name} must be redone there; move it out of the {self.what} folder and run again")

    def clear(self, d: Path, kind: str) -> None:
        """Remove what a stage wrote in `d` (to redo it); refuse when `d` holds anything else."""
        other = self.foreign_files(d, kind)
        if other:
            raise UserError(f"{self.what}: {d / other[0]} was not written by the {self.what}, and the stage in {d} "
                            f"must be redone; move it out of the {self.what} folder and run again")
        if not d.is_dir():
            return
        for p in d.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def begin(self, st: Stage, resume: bool, rec: dict[str, Any]) -> None:
        assert st.dir is not None
        if not resume:
            self.clear(st.dir, st.kind)
        st.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(st.dir / STAGE_FILE, rec)

    def end(self, st: Stage, rec: dict[str, Any]) -> None:
        assert st.dir is not None
        write_json_atomic(st.dir / STAGE_FILE, rec)


def read_stage(d: Path) -> dict[str, Any]:
    """A folder's stage.json ({} when missing or unreadable)."""
    try:
        return json.loads((d / STAGE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# ----- folders a pipeline owns ------------------------------------------------------------------------

def check_owned(root: Path, owned: bool, refusal: str) -> None:
    """A pipeline's output folder is new, empty or its own (`owned`); UserError(`refusal`) otherwise."""
    from pmc_unlearn import rundir

    rundir.check_writable(root)
    if rundir.folder_entries(root) and not owned:
        raise UserError(refusal)


def claim(root: Path, marker: str, text: str) -> None:
    """Create the folder and mark it as the pipeline's (`marker` file holding `text`)."""
    from pmc_unlearn import rundir

    rundir.make_folder(root)
    if not (root / marker).exists():
        (root / marker).write_text(text)
