"""Prompts, answer-only labels, padding sides."""

from pmc_unlearn.formatting import (
    IGNORE, PromptFormat, answer_ids, collate_prompts, collate_train, encode_pair, fit_length, prompt_ids, prompt_text,
)


def test_chat_template_and_answer_only_labels(tokenizer):
    fmt = PromptFormat()
    text = prompt_text(tokenizer, "Who wrote Hamlet?", fmt)
    assert "<|im_start|>user\nWho wrote Hamlet?<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    a = encode_pair(tokenizer, "Q1?", "Shakespeare.", fmt)
    b = encode_pair(tokenizer, "A much longer question about things?", "Yes.", fmt)
    assert a.answer[-1] == tokenizer.eos_token_id
    batch = collate_train([a, b], tokenizer.pad_token_id)
    for i, e in enumerate([a, b]):
        n = len(e.prompt) + len(e.answer)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        lab = batch["labels"][i].tolist()
        assert lab[: len(e.prompt)] == [IGNORE] * len(e.prompt)
        assert lab[len(e.prompt) : n] == e.answer
        assert all(x == IGNORE for x in lab[n:])  # padding never counts, though pad == eos here


def test_plain_template_without_chat(tokenizer):
    fmt = PromptFormat(use_chat_template=False)
    assert prompt_text(tokenizer, "Q?", fmt) == "Question: Q?\nAnswer:"
    ids = answer_ids(tokenizer, "yes", fmt)
    assert tokenizer.decode(ids[:-1]) == " yes"


def test_left_padding_for_generation():
    b = collate_prompts([[5, 6, 7], [8]], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_fit_length_cuts_answer_and_flags():
    e = fit_length([1] * 8, [2] * 5, max_length=10)
    assert e.answer == [2, 2] and e.truncated
    e = fit_length([1] * 12, [2] * 5, max_length=10)
    assert e.answer == [2] and e.truncated  # always keeps one answer token
    assert not fit_length([1], [2], 10).truncated


def test_prompt_ids_match_text(tokenizer):
    fmt = PromptFormat()
    ids = prompt_ids(tokenizer, "Hello?", fmt)
    assert tokenizer.decode(ids) == prompt_text(tokenizer, "Hello?", fmt)
