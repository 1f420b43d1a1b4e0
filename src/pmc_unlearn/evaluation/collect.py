"""Stage 1 of evaluation: run the model once per example and write per-example records.

The only part of evaluation that touches the model. For every split of the suite it computes,
per example and in batches:
- teacher-forced answer-token NLL (token mean, answer tokens only; right padding + explicit
  masks, so the numbers do not depend on the batch size) of the answer, the paraphrased answer
  and each perturbed answer;
- from the same forward pass of the answer, per answer token (the closing EOS included, last):
  its log-probability `tok_lp`, whether the argmax prediction hits it `tok_hit`, and its Min-K%++
  z value `tok_z` (the full distribution's mean and variance of log p come from those logits, no
  second forward); plus the zlib-compressed sizes of the answer text and of the decoded answer
  tokens. Exact memorisation, extraction strength and the MIA scores LOSS, ZLib, Min-K% and
  Min-K%++ are derived from these under a convention (`metrics.with_scores`), so the cached
  records serve both conventions;
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

from pmc_unlearn.cpu import adapt_threads
from pmc_unlearn.data import TOFU_SPLITS, load_qa, load_rows, read_jsonl_dicts
from pmc_unlearn.errors import UserError
from pmc_unlearn.evaluation import metrics as M
from pmc_unlearn.evaluation import scores
from pmc_unlearn.formatting import IGNORE, Example, PromptFormat, answer_ids, collate_prompts, collate_train, encode_pair, fit_length, prompt_ids, prompt_text
from pmc_unlearn.losses import token_logprobs
from pmc_unlearn.models import takes_logits_to_keep

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # bump when the record fields or their computation change (invalidates caches)
# 2: per-token lists (tok_lp, tok_hit, tok_z) and zlib sizes instead of em/es/mia_* (derived per convention)
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
    # "qa": the question goes through the prompt format. "text" (MUSE-News): the question is raw
    # text continued as is (no template), and the NLL part scores the answer as a plain document
    # (its NLL and Min-K%, no question).
    mode: str = "qa"
    max_new_tokens: int | None = None  # this split's generation limit (None: the run's GenSettings)
    first_line: bool = False  # cut the generation at its first line break (KnowMem's one-line answers)


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
    adapt_threads()
    batch = collate_train(examples, pad_id)
    dev = _device(model)
    T = batch["input_ids"].shape[1]
    # Logits only from the last prompt position of the shortest prompt on (right padding: every
    # answer target lies after it): the vocabulary projection and log-softmax skip most prompt
    # positions. `keep` positions [T-keep, T) come back; labels are cut to the same window.
    keep = T - min(len(e.prompt) for e in examples) + 1
    # (an index tensor, not the int form: slicing a strided view makes matmul copy the LM head)
    kw = {"logits_to_keep": torch.arange(T - keep, T, device=dev)} if takes_logits_to_keep(model) else {}
    logits = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev), **kw).logits
    labels = batch["labels"][:, T - logits.shape[1]:].to(dev)  # [B, keep] (or [B, T] without logits_to_keep)
    return _scores_from_logits(logits, labels, examples, with_stats)


def _scores_from_logits(logits: torch.Tensor, labels: torch.Tensor, examples: list[Example],
                        with_stats: list[bool]) -> list[dict]:
    """Per row: answer NLL, token count and (with_stats) the per-token lists tok_lp, tok_hit, tok_z.

    logits[:, t] predicts labels[:, t+1]. The lists run over every answer token in order, the
    last one being the closing EOS unless the answer was cut (`truncated`).
    """
    lp, mask = token_logprobs(logits, labels)  # [B, L-1] each
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
            hits = (lg.argmax(-1) == tgt).int().tolist()
            d.update(
                tok_lp=tok_lp.double().tolist(),
                tok_hit=hits,
                tok_z=scores.z_scores(tok_lp, mu, var),
            )
        out.append(d)
    return out


@torch.inference_mode()
def _shared_prompt_scores(model, prompt: list[list[int]], groups: list[list[Example]], with_stats: list[list[bool]],
                          pad_id: int) -> list[list[dict]]:
    """Scores of several answers per prompt, each prompt's tokens run once.

    The prompts (left-padded) are prefilled with a KV cache, whose rows are repeated for each of
    their answers; the answers (right-padded, positions continuing their prompt's) then run on
    the cache. The first answer token is predicted by the prompt's last position, the others by
    the answer positions, exactly as in one forward pass of prompt + answer (same numbers within
    float rounding; tests/test_eval_collect.py). For TOFU's 7 answers per question (answer,
    paraphrase, 5 perturbed) about 45% of the tokens are prompt tokens, which run once instead
    of 7 times.
    """
    from transformers import DynamicCache

    adapt_threads()
    dev = _device(model)
    q = collate_prompts(prompt, pad_id)  # left-padded: every prompt ends at position P-1
    q_ids, q_mask = q["input_ids"].to(dev), q["attention_mask"].to(dev)
    P = q_ids.shape[1]
    q_pos = (q_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    last = model(input_ids=q_ids, attention_mask=q_mask, position_ids=q_pos, past_key_values=cache, use_cache=True,
                 logits_to_keep=torch.tensor([P - 1], device=dev)).logits  # [Q, 1, V]
    owner = [q for q, g in enumerate(groups) for _ in g]
    exs = [e for g in groups for e in g]
    idx = torch.tensor(owner, device=dev)
    cache.batch_select_indices(idx)  # [N rows] of the prompts' keys and values
    A = max(len(e.answer) for e in exs)
    a_ids = torch.full((len(exs), A), pad_id, dtype=torch.long)
    a_mask = torch.zeros((len(exs), A), dtype=torch.long)
    labels = torch.full((len(exs), A + 1), IGNORE, dtype=torch.long)  # column 0: the last prompt position
    for r, e in enumerate(exs):
        a_ids[r, : len(e.answer)] = torch.tensor(e.answer)
        a_mask[r, : len(e.answer)] = 1
        labels[r, 1 : len(e.answer) + 1] = torch.tensor(e.answer)
    a_ids, a_mask = a_ids.to(dev), a_mask.to(dev)
    plen = torch.tensor([len(prompt[q]) for q in owner], device=dev)
    a_pos = plen[:, None] + torch.arange(A, device=dev)[None, :]
    logits = model(input_ids=a_ids, attention_mask=torch.cat([q_mask[idx], a_mask], 1), position_ids=a_pos,
                   past_key_values=cache, use_cache=True).logits  # [N, A, V]
    logits = torch.cat([last[idx], logits], 1)  # [N, A+1, V]
    flat = _scores_from_logits(logits, labels.to(dev), exs, [w for ws in with_stats for w in ws])
    out, k = [], 0
    for g in groups:
        out.append(flat[k : k + len(g)])
        k += len(g)
    return out


def _supports_shared_prompt(model) -> bool:
    """Prefix sharing needs a KV cache the forward accepts with explicit positions (decoder-only HF models)."""
    return takes_logits_to_keep(model) and getattr(getattr(model, "config", None), "is_encoder_decoder", False) is False


def question_scores(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[Sequence[str]],
    fmt: PromptFormat = EVAL_FORMAT,
    batch_size: int = 8,
    stats_first: bool = True,
    convention: str | None = scores.DEFAULT_CONVENTION,
) -> list[list[dict]]:
    """`answer_scores` for several answers per question (e.g. answer, paraphrase, perturbed ones).

    Returns, per question, one dict per answer (as `answer_scores`; the first answer with the
    EM/ES/MIA statistics when `stats_first`). Each question's prompt runs once for all its
    answers (`_shared_prompt_scores`); about `batch_size` answer rows go into one forward pass.
    Falls back to `answer_scores` for models without the cache interface.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answer lists")
    flat_q = [q for q, ans in zip(questions, answers) for _ in ans]
    flat_a = [a for ans in answers for a in ans]
    flat_s = [stats_first and j == 0 for ans in answers for j in range(len(ans))]
    if not _supports_shared_prompt(model):
        res = answer_scores(model, tokenizer, flat_q, flat_a, fmt, batch_size, flat_s, convention=convention)
        out, k = [], 0
        for ans in answers:
            out.append(res[k : k + len(ans)])
            k += len(ans)
        return out
    model.eval()
    prompts = [prompt_ids(tokenizer, q, fmt) for q in questions]
    groups = [[fit_length(p, answer_ids(tokenizer, a, fmt), fmt.max_length) for a in ans] for p, ans in zip(prompts, answers)]
    stats = [[stats_first and j == 0 for j in range(len(ans))] for ans in answers]
    out: list[list[dict] | None] = [None] * len(questions)
    # questions sorted by their longest sequence, cut so a pass holds about batch_size answer rows
    order = sorted(range(len(questions)), key=lambda i: (len(prompts[i]) + max((len(e.answer) for e in groups[i]), default=0), i))
    chunk: list[int] = []
    rows = 0

    def flush() -> None:
        nonlocal chunk, rows
        if chunk:
            res = _shared_prompt_scores(model, [prompts[i] for i in chunk], [groups[i] for i in chunk],
                                        [stats[i] for i in chunk], tokenizer.pad_token_id)
            for i, r in zip(chunk, res):
                out[i] = r
        chunk, rows = [], 0

    for i in order:
        if not groups[i]:
            out[i] = []
            continue
        if chunk and rows + len(groups[i]) > max(batch_size, len(groups[i])):
            flush()
        chunk.append(i)
        rows += len(groups[i])
    flush()
    for i, ans in enumerate(answers):
        for d, a, st, ex in zip(out[i], ans, stats[i], groups[i]):  # type: ignore[arg-type]
            if st:
                _add_example_scores(d, a, ex.answer, tokenizer, convention)
    return out  # type: ignore[return-value]


