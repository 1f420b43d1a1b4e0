"""MUSE-News evaluation: VerbMem, KnowMem (forget, retain) and PrivLeak, each with a bootstrap interval.

Definitions (MUSE, Shi et al. 2024; docs/muse.md):
- VerbMem: the model continues each `muse-news:verbmem` prompt (raw text, no template) greedily
  for 128 new tokens; ROUGE-L F1 of the continuation against the true continuation `gt`.
- KnowMem: each knowmem question goes in after the split's 10 in-context examples, as
  "Question: {q}\nAnswer: {a}\n\n" blocks then "Question: {q}\nAnswer:" (raw text, no template);
  the greedy answer (32 new tokens, cut at its first line break) is scored by ROUGE-L recall
  against the true answer. On the forget QA (lower after unlearning) and the retain QA (utility).
- PrivLeak: Min-K% (k = 0.4) of each privleak text, ROC AUC with forget = 0 and holdout = 1
  (metrics.mia_auc), then (AUC' - AUC'_retain) / AUC'_retain * 100 with AUC' = 1 - AUC
  (metrics.privleak). AUC'_retain comes from the retain model's records on the same texts.
VerbMem and KnowMem are reported x 100 (MUSE's tables); PrivLeak is in percent.

Same two stages as TOFU: `records.collect_records` writes per-example records (cached by
weights, split and settings), `summarize_muse` aggregates them with pure functions.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pmc_unlearn.errors import UserError
from pmc_unlearn.evaluation import scores
from pmc_unlearn.evaluation import metrics as M
from pmc_unlearn.evaluation.bootstrap import LEVEL, N_RESAMPLES, SEED, bootstrap_interval
from pmc_unlearn.evaluation.records import collect_records, read_records, split_key, write_records
from pmc_unlearn.evaluation.suite import EvalItem, GenSettings, SplitSpec
from pmc_unlearn.formatting import PromptFormat
from pmc_unlearn.provenance import barrier, git_hash, json_safe, rank_world, version_fields

log = logging.getLogger(__name__)

BENCHMARK = "muse-news"
VERBMEM = "verbmem"
KNOWMEM_FORGET = "knowmem_forget"
KNOWMEM_RETAIN = "knowmem_retain"
PRIVLEAK_FORGET = "privleak_forget"
PRIVLEAK_HOLDOUT = "privleak_holdout"
VERBMEM_NEW_TOKENS = 128
KNOWMEM_NEW_TOKENS = 32
MAX_LENGTH = 2048  # default tokens of a privleak text scored (longer ones are cut and counted)
SUMMARY_KEYS = ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak")


# ----------------------------------------------------------------------------- pure pieces

def knowmem_prompt(icl: Sequence[dict], question: str) -> str:
    """The in-context examples, each "Question: q\\nAnswer: a" and a blank line, then the question."""
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in icl)
    return f"{shots}Question: {question}\nAnswer:"


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.lower()).strip()


def _has_phrase(phrase_norm: str, text_norm: str) -> bool:
    if not phrase_norm or phrase_norm not in text_norm:  # (the plain test first: most pairs stop here)
        return False
    return re.search(r"(?<!\w)" + re.escape(phrase_norm) + r"(?!\w)", text_norm) is not None


def contains_answer(answer: str, text: str) -> bool:
    """Whether `answer` occurs in `text` as whole words (case and runs of spaces ignored)."""
    return _has_phrase(_norm(answer), _norm(text))


def content_words(text: str) -> set[str]:
    """Lower-cased words of at least 4 letters or digits (the words that identify a question's topic)."""
    return {w for w in re.findall(r"\w+", text.lower()) if len(w) >= 4}


def _covers(answer_norm: str, q_words: set[str], text_norm: str, text_words: set[str], min_overlap: float) -> bool:
    if not _has_phrase(answer_norm, text_norm):
        return False
    return not q_words or len(q_words & text_words) >= min_overlap * len(q_words)


def covers(row: dict, text: str, min_overlap: float = 0.5) -> bool:
    """Whether a text can answer a QA row: the answer occurs in it (whole words) and at least
    `min_overlap` of the question's content words do too (so a bare year elsewhere does not count)."""
    return _covers(_norm(row["answer"]), content_words(row["question"]), _norm(text), content_words(text), min_overlap)


def coverage(qa: Sequence[dict], texts: Sequence[str], min_overlap: float = 0.5) -> list[set[int]]:
    """Per text, the indices of the QA rows it covers (`covers`), each text normalised once."""
    qs = [(_norm(r["answer"]), content_words(r["question"])) for r in qa]
    out = []
    for t in texts:
        tn, tw = _norm(t), content_words(t)
        out.append({i for i, (a, w) in enumerate(qs) if _covers(a, w, tn, tw, min_overlap)})
    return out


def answerable(qa: Sequence[dict], texts: Sequence[str]) -> list[int]:
    """Indices of the QA rows that one of the texts covers (`covers`): a heuristic of what a model trained on them can know."""
    return sorted(set().union(*coverage(qa, texts))) if texts else []


def pick_docs(qa: Sequence[dict], texts: Sequence[str], n: int) -> list[int]:
    """Greedily n text indices that cover the most QA rows not yet covered (ties: lower index), sorted.

    Texts covering nothing new are not picked, so fewer than n may come back.
    """
    cov = coverage(qa, texts)
    done: set[int] = set()
    picked: list[int] = []
    for _ in range(n):
        best = max(range(len(texts)), key=lambda j: (len(cov[j] - done), -j), default=None)
        if best is None or not cov[best] - done:
            break
        picked.append(best)
        done |= cov[best]
    return sorted(picked)


def verbmem_in(items: Sequence[dict], texts: Sequence[str], probe_chars: int = 200) -> list[int]:
    """Indices of verbmem rows whose true continuation starts (first `probe_chars` characters) inside one of the texts."""
    norm = [_norm(t) for t in texts]
    return [i for i, r in enumerate(items) if any(_norm(r["gt"][:probe_chars]) in t for t in norm)]


def pair_auc(forget: Sequence[float], holdout: Sequence[float]) -> float:
    """ROC AUC with forget = 0, holdout = 1 on "higher = non-member" scores, from all pairs: the share of
    (forget, holdout) pairs with holdout > forget, ties counting 1/2 (the same number as metrics.mia_auc,
    without sklearn's overhead: the bootstrap calls it a thousand times)."""
    f, h = np.asarray(forget, dtype=np.float64), np.asarray(holdout, dtype=np.float64)
    if f.size == 0 or h.size == 0:
        return float("nan")
    d = h[None, :] - f[:, None]
    return float(((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size)


def _mean100(xs: Sequence[float]) -> float:
    return 100.0 * float(np.mean(xs)) if len(xs) else float("nan")


def summarize_muse(records: Sequence[dict], retain_auc: float | None = None, *,
                   n_resamples: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict:
    """The MUSE numbers and their bootstrap intervals from per-example records (pure).

    Without `retain_auc` (the retain model's Min-K AUC on the same texts) privleak is null and a
    note says why; privleak_default_reference uses AUC'_retain = 0.5.
    """
    s = M.by_split(records)
    out: dict = {"benchmark": BENCHMARK}

    def mean_key(key: str, split: str, field: str) -> None:
        vals = [float(r[field]) for r in s.get(split, [])]
        out[key] = _mean100(vals)
        lo, hi = bootstrap_interval([vals], lambda x: 100.0 * float(np.mean(x)), n_resamples, seed, level)
        out[f"{key}_ci"] = [lo, hi]
        out[f"n_{key}"] = len(vals)

    mean_key("verbmem_forget", VERBMEM, "rougeL_f1")
    mean_key("knowmem_forget", KNOWMEM_FORGET, "rougeL_recall")
    mean_key("knowmem_retain", KNOWMEM_RETAIN, "rougeL_recall")
    f = [float(r["mia_min_k"]) for r in s.get(PRIVLEAK_FORGET, [])]
    h = [float(r["mia_min_k"]) for r in s.get(PRIVLEAK_HOLDOUT, [])]
    out["privleak_min_k_auc"] = M.mia_auc(f, h)
    out["n_privleak_forget"], out["n_privleak_holdout"] = len(f), len(h)
    if retain_auc is not None:
        out["privleak"] = M.privleak(out["privleak_min_k_auc"], retain_auc)
        out["privleak_ci"] = list(bootstrap_interval(
            [f, h], lambda a, b: M.privleak(pair_auc(a, b), retain_auc), n_resamples, seed, level))
        out["privleak_retain_auc"] = retain_auc
    else:
        out["privleak"] = None
        out["privleak_ci"] = None
        out["privleak_default_reference"] = M.privleak(out["privleak_min_k_auc"], None)
        out["privleak_note"] = ("privleak is null: no retain-model records were given (--no-forget-quality). "
                                "It compares this model's Min-K% AUC with the retain model's; pass --retain-records "
                                "to compute it. privleak_default_reference uses AUC'_retain = 0.5 instead.")
    out["bootstrap"] = {"resamples": n_resamples, "seed": seed, "level": level, "method": "percentile"}
    for name, recs in s.items():
        gen = [r for r in recs if "gen_hit_limit" in r]
        if gen:
            out[f"gen_hit_limit_frac_{name}"] = M.mean(float(r["gen_hit_limit"]) for r in gen)
        trunc = [r for r in recs if "truncated" in r]
        if trunc:
            out[f"truncated_frac_{name}"] = M.mean(float(r["truncated"]) for r in trunc)
    return out


def retain_auc_from_records(records: Sequence[dict], forget_idx: Sequence[int], holdout_idx: Sequence[int]) -> float:
    """The retain model's Min-K AUC on the same privleak texts (by index); UserError when its records lack some."""
    s = M.by_split(records)
    f = {int(r["index"]): r["mia_min_k"] for r in s.get(PRIVLEAK_FORGET, []) if "mia_min_k" in r}
    h = {int(r["index"]): r["mia_min_k"] for r in s.get(PRIVLEAK_HOLDOUT, []) if "mia_min_k" in r}
    miss = [i for i in forget_idx if i not in f] + [i for i in holdout_idx if i not in h]
    if miss:
        raise UserError(f"--retain-records: the retain model's records lack {len(miss)} of the privleak texts "
                        "evaluated here; run `pmc-unlearn eval --benchmark muse-news` on the retain model with the "
                        "same --max-examples")
    return M.mia_auc([f[i] for i in forget_idx], [h[i] for i in holdout_idx])


def read_retain_records(path: str | Path) -> list[dict]:
    """records.jsonl of a MUSE eval of the retain model (the file or its folder)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "records.jsonl"
    if not p.exists():
        raise UserError(f"--retain-records {path}: not found; pass the records.jsonl (or its folder) of "
                        "`pmc-unlearn eval --benchmark muse-news` on the retain model")
    recs = read_records(p)
    if not any(r.get("split") == PRIVLEAK_FORGET for r in recs):
        raise UserError(f"--retain-records {path}: holds no MUSE privleak records; pass the records of "
                        "`pmc-unlearn eval --benchmark muse-news` on the retain model")
    return recs


# ----------------------------------------------------------------------------- the suite

def muse_suite(max_examples: int | None = None, forget_texts: str | None = None) -> list[SplitSpec]:
    """The MUSE-News evaluation splits (first `max_examples` of each when given).

    `forget_texts`: a text source holding the articles the model was trained on, when it saw only
    part of `muse-news:forget` (the muse-quick demo): VerbMem and KnowMem-forget then run on the
    items those articles cover (`verbmem_in`, `answerable`), and PrivLeak's forget side is those
    articles themselves (MUSE's privleak forget texts are runs of articles the model may not have seen).
    """
    from pmc_unlearn.data import load_qa, load_rows

    if max_examples is not None and max_examples < 1:
        raise UserError(f"--max-examples {max_examples}: must be at least 1 (or left out for every example)")
    cut = (lambda xs: xs[:max_examples]) if max_examples else (lambda xs: xs)
    verb = load_rows("muse-news:verbmem")
    kf, kr = load_rows("muse-news:knowmem_forget"), load_rows("muse-news:knowmem_retain")
    vsel, ksel, tag = list(range(len(verb))), list(range(len(kf))), ""
    pf_texts = [r["text"] for r in load_rows("muse-news:privleak_forget")]
    if forget_texts is not None:
        texts = [r["text"] for r in load_qa(forget_texts, require_answers=False, role="--forget-texts", allow_text=True)
                 if "text" in r]
        if not texts:
            raise UserError(f"--forget-texts {forget_texts}: holds no text rows (a 'text' column); pass the articles")
        vsel, ksel, pf_texts = verbmem_in(verb, texts), answerable(kf, texts), texts
        if not vsel and not ksel:
            raise UserError(f"--forget-texts {forget_texts}: covers no verbmem item and no knowmem question")
        import hashlib

        tag = "#texts=" + hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
    icl_f, icl_r = load_rows("muse-news:knowmem_forget_icl"), load_rows("muse-news:knowmem_retain_icl")
    specs = [
        SplitSpec(VERBMEM, "muse-news:verbmem" + tag,
                    [EvalItem(i, verb[i]["prompt"], verb[i]["gt"]) for i in cut(vsel)],
                    nll=False, mode="text", max_new_tokens=VERBMEM_NEW_TOKENS),
        SplitSpec(KNOWMEM_FORGET, "muse-news:knowmem_forget+icl" + tag,
                    [EvalItem(i, knowmem_prompt(icl_f, kf[i]["question"]), kf[i]["answer"]) for i in cut(ksel)],
                    nll=False, mode="text", max_new_tokens=KNOWMEM_NEW_TOKENS, first_line=True),
        SplitSpec(KNOWMEM_RETAIN, "muse-news:knowmem_retain+icl",
                    [EvalItem(i, knowmem_prompt(icl_r, r["question"]), r["answer"]) for i, r in enumerate(cut(kr))],
                    nll=False, mode="text", max_new_tokens=KNOWMEM_NEW_TOKENS, first_line=True),
        SplitSpec(PRIVLEAK_FORGET, "muse-news:privleak_forget" if forget_texts is None else "forget_texts" + tag,
                    [EvalItem(i, "", t) for i, t in enumerate(cut(pf_texts))], generate=False, mode="text"),
        SplitSpec(PRIVLEAK_HOLDOUT, "muse-news:holdout",
                    [EvalItem(i, "", r["text"]) for i, r in enumerate(cut(load_rows("muse-news:holdout")))],
                    generate=False, mode="text"),
    ]
    return [s for s in specs if s.items]


# ----------------------------------------------------------------------------- the whole evaluation

def evaluate_muse(
    model: str | object,
    output_dir: str | Path | None = None,
    *,
    retain_records: str | Path | None = None,
    require_privleak: bool = True,
    self_reference: bool = False,
    max_examples: int | None = None,
    forget_texts: str | None = None,
    max_length: int = MAX_LENGTH,
    batch_size: int = 8,
    dtype: str = "auto",
    use_cache: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> dict:
    """Evaluate a model (alias, folder, hub id or `models.LoadedModel`) on MUSE-News; returns summary.json's dict.

    Without `retain_records`, `require_privleak=True` raises UserError (PrivLeak needs the retain
    model's Min-K AUC); with False, privleak is null and a note says why. `self_reference`: the
    model is the retain model itself (its own AUC is the reference: privleak 0 by definition).
    """
    from pmc_unlearn.evaluation import api
    from pmc_unlearn.models import fingerprint

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if max_length < 2:
        raise UserError(f"--max-length {max_length}: must be at least 2 (tokens of a privleak text scored)")
    fmt = PromptFormat(use_chat_template=False, max_length=max_length)
    if dtype not in api.DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(api.DTYPES)}")
    specs = muse_suite(max_examples, forget_texts)
    ref_records = None
    if retain_records is not None:
        ref_records = read_retain_records(retain_records)
    elif require_privleak and not self_reference:
        raise UserError("privleak needs the retain model's records: pass --retain-records PATH (records.jsonl of "
                        "`pmc-unlearn eval --benchmark muse-news` on the retain model), or --no-forget-quality "
                        "to report it as null")
    out = Path(output_dir).expanduser() if output_dir is not None else None
    if out is not None:
        api.check_output(out, overwrite)

    t0 = time.time()
    lm, precision = api.load_for_eval(model, dtype, device)
    fp = fingerprint(lm.model)
    t_load = time.time() - t0
    gen = GenSettings(KNOWMEM_NEW_TOKENS)
    if out is not None and not overwrite:
        keys = {split_key(fp, s, gen, fmt, lm.tokenizer) for s in specs}
        other = {r.get("key") for r in read_records(out / api.RECORDS_FILE)} - keys
        if other:
            raise UserError(f"--output {out}: its {api.RECORDS_FILE} holds records of another model or other "
                            "settings; choose another --output or pass --overwrite")
    rank, world = rank_world()
    if out is not None and rank == 0:  # several processes (accelerate launch): the main one writes
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            (out / api.RECORDS_FILE).unlink(missing_ok=True)
    barrier(world)
    t1 = time.time()
    records = collect_records(lm.model, lm.tokenizer, specs, fmt, gen, batch_size,
                                records_path=(out / api.RECORDS_FILE) if out is not None else None,
                                use_cache=use_cache, model_fingerprint=fp, progress=progress)
    t_collect = time.time() - t1
    retain_auc = None
    if ref_records is not None or self_reference:
        by = {s.name: [it.index for it in s.items] for s in specs}
        retain_auc = retain_auc_from_records(records if self_reference else ref_records,
                                             by.get(PRIVLEAK_FORGET, []), by.get(PRIVLEAK_HOLDOUT, []))
    summary = summarize_muse(records, retain_auc)
    summary.update({
        "model_name": lm.name, "model_fingerprint": fp, "max_examples": max_examples,
        "forget_texts": forget_texts,
        "retain_reference": "itself (the retain model)" if self_reference else (str(retain_records) if retain_records else None),
        **{f"n_examples_{s.name}": len(s.items) for s in specs},
        "verbmem_new_tokens": VERBMEM_NEW_TOKENS, "knowmem_new_tokens": KNOWMEM_NEW_TOKENS,
        "max_length": max_length, "decoding": "greedy", "prompt": "raw text (no chat template)",
        "batch_size": batch_size, "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "precision": precision.as_dict(), "device": str(next(lm.model.parameters()).device),
        "min_k": scores.MIN_K, "time_load_s": round(t_load, 3), "time_collect_s": round(t_collect, 3),
        "git_commit": git_hash(), **version_fields(),
    })
    summary = json_safe(summary)
    if out is not None and rank == 0:
        write_records(records, out / api.RECORDS_FILE)
        (out / api.SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        log.info("wrote %s and %s in %s", api.RECORDS_FILE, api.SUMMARY_FILE, out)
    return summary
