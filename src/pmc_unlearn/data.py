"""Loading question/answer data from the places users keep it.

A *source* is one string:
- `tofu:<split>`: the TOFU splits bundled with the package (no download), e.g. `tofu:forget01`,
  `tofu:retain99`, `tofu:forget01_perturbed`, `tofu:real_authors`, `tofu:idontknow`.
- `muse-news:<split>`: the MUSE-News files bundled with the package (CC BY 4.0), e.g.
  `muse-news:forget` (raw articles), `muse-news:retain`, `muse-news:knowmem_forget`.
- a local file: `.json` (a JSON array, an object with a list under "data", or the "chunked"
  layout of several arrays one per line), `.jsonl`, `.csv`, `.parquet`.
- anything else is taken as a Hugging Face hub dataset name (needs network and `datasets`);
  `locuslab/TOFU` with a config (`locuslab/TOFU:forget01`) maps to the bundled copy.

Rows come back as plain dicts with the columns renamed to `question` and `answer`. A forget set
may hold questions only (PMC never needs the answers); `require_answers=True` asks for them.

Every file is checked before any work starts: UTF-8 text, one object per row, the question (and
answer) columns holding non-empty strings, a file under `MAX_FILE_BYTES` and texts under
`MAX_TEXT_CHARS`; anything else is a `UserError` naming the file and the row. (That a question
fits the model's context is checked with the tokenizer: `trainer.check_lengths`.)

A source whose rows have a `text` column and no question column is a *text* source (plain
documents, e.g. MUSE-News articles): its rows come back as `{"text": ...}` and training turns
them into token chunks (formatting.split_text_rows; docs/muse.md).
"""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path
from typing import Any

from pmc_unlearn.errors import UserError

Row = dict[str, Any]

TOFU_SPLITS = (
    "full", "retain90", "retain95", "retain99",
    "forget01", "forget05", "forget10",
    "forget01_perturbed", "forget05_perturbed", "forget10_perturbed",
    "retain_perturbed", "real_authors", "real_authors_perturbed",
    "world_facts", "world_facts_perturbed",
    "holdout01", "holdout05", "holdout10", "idontknow",
)
TOFU_HUB_NAME = "locuslab/TOFU"
# forgetXX.json names its columns prompt/response; every other TOFU file uses question/answer.
_TOFU_ALIASES = {"prompt": "question", "response": "answer"}
AUTHOR_SIZE = 20  # TOFU: 20 consecutive rows per fictitious author
MAX_FILE_BYTES = 4 * 2**30  # a QA file larger than this is almost surely not one
MAX_TEXT_CHARS = 50_000  # a question or answer longer than this is no QA pair (and would not fit a context)


# MUSE-News: source split -> (file under assets/muse-news, what a row is). String rows become {"text": ...}.
MUSE_SPLITS = {
    "forget": "raw/forget.json",
    "retain": "privleak/retain2.json",  # stands in for the raw retain2 corpus (missing upstream)
    "holdout": "privleak/holdout.json",  # stands in for the raw holdout corpus (missing upstream)
    "privleak_forget": "privleak/forget.json",
    "verbmem": "verbmem/forget.json",
    "knowmem_forget": "knowmem/forget_qa.json",
    "knowmem_retain": "knowmem/retain2_qa.json",
    "knowmem_forget_icl": "knowmem/forget_qa_icl.json",
    "knowmem_retain_icl": "knowmem/retain2_qa_icl.json",
}
TEXT_KEY = "text"


def tofu_dir() -> Path:
    """Folder of the bundled TOFU files (MIT licence, see LICENSE there)."""
    return Path(str(resources.files("pmc_unlearn") / "assets" / "tofu"))