def _add_example_scores(d: dict, answer: str, answer_ids: list[int], tokenizer, convention: str | None) -> None:
    """The zlib sizes (answer text; decoded answer tokens, special tokens skipped) and, for a convention, EM/ES/MIA."""
    d["zlib_bytes_answer"] = scores.zlib_bytes(answer)
    d["zlib_bytes_labels"] = scores.zlib_bytes(tokenizer.decode(answer_ids, skip_special_tokens=True))
    if convention is not None:
        d.update(scores.example_scores(d["tok_lp"], d["tok_hit"], d["tok_z"], d["nll"], d["zlib_bytes_answer"],
                                       d["zlib_bytes_labels"], convention))


def answer_scores(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    fmt: PromptFormat = EVAL_FORMAT,
    batch_size: int = 8,
    with_stats: bool | Sequence[bool] = True,
    convention: str | None = scores.DEFAULT_CONVENTION,
) -> list[dict]:
    """Per (question, answer): nll, n_tokens, truncated and (with_stats) the per-token lists, zlib sizes
    and, unless `convention` is None, em, es, mia_loss/zlib/min_k/min_k_plus_plus under that convention.

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
                _add_example_scores(d, answers[i], exs[i].answer, tokenizer, convention)
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


def generate_greedy(
    model,
    tokenizer,
    questions: Sequence[str],
    fmt: PromptFormat = EVAL_FORMAT,
    max_new_tokens: int = 200,
    batch_size: int = 8,
) -> list[Generation]:
    """Greedy answers to the questions (the prompt alone, cut at EOS); see `generate_greedy_ids`."""
    return generate_greedy_ids(model, tokenizer, [prompt_ids(tokenizer, q, fmt) for q in questions],
                               max_new_tokens, batch_size)


@torch.inference_mode()
def generate_greedy_ids(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int = 200,
                        batch_size: int = 8) -> list[Generation]:
    """Greedy continuations of token-id prompts, in input order.

    Runs on the library's own decode loop (`sampling.FastSampler`, greedy): each prompt prefilled
    once, finished rows dropped, a preallocated cache; in fp32 its tokens equal
    `generate(do_sample=False)`'s (tests/test_sampler.py). Prompts are sorted by length and cut
    into batches of `batch_size` rows; the stop tokens are the tokenizer's and the model's EOS.
    """
    from pmc_unlearn.sampling import FastSampler

    model.eval()
    done = FastSampler(tokenizer, batch_rows=batch_size).sample(
        model, [list(p) for p in prompts], 1, max_new_tokens=max_new_tokens, greedy=True)
    return [c for (c,) in done]


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

def _compute_items(model, tokenizer, work: list[tuple[SplitSpec, EvalItem]], fmt: PromptFormat,
                   gen: GenSettings, batch_size: int) -> list[Record]:
    """Records for a batch of (split, item) pairs, possibly from several splits (one process's share).

    The teacher-forced part runs on every item whose split asks for it in one `question_scores`
    call, the greedy part on every item whose split generates in one decoding call: a batch of
    short splits (the demo's 10-20 questions each) fills the decoder's rows once instead of once
    per split.
    """
    recs: list[Record] = [{"split": sp.name, "source": sp.source, "index": it.index, "question": it.question,
                           "answer": it.answer, **it.extra} for sp, it in work]
    text_at = [k for k, (sp, _) in enumerate(work) if sp.nll and sp.mode == "text"]
    if text_at:
        res = text_scores(model, tokenizer, [work[k][1].answer for k in text_at], fmt.max_length, batch_size)
        for k, d in zip(text_at, res):
            recs[k].update(d)
    nll_at = [k for k, (sp, _) in enumerate(work) if sp.nll and sp.mode != "text"]
    if nll_at:
        # per item: the answer (with stats), the paraphrase, the perturbed answers; one prompt pass each
        items = [work[k][1] for k in nll_at]
        texts = [[it.answer] + ([it.para_answer] if it.para_answer is not None else []) + list(it.pert_answers or [])
                 for it in items]
        res = question_scores(model, tokenizer, [it.question for it in items], texts, fmt, batch_size, convention=None)
        for k, it, ds in zip(nll_at, items, res):
            r = recs[k]
            r.update(ds[0])
            n = 1
            if it.para_answer is not None:
                r["para_nll"] = ds[1]["nll"]
                n = 2
            if it.pert_answers:
                r["pert_nll"] = [d["nll"] for d in ds[n:]]
    groups: dict[tuple[str, int], list[int]] = {}  # (mode, new-token limit) -> positions in work
    for k, (sp, _) in enumerate(work):
        if sp.generate:
            groups.setdefault((sp.mode, sp.max_new_tokens or gen.max_new_tokens), []).append(k)
    for (mode, limit), gen_at in groups.items():
        if mode == "text":
            gens = generate_greedy_ids(model, tokenizer, [text_prompt_ids(tokenizer, work[k][1].question) for k in gen_at],
                                       limit, batch_size)
        else:
            gens = generate_greedy(model, tokenizer, [work[k][1].question for k in gen_at], fmt, limit, batch_size)
        for k, g in zip(gen_at, gens):
            text = first_line(g.text) if work[k][0].first_line else g.text
            recs[k].update(generation=text, gen_tokens=g.n_tokens, gen_hit_limit=g.hit_limit,
                           max_new_tokens=limit, **rouge_recall(work[k][1].answer, text))
    return recs


def first_line(text: str) -> str:
    """The text up to its first line break, leading whitespace and line breaks skipped."""
    return text.lstrip().split("\n", 1)[0].strip()


def text_prompt_ids(tokenizer, text: str) -> list[int]:
    """Raw text as a prompt to continue: the start token(s) (BOS where the tokenizer adds one) + its tokens."""
    from pmc_unlearn.formatting import text_start_ids

    return text_start_ids(tokenizer) + tokenizer(text, add_special_tokens=False).input_ids


TEXT_TOKENS_PER_PASS = 2048  # rows x tokens per forward pass of `text_scores` (bounds the [B, T, V] logits: 400 MB for SmolLM2)


@torch.inference_mode()
def text_scores(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 8) -> list[dict]:
    """Per document (cut to `max_length` tokens): nll (token mean), n_tokens, truncated, mia_min_k, mia_loss, mia_zlib.

    Every token after the first is scored (formatting.encode_text); no EOS is added, so Min-K%
    averages over all scored tokens. Batches are sorted by length and sized so rows x tokens stays
    under TEXT_TOKENS_PER_PASS; results do not depend on the batching.
    """
    from pmc_unlearn.formatting import encode_text

    model.eval()
    exs = [encode_text(tokenizer, tokenizer(t, add_special_tokens=False).input_ids, max_length) for t in texts]
    out: list[dict | None] = [None] * len(exs)
    order = sorted(range(len(exs)), key=lambda i: (len(exs[i].prompt) + len(exs[i].answer), i))
    dev = _device(model)
    a = 0
    while a < len(order):
        T = len(exs[order[a]].prompt) + len(exs[order[a]].answer)
        rows = max(1, min(batch_size, TEXT_TOKENS_PER_PASS // max(1, T)))
        chunk = order[a : a + rows]
        T = max(len(exs[i].prompt) + len(exs[i].answer) for i in chunk)
        while len(chunk) > 1 and len(chunk) * T > TEXT_TOKENS_PER_PASS:
            chunk = chunk[:-1]
            T = max(len(exs[i].prompt) + len(exs[i].answer) for i in chunk)
        a += len(chunk)
        adapt_threads()
        batch = collate_train([exs[i] for i in chunk], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
        lp, mask = token_logprobs(logits, batch["labels"].to(dev))
        for b, i in enumerate(chunk):
            tok_lp = lp[b][mask[b].bool()]
            nll = float(-tok_lp.double().mean()) if tok_lp.numel() else float("nan")
            out[i] = {"nll": nll, "n_tokens": int(tok_lp.numel()), "truncated": bool(exs[i].truncated),
                      "mia_min_k": scores.min_k_score(tok_lp), "mia_loss": nll,
                      "mia_zlib": scores.zlib_score(nll, texts[i])}
    return out  # type: ignore[return-value]


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


class _Appender:
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

        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode("utf-8")
        if not data:
            return
        try:
            append_atomic(self.path, data)
        except OSError as e:
            raise write_failed(e, self.path, f"{self.path} keeps the records written before (a rerun resumes)") from None

    def close(self) -> None:
        pass


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
    cache_apps: dict[str, _Appender] = {}
    try:
        pending: list[tuple[SplitSpec, EvalItem]] = []
        for spec in specs:
            key = keys[spec.name]
            if use_cache and main:
                cdir = cache_root / key
                cdir.mkdir(parents=True, exist_ok=True)
                meta = cdir / "meta.json"
                if not meta.exists():  # (temporary file per process, then rename: never half-written)
                    tmp = cdir / f"meta.json.{os.getpid()}.tmp"
                    tmp.write_text(json.dumps({"key": key, "model_fingerprint": fp, "split": spec.name,
                                               "source": spec.source, "gen": asdict(gen), "fmt": asdict(fmt),
                                               "schema": SCHEMA_VERSION}, indent=2))
                    os.replace(tmp, meta)
                cache_apps[spec.name] = _Appender(cdir / "records.jsonl")
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
                recs = _compute_items(model, tokenizer, glob[rank::world], fmt, gen, batch_size)
                for r in recs:
                    r["key"] = keys[r["split"]]
                recs = _gather(recs, world)
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
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_failed(e, path, f"{path} is as it was") from None
