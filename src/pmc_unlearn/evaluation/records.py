"""Evaluation records on disk: the per-split cache, records.jsonl, resuming and sharding.

`collect_records` gives the records of every item of every split, computing only the missing
ones (`scoring.compute_items`). Records are appended to `records.jsonl` files as each batch
finishes (flushed), so a killed run resumes where it stopped. They are cached per split under
`<cache_root>/eval/<key>/`, the key being a hash of the model fingerprint (weights, not the
name), the split, the generation settings and the prompt format; batch size is not part of the
key because results do not depend on it. Under `accelerate launch` the examples of each batch
are sharded over the processes and gathered; only the main process writes files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

from pmc_unlearn.data import read_jsonl_dicts
from pmc_unlearn.errors import UserError
from pmc_unlearn.evaluation import scores, scoring
from pmc_unlearn.evaluation.suite import EVAL_FORMAT, EvalItem, GenSettings, Record, SplitSpec
from pmc_unlearn.formatting import PromptFormat, prompt_ids, prompt_text
from pmc_unlearn.provenance import barrier, gather, jsonl_text, rank_world, write_json_atomic, write_jsonl_atomic

SCHEMA_VERSION = 2  # bump when the record fields or their computation change (invalidates caches)
# 2: per-token lists (tok_lp, tok_hit, tok_z) and zlib sizes instead of em/es/mia_* (derived per convention)


def split_key(model_fingerprint: str, spec: SplitSpec, gen: GenSettings, fmt: PromptFormat, tokenizer) -> str:
    """Cache key of one split's records: weights, split, what is computed, decoding and prompt format."""
    probe = "Which question is this?"
    payload = {
        "schema": SCHEMA_VERSION, "model": model_fingerprint, "split": spec.name, "source": spec.source,
        "nll": spec.nll, "generate": spec.generate,
        **({"mode": spec.mode, "max_new_tokens": spec.max_new_tokens, "first_line": spec.first_line}
           if (spec.mode, spec.max_new_tokens, spec.first_line) != ("qa", None, False) else {}),
        "gen": asdict(gen) if spec.generate else None, "fmt": asdict(fmt),
        "prompt": prompt_text(tokenizer, probe, fmt), "prompt_ids": prompt_ids(tokenizer, probe, fmt),
        "eos": tokenizer.eos_token_id, "min_k": scores.MIN_K,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def eval_cache_root() -> Path:
    """`PMC_UNLEARN_EVAL_CACHE`, else `<models.cache_root()>/eval`."""
    env = os.environ.get("PMC_UNLEARN_EVAL_CACHE")
    if env:
        return Path(env)
    from pmc_unlearn.models import cache_root

    return cache_root() / "eval"


def read_records(path: Path) -> list[Record]:
    """Records of a records.jsonl; a line cut by a killed write (not valid JSON) is skipped."""
    return read_jsonl_dicts(path, warn=True)


class Appender:
    """Appends records as JSON lines, one write per batch under a lock (rundir.append_atomic).

    Several processes may share a file (two evaluations of the same model share the cache): each
    batch lands whole, never interleaved with another's. A write that fails (a full disk) leaves
    the file as it was and raises OutputWriteError.
    """

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def write(self, recs: Iterable[Record]) -> None:
        from pmc_unlearn.rundir import append_atomic, write_failed

        data = jsonl_text(recs).encode("utf-8")
        if not data:
            return
        try:
            append_atomic(self.path, data)
        except OSError as e:
            raise write_failed(e, self.path, f"{self.path} keeps the records written before (a rerun resumes)") from None

    def close(self) -> None:
        pass


def _matches(rec: Record, it: EvalItem) -> bool:
    return rec.get("question") == it.question and rec.get("answer") == it.answer


def collect_records(
    model,
    tokenizer,
    specs: Sequence[SplitSpec],
    fmt: PromptFormat = EVAL_FORMAT,
    gen: GenSettings = GenSettings(),
    batch_size: int = 8,
    *,
    records_path: str | Path | None = None,
    use_cache: bool = True,
    model_fingerprint: str | None = None,
    progress: bool = True,
) -> list[Record]:
    """Records for every item of every split, in suite order; reuses finished ones, appends new ones.

    Finished records are read from `records_path` (when given) and from the cache (when
    `use_cache`), matched by split key, index and question/answer text. New ones are appended
    to both after each batch. Every record carries its split's cache key in `key`.
    """
    from tqdm.auto import tqdm

    from pmc_unlearn.models import fingerprint

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    rank, world = rank_world()
    main = rank == 0
    fp = model_fingerprint or fingerprint(model)
    keys = {s.name: split_key(fp, s, gen, fmt, tokenizer) for s in specs}
    known = set(keys.values())
    done: dict[tuple[str, str, int], Record] = {}  # (key, split, index) -> record

    def remember(recs: Iterable[Record]) -> None:
        for r in recs:
            if r.get("key") in known:
                done.setdefault((r["key"], r["split"], int(r["index"])), r)

    out_file = Path(records_path) if records_path else None
    in_out: set[tuple[str, str, int]] = set()  # what records_path already holds
    if out_file is not None:
        existing = read_records(out_file)
        remember(existing)
        in_out = {(r.get("key"), r.get("split"), r.get("index")) for r in existing}
    cache_root = eval_cache_root()
    if use_cache:
        for s in specs:
            remember(read_records(cache_root / keys[s.name] / "records.jsonl"))

    barrier(world)  # every process has read the same finished records before the main one appends
    out_app = Appender(out_file) if (out_file is not None and main) else None
    cache_apps: dict[str, Appender] = {}
    try:
        pending: list[tuple[SplitSpec, EvalItem]] = []
        for spec in specs:
            key = keys[spec.name]
            if use_cache and main:
                cdir = cache_root / key
                cdir.mkdir(parents=True, exist_ok=True)
                meta = cdir / "meta.json"
                if not meta.exists():  # (temporary file per process, then rename: never half-written)
                    write_json_atomic(meta, {"key": key, "model_fingerprint": fp, "split": spec.name,
                                             "source": spec.source, "gen": asdict(gen), "fmt": asdict(fmt),
                                             "schema": SCHEMA_VERSION})
                cache_apps[spec.name] = Appender(cdir / "records.jsonl")
            have = set()
            for it in spec.items:
                r = done.get((key, spec.name, it.index))
                if r is not None and _matches(r, it):
                    have.add(it.index)
                    if out_app is not None and (key, spec.name, it.index) not in in_out:
                        out_app.write([r])  # reused from the cache, missing from records_path
                else:
                    done.pop((key, spec.name, it.index), None)
            # sorted by length within each split, so a batch holds similar lengths (results do not change)
            pending += [(spec, it) for it in sorted((it for it in spec.items if it.index not in have),
                                                     key=lambda it: (len(it.question) + len(it.answer), it.index))]
        if pending:
            # batches run across split boundaries: short splits share one decoding call
            step = batch_size * world
            bar = tqdm(total=len(pending), desc="eval " + "/".join(dict.fromkeys(sp.name for sp, _ in pending)),
                       unit="ex", disable=not (progress and main), leave=False)
            for start in range(0, len(pending), step):
                glob = pending[start : start + step]
                recs = scoring.compute_items(model, tokenizer, glob[rank::world], fmt, gen, batch_size)
                for r in recs:
                    r["key"] = keys[r["split"]]
                recs = gather(recs, world)
                for r in recs:
                    done[(r["key"], r["split"], int(r["index"]))] = r
                if main:
                    for name in dict.fromkeys(r["split"] for r in recs):
                        if name in cache_apps:
                            cache_apps[name].write(r for r in recs if r["split"] == name)
                    if out_app is not None:
                        out_app.write(recs)
                bar.update(len(glob))
            bar.close()
    finally:
        for app in cache_apps.values():
            app.close()
        if out_app is not None:
            out_app.close()
    return [done[(keys[s.name], s.name, it.index)] for s in specs for it in s.items]


def write_records(records: Sequence[Record], path: str | Path) -> None:
    """Write records as JSON lines atomically (temp file, rename)."""
    from pmc_unlearn.rundir import write_failed

    path = Path(path)
    try:
        write_jsonl_atomic(path, records)
    except OSError as e:
        raise write_failed(e, path, f"{path} is as it was") from None

