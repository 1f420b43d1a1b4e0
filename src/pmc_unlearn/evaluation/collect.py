"""Stage 1 of evaluation: run the model once per example and write per-example records.

The only part of evaluation that touches the model. For every split of the suite it computes,
per example and in batches:
- teacher-forced answer-token NLL (token mean, answer tokens only; right padding + explicit
  masks, so the numbers do not depend on the batch size) of the answer, the paraphrased answer
  and each perturbed answer;
- from the same forward pass of the answer: exact memorisation, extraction strength and the
  membership-inference scores LOSS, ZLib, Min-K% and Min-K%++ (the full distribution's mean and
  variance of log p at each answer position come from those logits, no second forward);
- the greedy generation for the prompt alone (left-padded batches, cut at EOS, the new-token
  limit recorded) and its ROUGE-1 / ROUGE-L recall against the answer.

Records are appended to `records.jsonl` files as each batch finishes (flushed), so a killed run
resumes where it stopped. They are cached per split under `<cache_root>/eval/<key>/`, the key
being a hash of the model fingerprint (weights, not the name), the split, the generation
settings and the prompt format; batch size is not part of the key because results do not
depend on it. Under `accelerate launch` the examples of each batch are sharded over the
processes and gathered; only the main process writes files.

Reusable helpers for other code: `answer_nll`, `answer_scores`, `generate_greedy`,
`collect_records`, `tofu_suite`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pmc_unlearn.data import TOFU_SPLITS, load_qa, load_rows, read_jsonl_dicts
from pmc_unlearn.errors import UserError
from pmc_unlearn.evaluation import metrics as M
from pmc_unlearn.evaluation import scores
from pmc_unlearn.formatting import Example, PromptFormat, collate_prompts, collate_train, encode_pair, prompt_ids, prompt_text
from pmc_unlearn.losses import token_logprobs

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # bump when the record fields or their computation change (invalidates caches)
FORGET_SPLITS = ("forget01", "forget05", "forget10")
RETAIN_SAMPLES = ("perturbed", "rng400")
RNG400_SEED, RNG400_SIZE = 12345, 400
EVAL_FORMAT = PromptFormat(max_length=512)  # TOFU answers fit; longer ones are cut and counted ("truncated")

Record = dict[str, Any]


# ----------------------------------------------------------------------------- what to evaluate

@dataclass
class EvalItem:
    """One question with its ground truth and (optionally) the paraphrased and perturbed answers."""

    index: int
    question: str
    answer: str
    para_answer: str | None = None
    pert_answers: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # copied into the record (e.g. source_index)


@dataclass
class SplitSpec:
    """A named list of items and what to compute on them."""

    name: str
    source: str  # where the items come from; part of the cache key
    items: list[EvalItem]
    nll: bool = True  # answer / paraphrase / perturbed NLL, EM, ES and MIA scores
    generate: bool = True  # greedy generation and ROUGE


@dataclass(frozen=True)
class GenSettings:
    """Greedy decoding settings (the prompt alone as input, cut at EOS)."""

    max_new_tokens: int = 200


def holdout_for(forget_split: str) -> str:
    return "holdout" + forget_split.removeprefix("forget")


def retain_for(forget_split: str) -> str:
    """retainXX whose union with forgetXX is `full` (retain99 for forget01): what the PMC authors sample from."""
    return f"retain{100 - int(forget_split.removeprefix('forget'))}"


def rng400_indices(n_rows: int, seed: int = RNG400_SEED, size: int = RNG400_SIZE) -> list[int]:
    """The PMC authors' retain sample: numpy default_rng(12345).integers(0, n_rows, 400), with replacement."""
    import numpy as np

    return [int(i) for i in np.random.default_rng(seed).integers(0, n_rows, size)]