def read_records(path: Path) -> list[Row]:
    """Read a local data file into a list of dicts; the format follows the suffix."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl", ".csv", ".parquet"):
        raise UserError(f"{path}: unknown data format '{suffix}'; use .json, .jsonl, .csv or .parquet")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise UserError(f"{path}: {size / 2**30:.1f} GiB, over the {MAX_FILE_BYTES // 2**30} GiB limit for a data file; "
                        "split it or pass fewer rows")
    try:
        rows = _read_by_suffix(path, suffix)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                        "save it as UTF-8") from None
    return _check_rows(rows, str(path))


def _read_by_suffix(path: Path, suffix: str) -> list:
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); fix the line or the file") from e
        return rows
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            try:
                return list(csv.DictReader(f))
            except csv.Error as e:
                raise UserError(f"{path}: not a readable CSV file ({e}); fix the file") from None
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
        raise UserError(f"{path}: not a readable Parquet file ({type(e).__name__}: {str(e)[:200]})") from None


def _read_json(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        # The "chunked" layout (Dataset.to_json in batches): one JSON array per line.
        rows: list[Row] = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                part = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            rows.extend(part if isinstance(part, list) else [part])
        return rows
    if isinstance(obj, dict):
        for key in ("data", "rows", "train"):
            if isinstance(obj.get(key), list):
                return obj[key]
        raise UserError(f"{path}: a JSON object must hold the rows as a list under 'data'")
    if not isinstance(obj, list):
        raise UserError(f"{path}: expected a JSON array of rows, found a {type(obj).__name__}")
    return obj


def _check_rows(rows: list, where: str) -> list[Row]:
    """Every row an object with string keys (what a JSON array of numbers, or mixed rows, is not)."""
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise UserError(f"{where}: row {i} is {type(r).__name__} {str(r)[:40]!r}, not an object with the "
                            "question (and answer) columns; every row must be one")
    return rows


def _tofu_rows(split: str) -> list[Row]:
    if split not in TOFU_SPLITS:
        raise UserError(f"tofu:{split}: unknown TOFU split; choose one of: {', '.join(TOFU_SPLITS)}")
    if split == "idontknow":
        lines = (tofu_dir() / "idontknow.jsonl").read_text(encoding="utf-8").splitlines()
        return [{"answer": ln.strip()} for ln in lines if ln.strip()]
    rows = _read_json(tofu_dir() / f"{split}.json")
    return [{_TOFU_ALIASES.get(k, k): v for k, v in r.items()} for r in rows]


def muse_dir() -> Path:
    """Folder of the bundled MUSE-News files (CC BY 4.0, see LICENSE and SOURCE.md there)."""
    return Path(str(resources.files("pmc_unlearn") / "assets" / "muse-news"))


def _muse_rows(split: str) -> list[Row]:
    if split not in MUSE_SPLITS:
        raise UserError(f"muse-news:{split}: unknown MUSE-News split; choose one of: {', '.join(MUSE_SPLITS)}")
    rows = _read_json(muse_dir() / MUSE_SPLITS[split])
    return [{TEXT_KEY: r} if isinstance(r, str) else dict(r) for r in rows]


def is_text_row(row: Row) -> bool:
    """A plain document (a `text` and no question), as opposed to a question/answer pair."""
    return TEXT_KEY in row and "question" not in row


def _hub_rows(name: str) -> list[Row]:
    repo, _, config = name.partition(":")
    if repo == TOFU_HUB_NAME:
        return _tofu_rows(config or "full")
    try:
        import datasets  # optional
    except ImportError as e:
        raise UserError(
            f"{name}: not a local file, not tofu:<split>; loading hub datasets needs "
            "`pip install pmc-unlearn[hub]` and network access"
        ) from e
    try:
        ds = datasets.load_dataset(repo, config or None, split="train")
    except Exception as e:  # network, missing dataset: the message says which
        raise UserError(f"{name}: could not load from the hub ({e}); pass a local file instead") from e
    return _check_rows([dict(r) for r in ds], name)


def load_rows(source: str) -> list[Row]:
    """Raw rows of a source, columns as stored."""
    if source.startswith("tofu:"):
        return _tofu_rows(source.split(":", 1)[1])
    if source.startswith("muse-news:"):
        return _muse_rows(source.split(":", 1)[1])
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            raise UserError(f"{source}: is a folder; pass a .json, .jsonl, .csv or .parquet file")
        return read_records(path)
    if path.suffix.lower() in (".json", ".jsonl", ".csv", ".parquet") or "/" not in source and "." in source:
        raise UserError(f"{source}: file not found; check the path (or use tofu:<split> for bundled TOFU)")
    return _hub_rows(source)


def load_qa(
    source: str,
    question_key: str = "question",
    answer_key: str = "answer",
    require_answers: bool = True,
    role: str = "data",
    allow_text: bool = False,
) -> list[Row]:
    """Rows with `question` (and `answer`) renamed from the configured columns; other columns kept.

    With `allow_text` (training data), a source of plain documents (a `text` column, no question
    column) comes back as text rows `{"text": ...}`; otherwise it is refused for lacking questions.
    """
    rows = load_rows(source)
    if not rows:
        raise UserError(f"{role} source {source} is empty; point it at a file with at least one row")
    first = rows[0]
    if allow_text and isinstance(first, dict) and TEXT_KEY in first and question_key not in first and not any(
            a in first for a, b in _TOFU_ALIASES.items() if b == question_key):
        return _text_rows(rows, source, role)
    qk = question_key if question_key in first else next((a for a, b in _TOFU_ALIASES.items() if b == question_key and a in first), question_key)
    if qk not in first:
        raise UserError(
            f"{role} source {source} has no column '{question_key}' (columns: {', '.join(map(str, first))}); "
            f"rename it or set data.question_key"
        )
    ak = answer_key if answer_key in first else next((a for a, b in _TOFU_ALIASES.items() if b == answer_key and a in first), answer_key)
    has_answers = ak in first
    if require_answers and not has_answers:
        raise UserError(
            f"{role} source {source} has no column '{answer_key}' (columns: {', '.join(map(str, first))}); "
            f"rename it or set data.answer_key"
        )
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise UserError(f"{role} source {source}: row {i} is not an object with the question (and answer) columns")
        q = r.get(qk)
        if not isinstance(q, str) or not q.strip():
            raise UserError(f"{role} source {source}: row {i} has an empty or missing question (column '{qk}')")
        for what, text in (("question", q), ("answer", r.get(ak))):
            if isinstance(text, str) and len(text) > MAX_TEXT_CHARS:
                raise UserError(f"{role} source {source}: row {i}'s {what} has {len(text):,} characters, over the "
                                f"{MAX_TEXT_CHARS:,} limit (a QA pair must fit the model's context); shorten it")
        new = {k: v for k, v in r.items() if k not in (qk, ak)}
        new["question"] = q
        if has_answers:
            a = r.get(ak)
            if require_answers and (not isinstance(a, str) or not a.strip()):
                raise UserError(f"{role} source {source}: row {i} has an empty or missing answer (column '{ak}')")
            new["answer"] = a
        out.append(new)
    return out


def _text_rows(rows: list[Row], source: str, role: str) -> list[Row]:
    """Rows of a text source as {"text": ...} (other columns kept); empty documents are skipped with a warning.

    (MUSE-News's raw/forget.json holds one empty string, row 821.)
    """
    import logging

    out, empty = [], []
    for i, r in enumerate(rows):
        t = r.get(TEXT_KEY)
        if not isinstance(t, str):
            raise UserError(f"{role} source {source}: row {i} has no '{TEXT_KEY}' string")
        (out.append(dict(r)) if t.strip() else empty.append(i))
    if empty:
        logging.getLogger(__name__).warning("%s source %s: skipping %d empty documents (rows %s)", role, source,
                                            len(empty), ", ".join(map(str, empty[:5])))
    if not out:
        raise UserError(f"{role} source {source}: every '{TEXT_KEY}' is empty; point it at a file with text")
    return out


def read_jsonl_dicts(path: Path, warn: bool = False) -> list[Row]:
    """Objects of an append-only JSON-lines file (records, logs); a line cut by a killed write is skipped."""
    import logging

    if not path.exists():
        return []
    out: list[Row] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                if warn:
                    logging.getLogger(__name__).warning(
                        "%s: skipping an incomplete line (a run was interrupted while writing)", path)
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


def overlap_report(forget: list[Row], retain: list[Row]) -> tuple[int, int]:
    """(duplicate questions within forget, forget questions also present in retain); texts for text rows.

    Duplicates are counted as extra copies: a question given k times adds k - 1 (questions are
    compared after stripping surrounding whitespace). Training keeps every copy as a question of
    its own, so a question given k times weighs k times as much.
    """
    def key(r: Row) -> str:
        return (r.get("question") or r.get(TEXT_KEY) or "").strip()

    fq = [key(r) for r in forget]
    rq = {key(r) for r in retain}
    dup = len(fq) - len(set(fq))
    return dup, sum(1 for q in set(fq) if q in rq)
