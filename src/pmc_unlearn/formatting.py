"""Prompts, tokenisation and batching: the one place text becomes tensors.

- The prompt uses the tokenizer's chat template when it has one (user turn, generation prompt
  on), else `Question: {q}\\nAnswer:` with the answer as ` {a}`.
- Answers end with the end-of-turn / EOS token, so a trained model learns to stop.
- Training batches are right-padded with an explicit attention mask; labels are -100 on prompt
  and padding positions, so the loss covers answer tokens only (padding is marked by length,
  never by comparing with pad_token_id, which equals EOS for many models).
- Generation batches are left-padded.

Text rows (plain documents, `{"text": ...}`: MUSE-News articles) have no question and no
template: `split_text_rows` cuts each document into chunks of at most `max_length` tokens and
gives each chunk a prefix of `prefix_tokens` tokens. `encode_row` turns a chunk into a plain
language-modelling example (every token after the first is a label; no chat template, no
EOS), and `row_prompt_ids` gives its prefix as the "question" that PMC continues. QA rows go
through the same two functions unchanged, so methods call them without asking which kind a
row is (docs/muse.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100
PLAIN_TEMPLATE = "Question: {q}\nAnswer:"


@dataclass(frozen=True)
class PromptFormat:
    use_chat_template: bool = True  # when the tokenizer has one
    system_prompt: str | None = None  # None: the template's own default
    max_length: int = 200  # prompt + answer tokens; longer answers are cut (and counted)


def uses_chat(tokenizer, fmt: PromptFormat) -> bool:
    return bool(fmt.use_chat_template and getattr(tokenizer, "chat_template", None))


def prompt_text(tokenizer, question: str, fmt: PromptFormat) -> str:
    if uses_chat(tokenizer, fmt):
        msgs = []
        if fmt.system_prompt is not None:
            msgs.append({"role": "system", "content": fmt.system_prompt})
        msgs.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(q=question)


def prompt_ids(tokenizer, question: str, fmt: PromptFormat) -> list[int]:
    text = prompt_text(tokenizer, question, fmt)
    chat = uses_chat(tokenizer, fmt)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not chat and tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def answer_ids(tokenizer, answer: str, fmt: PromptFormat) -> list[int]:
    text = answer if uses_chat(tokenizer, fmt) else " " + answer
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


@dataclass
class Example:
    """One tokenised (prompt, answer) pair."""

    prompt: list[int]
    answer: list[int]
    truncated: bool = False


def encode_pair(tokenizer, question: str, answer: str, fmt: PromptFormat) -> Example:
    p = prompt_ids(tokenizer, question, fmt)
    a = answer_ids(tokenizer, answer, fmt)
    return fit_length(p, a, fmt.max_length)


def fit_length(p: list[int], a: list[int], max_length: int) -> Example:
    """Cut the answer so prompt + answer <= max_length (at least one answer token is kept)."""
    room = max(1, max_length - len(p))
    return Example(p, a[:room], truncated=len(a) > room)


# ----------------------------------------------------------------------------- text rows

TEXT_PREFIX_TOKENS = 32  # default prefix ("question") length of a text chunk for PMC


def chunk_spans(n_tokens: int, size: int, min_tokens: int = 2) -> list[tuple[int, int]]:
    """[start, end) spans cutting n_tokens into consecutive pieces of at most `size` tokens.

    A last piece shorter than `min_tokens` is dropped (it holds nothing to predict after a prefix).
    """
    if size < 1:
        raise ValueError(f"chunk size {size} < 1")
    spans = [(a, min(a + size, n_tokens)) for a in range(0, n_tokens, size)]
    return [(a, b) for a, b in spans if b - a >= min_tokens]


def text_start_ids(tokenizer) -> list[int]:
    """Tokens before a document's first token: BOS where the tokenizer adds one, else none."""
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        return [tokenizer.bos_token_id]
    return []


def split_text_rows(tokenizer, rows: list[dict], max_length: int, prefix_tokens: int = TEXT_PREFIX_TOKENS,
                    prefix_only: bool = False) -> list[dict]:
    """Text rows cut into token chunks; QA rows pass through unchanged (in order).

    Each chunk row: `text` (the chunk decoded), `ids` (its tokens), `prefix_len` (tokens of its
    PMC prompt: min(prefix_tokens, len - 1)), `doc` and `chunk` (where it came from). With
    `prefix_only` (methods that must not hold the forget texts) a chunk keeps only its prefix.
    """
    from pmc_unlearn.data import is_text_row

    size = max(2, max_length - len(text_start_ids(tokenizer)))
    out = []
    for d, r in enumerate(rows):
        if not is_text_row(r):
            out.append(r)
            continue
        ids = tokenizer(r["text"], add_special_tokens=False).input_ids
        for c, (a, b) in enumerate(chunk_spans(len(ids), size)):
            piece = ids[a:b]
            k = min(prefix_tokens, len(piece) - 1)
            if prefix_only:
                piece = piece[:k]
            out.append({"text": tokenizer.decode(piece), "ids": piece, "prefix_len": k, "doc": d, "chunk": c})
    return out


def _text_ids(tokenizer, row: dict) -> list[int]:
    return list(row["ids"]) if "ids" in row else tokenizer(row["text"], add_special_tokens=False).input_ids


def encode_text(tokenizer, ids: list[int], max_length: int) -> Example:
    """A document as one language-modelling example: every token is a label except the first.

    The prompt is the start token(s) when the tokenizer has them, else the first token itself
    (nothing predicts it either way), so no example has an empty prompt.
    """
    start = text_start_ids(tokenizer)
    if not start:
        start, ids = ids[:1], ids[1:]
    return fit_length(start, ids, max_length)


def encode_row(tokenizer, row: dict, fmt: PromptFormat, answer: str | None = None) -> Example:
    """One training example from a data row: a QA pair (`encode_pair`) or a text chunk (`encode_text`).

    `answer` replaces the row's answer (a refusal, say); for a text row it then follows the
    chunk's prefix as plain text.
    """
    from pmc_unlearn.data import is_text_row

    if not is_text_row(row):
        return encode_pair(tokenizer, row["question"], row["answer"] if answer is None else answer, fmt)
    if answer is None:
        return encode_text(tokenizer, _text_ids(tokenizer, row), fmt.max_length)
    return fit_length(row_prompt_ids(tokenizer, row, fmt), tokenizer(" " + answer, add_special_tokens=False).input_ids,
                      fmt.max_length)


def row_prompt_ids(tokenizer, row: dict, fmt: PromptFormat) -> list[int]:
    """The prompt of a row: the templated question, or a text chunk's start token(s) + prefix."""
    from pmc_unlearn.data import is_text_row

    if not is_text_row(row):
        return prompt_ids(tokenizer, row["question"], fmt)
    ids = _text_ids(tokenizer, row)
    k = row.get("prefix_len", min(TEXT_PREFIX_TOKENS, max(1, len(ids) - 1)))
    return text_start_ids(tokenizer) + ids[:k]


def collate_train(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask [B, T], labels [B, T] (-100 off the answer)."""
    T = max(len(e.prompt) + len(e.answer) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        seq = e.prompt + e.answer
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(e.prompt) : len(seq)] = torch.tensor(e.answer)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch for generation: input_ids, attention_mask [B, T]."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p)
        mask[i, T - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}