def tofu_suite(forget_split: str, retain_sample: str = "perturbed", max_examples: int | None = None) -> list[SplitSpec]:
    """The TOFU evaluation splits for one forget split (first `max_examples` rows of each when given)."""
    if forget_split not in FORGET_SPLITS:
        raise UserError(f"--forget-split {forget_split}: choose one of {', '.join(FORGET_SPLITS)}")
    if retain_sample not in RETAIN_SAMPLES:
        raise UserError(f"--retain-sample {retain_sample}: choose one of {', '.join(RETAIN_SAMPLES)}")
    if max_examples is not None and max_examples < 1:
        raise UserError(f"--max-examples {max_examples}: must be at least 1 (or left out for every example)")
    cut = (lambda xs: xs[:max_examples]) if max_examples else (lambda xs: xs)

    def perturbed(split: str, with_para: bool) -> list[EvalItem]:
        rows = load_rows(f"tofu:{split}")
        return [EvalItem(i, r["question"], r["answer"], r["paraphrased_answer"] if with_para else None,
                         list(r["perturbed_answer"])) for i, r in enumerate(cut(rows))]

    fsrc = f"tofu:{forget_split}_perturbed"
    frows = cut(load_rows(fsrc))
    specs = [
        SplitSpec(M.FORGET, fsrc, perturbed(f"{forget_split}_perturbed", True)),
        SplitSpec(M.FORGET_PARA, fsrc + "#paraphrased",
                  [EvalItem(i, r["paraphrased_question"], r["paraphrased_answer"]) for i, r in enumerate(frows)],
                  nll=False),
        SplitSpec(M.RETAIN, "tofu:retain_perturbed", perturbed("retain_perturbed", True)),
    ]
    if retain_sample == "rng400":
        rsplit = retain_for(forget_split)
        rows = load_qa(f"tofu:{rsplit}")
        idx = rng400_indices(len(rows))
        specs.append(SplitSpec(
            M.RETAIN_SAMPLE, f"tofu:{rsplit}#rng{RNG400_SEED}x{RNG400_SIZE}",
            [EvalItem(i, rows[j]["question"], rows[j]["answer"], extra={"source_index": j})
             for i, j in enumerate(cut(idx))],
            nll=False))
    specs += [
        SplitSpec(M.REAL_AUTHORS, "tofu:real_authors_perturbed", perturbed("real_authors_perturbed", False)),
        SplitSpec(M.WORLD_FACTS, "tofu:world_facts_perturbed", perturbed("world_facts_perturbed", False)),
    ]
    hsplit = holdout_for(forget_split)
    assert hsplit in TOFU_SPLITS
    specs.append(SplitSpec(M.HOLDOUT, f"tofu:{hsplit}",
                           [EvalItem(i, r["question"], r["answer"]) for i, r in enumerate(cut(load_qa(f"tofu:{hsplit}")))],
                           generate=False))
    return specs


# ----------------------------------------------------------------------------- model helpers

def _device(model) -> torch.device:
    return next(model.parameters()).device


def _sorted_chunks(n: int, length: Callable[[int], int], batch_size: int) -> list[list[int]]:
    """Indices 0..n-1 sorted by length (ties by index), cut into batches: less padding, same results."""
    order = sorted(range(n), key=lambda i: (length(i), i))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


@torch.inference_mode()
def _forward_scores(model, examples: list[Example], with_stats: list[bool], pad_id: int) -> list[dict]:
    """One right-padded forward pass; per example the answer NLL and, where asked, EM/ES/MIA scores."""
    batch = collate_train(examples, pad_id)
    dev = _device(model)
    labels = batch["labels"].to(dev)  # [B, T]
    logits = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits  # [B, T, V]
    lp, mask = token_logprobs(logits, labels)  # [B, T-1] each
    nll = -lp.sum(1) / mask.sum(1)  # [B] (losses.per_example_nll's formula, without a second log-softmax)
    out = []
    for b, ex in enumerate(examples):
        d = {"nll": float(nll[b]), "n_tokens": int(mask[b].sum()), "truncated": bool(ex.truncated)}
        if with_stats[b]:
            pos = mask[b].nonzero().squeeze(-1)  # [n] positions of answer targets in the shifted view
            lg = logits[b, :-1][pos]  # [n, V] predictions of the answer tokens
            tgt = labels[b, 1:][pos]  # [n]
            mu, var = scores.vocab_moments(lg)
            tok_lp = lp[b][pos]
            pred = lg.argmax(-1).tolist()
            tgt_l = tgt.tolist()
            d.update(
                em=scores.exact_memorization(pred, tgt_l),
                es=scores.extraction_strength(pred, tgt_l),
                mia_min_k=scores.min_k_score(tok_lp),
                mia_min_k_plus_plus=scores.min_k_plus_plus_score(tok_lp, mu, var),
            )
        out.append(d)
    return out


