"""The model part of evaluation: per-example scores and greedy generations, through `lm`.

For every item, in batches (results do not depend on the batch size):
- teacher-forced answer-token NLL (token mean, answer tokens only; right padding + explicit
  masks) of the answer, the paraphrased answer and each perturbed answer, each question's prompt
  run once for all its answers (`lm.score_shared`) where the model allows;
- from the same forward pass of the answer, per answer token (the closing EOS included, last):
  its log-probability `tok_lp`, whether the argmax prediction hits it `tok_hit`, and its Min-K%++
  z value `tok_z` (the full distribution's mean and variance of log p come from those logits, no
  second forward); plus the zlib-compressed sizes of the answer text and of the decoded answer
  tokens. Exact memorisation, extraction strength and the MIA scores LOSS, ZLib, Min-K% and
  Min-K%++ are derived from these under a convention (`metrics.with_scores`), so the cached
  records serve both conventions;
- the greedy generation for the prompt alone (`lm.generate`: left-padded batches, cut at EOS,
  the new-token limit recorded) and its ROUGE-1 / ROUGE-L recall against the answer
  (`rewards.rouge_recall`).

`compute_items` turns a batch of (split, item) pairs into records; `evaluation.records` calls
it. Reusable helpers: `answer_nll`, `answer_scores`, `question_scores`, `generate_greedy`,
`text_scores`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pmc_unlearn import lm
from pmc_unlearn.cpu import adapt_threads
from pmc_unlearn.evaluation import scores
from pmc_unlearn.evaluation.suite import EVAL_FORMAT, EvalItem, GenSettings, Record, SplitSpec
from pmc_unlearn.formatting import Example, PromptFormat, answer_ids, encode_pair, fit_length, prompt_ids
from pmc_unlearn.rewards import rouge_recall
from pmc_unlearn.sampling import Completion

__all__ = ["answer_nll", "answer_scores", "compute_items", "first_line", "generate_greedy", "generate_greedy_ids",
           "question_scores", "rouge_recall", "text_prompt_ids", "text_scores", "token_stats"]


def _sorted_chunks(n: int, length: Callable[[int], int], batch_size: int) -> list[list[int]]:
    """Indices 0..n-1 sorted by length (ties by index), cut into batches: less padding, same results."""
    order = sorted(range(n), key=lambda i: (length(i), i))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]



@torch.inference_mode()
def _forward_scores(model, examples: list[Example], with_stats: list[bool], pad_id: int) -> list[dict]:
    """One right-padded forward pass (`lm.score`); per example the answer NLL and, where asked, the per-token lists."""
    adapt_threads()
    scored = lm.score(model, [e.prompt for e in examples], [e.answer for e in examples], pad_id)
    return token_stats(scored, examples, with_stats)


@torch.inference_mode()
def _shared_prompt_scores(model, prompts: list[list[int]], groups: list[list[Example]], with_stats: list[list[bool]],
                          pad_id: int) -> list[list[dict]]:
    """`token_stats` of several answers per prompt, each prompt's tokens run once (`lm.score_shared`).

    For TOFU's 7 answers per question (answer, paraphrase, 5 perturbed) about 45% of the tokens
    are prompt tokens, which run once instead of 7 times (same numbers within float rounding;
    tests/test_eval_collect.py).
    """
    adapt_threads()
    scored = lm.score_shared(model, prompts, [[e.answer for e in g] for g in groups], pad_id)
    flat = token_stats(scored, [e for g in groups for e in g], [w for ws in with_stats for w in ws])
    out, k = [], 0
    for g in groups:
        out.append(flat[k : k + len(g)])
        k += len(g)
    return out


def token_stats(scored: lm.Scored, examples: list[Example], with_stats: list[bool]) -> list[dict]:
    """Per row: answer NLL, token count and (with_stats) the per-token lists tok_lp, tok_hit, tok_z.

    The lists run over every answer token in order, the last one being the closing EOS unless
    the answer was cut (`truncated`).
    """
    lp, mask, logits, labels = scored.logprobs, scored.mask, scored.logits, scored.labels  # lp, mask: [B, L-1]
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
    answers (`lm.score_shared`); about `batch_size` answer rows go into one forward pass.
    Falls back to `answer_scores` for models without the cache interface.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answer lists")
    flat_q = [q for q, ans in zip(questions, answers) for _ in ans]
    flat_a = [a for ans in answers for a in ans]
    flat_s = [stats_first and j == 0 for ans in answers for j in range(len(ans))]
    if not lm.supports_shared_prompt(model):
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



def generate_greedy(
    model,
    tokenizer,
    questions: Sequence[str],
    fmt: PromptFormat = EVAL_FORMAT,
    max_new_tokens: int = 200,
    batch_size: int = 8,
) -> list[Completion]:
    """Greedy answers to the questions (the prompt alone, cut at EOS); see `generate_greedy_ids`."""
    return generate_greedy_ids(model, tokenizer, [prompt_ids(tokenizer, q, fmt) for q in questions],
                               max_new_tokens, batch_size)


@torch.inference_mode()
def generate_greedy_ids(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int = 200,
                        batch_size: int = 8) -> list[Completion]:
    """Greedy continuations of token-id prompts, in input order (`lm.generate`).

    Runs on the library's own decode loop (the fast backend, greedy): each prompt prefilled
    once, finished rows dropped, a preallocated cache; in fp32 its tokens equal
    `generate(do_sample=False)`'s (tests/test_sampler.py). Prompts are sorted by length and cut
    into batches of `batch_size` rows; the stop tokens are the tokenizer's and the model's EOS.
    """
    model.eval()
    done = lm.generate(model, tokenizer, list(prompts), lm.Decoding(max_new_tokens=max_new_tokens, batch_rows=batch_size))
    return [c for (c,) in done]



def compute_items(model, tokenizer, work: list[tuple[SplitSpec, EvalItem]], fmt: PromptFormat,
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
        scored = lm.score(model, [exs[i].prompt for i in chunk], [exs[i].answer for i in chunk], tokenizer.pad_token_id)
        lp, mask = scored.logprobs, scored.mask
        for b, i in enumerate(chunk):
            tok_lp = lp[b][mask[b].bool()]
            nll = float(-tok_lp.double().mean()) if tok_lp.numel() else float("nan")
            out[i] = {"nll": nll, "n_tokens": int(tok_lp.numel()), "truncated": bool(exs[i].truncated),
                      "mia_min_k": scores.min_k_score(tok_lp), "mia_loss": nll,
                      "mia_zlib": scores.zlib_score(nll, texts[i])}
    return out  # type: ignore[return-value]

