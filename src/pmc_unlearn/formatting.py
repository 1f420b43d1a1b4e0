"""Prompts, tokenisation and batching: the one place text becomes tensors.

- The prompt uses the tokenizer's chat template when it has one (user turn, generation prompt
  on), else `Question: {q}\\nAnswer:` with the answer as ` {a}`.
- Answers end with the end-of-turn / EOS token, so a trained model learns to stop.
- Training batches are right-padded with an explicit attention mask; labels are -100 on prompt
  and padding positions, so the loss covers answer tokens only (padding is marked by length,
  never by comparing with pad_token_id, which equals EOS for many models).
- Generation batches are left-padded.
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