def answer_scores(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    fmt: PromptFormat = EVAL_FORMAT,
    batch_size: int = 8,
    with_stats: bool | Sequence[bool] = True,
) -> list[dict]:
    """Per (question, answer): nll, n_tokens, truncated and (with_stats) em, es, mia_loss/zlib/min_k/min_k_plus_plus.

    Sorted by length and batched internally; the output follows the input order and does not
    depend on `batch_size`.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    stats = [bool(with_stats)] * len(questions) if isinstance(with_stats, bool) else list(with_stats)
    model.eval()
    exs = [encode_pair(tokenizer, q, a, fmt) for q, a in zip(questions, answers)]
    out: list[dict | None] = [None] * len(exs)
    for chunk in _sorted_chunks(len(exs), lambda i: len(exs[i].prompt) + len(exs[i].answer), batch_size):
        res = _forward_scores(model, [exs[i] for i in chunk], [stats[i] for i in chunk], tokenizer.pad_token_id)
        for i, d in zip(chunk, res):
            if stats[i]:
                d["mia_loss"] = d["nll"]
                d["mia_zlib"] = scores.zlib_score(d["nll"], answers[i])
            out[i] = d
    return out  # type: ignore[return-value]


def answer_nll(model, tokenizer, questions: Sequence[str], answers: Sequence[str],
               fmt: PromptFormat = EVAL_FORMAT, batch_size: int = 8) -> list[float]:
    """Token-mean NLL of each answer given its question (answer tokens only), in input order."""
    return [d["nll"] for d in answer_scores(model, tokenizer, questions, answers, fmt, batch_size, with_stats=False)]


@dataclass
class Generation:
    text: str
    n_tokens: int  # new tokens before the stop token
    hit_limit: bool  # no stop token within max_new_tokens: the answer was cut


def _stop_ids(model, tokenizer) -> list[int]:
    ids = set()
    for src in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return sorted(ids)


@torch.inference_mode()
def generate_greedy(
    model,
    tokenizer,
    questions: Sequence[str],
    fmt: PromptFormat = EVAL_FORMAT,
    max_new_tokens: int = 200,
    batch_size: int = 8,
) -> list[Generation]:
    """Greedy answers to the questions (prompt alone, left-padded batches sorted by length, cut at EOS)."""
    from transformers import GenerationConfig

    model.eval()
    stops = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                           eos_token_id=stops or None, bos_token_id=tokenizer.bos_token_id)
    prompts = [prompt_ids(tokenizer, q, fmt) for q in questions]
    out: list[Generation | None] = [None] * len(prompts)
    dev = _device(model)
    for chunk in _sorted_chunks(len(prompts), lambda i: len(prompts[i]), batch_size):
        batch = collate_prompts([prompts[i] for i in chunk], pad)
        seqs = model.generate(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                              generation_config=cfg)
        new = seqs[:, batch["input_ids"].shape[1]:].tolist()  # [B, <= max_new_tokens]
        for i, row in zip(chunk, new):
            cut = next((k for k, t in enumerate(row) if t in stops), None)
            ids = row if cut is None else row[:cut]
            out[i] = Generation(tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids), cut is None)
    return out  # type: ignore[return-value]


_SCORER = None


def rouge_recall(ground_truth: str, generation: str) -> dict[str, float]:
    """rouge_score's ROUGE-1 / ROUGE-L (use_stemmer=True), target = ground truth, prediction = generation."""
    global _SCORER
    if _SCORER is None:
        logging.getLogger("absl").setLevel(logging.WARNING)
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    s = _SCORER.score(target=ground_truth, prediction=generation)
    return {"rouge1_recall": s["rouge1"].recall, "rougeL_recall": s["rougeL"].recall, "rougeL_f1": s["rougeL"].fmeasure}


# ----------------------------------------------------------------------------- records

def _compute_items(model, tokenizer, spec: SplitSpec, items: list[EvalItem], fmt: PromptFormat,
                   gen: GenSettings, batch_size: int) -> list[Record]:
    """Records for a few items of one split (one process's share of a batch)."""
    recs: list[Record] = []
    for it in items:
        r: Record = {"split": spec.name, "source": spec.source, "index": it.index,
                     "question": it.question, "answer": it.answer, **it.extra}
        recs.append(r)
    if not items:
        return recs
    if spec.nll:
        # one flat list of (question, text) jobs: the answer (with stats), paraphrase, perturbed answers
        jobs: list[tuple[int, str, int, str]] = []  # (item position, kind, j, text)
        for n, it in enumerate(items):
            jobs.append((n, "answer", 0, it.answer))
            if it.para_answer is not None:
                jobs.append((n, "para", 0, it.para_answer))
            for j, p in enumerate(it.pert_answers or []):
                jobs.append((n, "pert", j, p))
        res = answer_scores(model, tokenizer, [items[n].question for n, *_ in jobs], [t for *_, t in jobs],
                            fmt, batch_size, with_stats=[k == "answer" for _, k, _, _ in jobs])
        for (n, kind, j, _), d in zip(jobs, res):
            r, it = recs[n], items[n]
            if kind == "answer":
                r.update(d)
            elif kind == "para":
                r["para_nll"] = d["nll"]
            else:
                r.setdefault("pert_nll", [None] * len(it.pert_answers or []))[j] = d["nll"]
    if spec.generate:
        gens = generate_greedy(model, tokenizer, [it.question for it in items], fmt, gen.max_new_tokens, batch_size)
        for r, it, g in zip(recs, items, gens):
            r.update(generation=g.text, gen_tokens=g.n_tokens, gen_hit_limit=g.hit_limit,
                     max_new_tokens=gen.max_new_tokens, **rouge_recall(it.answer, g.text))
    return recs


def split_key(model_fingerprint: str, spec: SplitSpec, gen: GenSettings, fmt: PromptFormat, tokenizer) -> str:
    """Cache key of one split's records: weights, split, what is computed, decoding and prompt format."""
    probe = "Which question is this?"
    payload = {
        "schema": SCHEMA_VERSION, "model": model_fingerprint, "split": spec.name, "source": spec.source,
        "nll": spec.nll, "generate": spec.generate,
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


class _Appender:
    """Appends records as JSON lines and flushes; starts on a fresh line after a cut-off write."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = False
        if path.exists() and path.stat().st_size > 0:
            with path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                fresh = f.read(1) != b"\n"
        self.f = path.open("a", encoding="utf-8")
        if fresh:
            self.f.write("\n")

    def write(self, recs: Iterable[Record]) -> None:
        for r in recs:
            self.f.write(json.dumps(r, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _dist() -> tuple[int, int]:
    """(process index, number of processes); accelerate's state when launched with several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        st = PartialState()
        return st.process_index, st.num_processes
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def _gather(objs: list, world: int) -> list:
    if world == 1:
        return objs
    from accelerate.utils import gather_object

    return gather_object(objs)


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
    rank, world = _dist()
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

    _barrier(world)  # every process has read the same finished records before the main one appends
    out_app = _Appender(out_file) if (out_file is not None and main) else None
    try:
        for spec in specs:
            key = keys[spec.name]
            cache_app = None
            if use_cache and main:
                cdir = cache_root / key
                cdir.mkdir(parents=True, exist_ok=True)
                meta = cdir / "meta.json"
                if not meta.exists():
                    meta.write_text(json.dumps({"key": key, "model_fingerprint": fp, "split": spec.name,
                                                "source": spec.source, "gen": asdict(gen), "fmt": asdict(fmt),
                                                "schema": SCHEMA_VERSION}, indent=2))
                cache_app = _Appender(cdir / "records.jsonl")
            have = {}
            for it in spec.items:
                r = done.get((key, spec.name, it.index))
                if r is not None and _matches(r, it):
                    have[it.index] = r
            pending = [it for it in spec.items if it.index not in have]
            # records reused from the cache but missing from records_path are copied there
            if out_app is not None:
                out_app.write(r for i, r in have.items() if (key, spec.name, i) not in in_out)
            if pending:
                # sorted by length so each batch holds similar lengths (less padding; results do not change)
                order = sorted(pending, key=lambda it: (len(it.question) + len(it.answer), it.index))
                step = batch_size * world
                bar = tqdm(total=len(pending), desc=f"eval {spec.name}", unit="ex", disable=not (progress and main),
                           leave=False)
                for start in range(0, len(order), step):
                    glob = order[start : start + step]
                    mine = glob[rank::world]
                    recs = _compute_items(model, tokenizer, spec, mine, fmt, gen, batch_size)
                    for r in recs:
                        r["key"] = key
                    recs = _gather(recs, world)
                    for r in recs:
                        have[r["index"]] = r
                    if main:
                        if cache_app is not None:
                            cache_app.write(recs)
                        if out_app is not None:
                            out_app.write(recs)
                    bar.update(len(glob))
                bar.close()
            if cache_app is not None:
                cache_app.close()
            for it in spec.items:
                done[(key, spec.name, it.index)] = have[it.index]
    finally:
        if out_app is not None:
            out_app.close()
    return [done[(keys[s.name], s.name, it.index)] for s in specs for it in s.items]


def write_records(records: Sequence[Record], path: str | Path) -> None:
    """Write records as JSON lines atomically (temp file, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
