"""lm: the one scoring and generation interface, and the loop's hooks (merge rules, sampler, callbacks)."""

from __future__ import annotations

import pytest
import torch
from eval_fixtures import eval_cache, tiny  # noqa: F401  (fixtures)

from conftest import FAST
from pmc_unlearn import lm
from pmc_unlearn.formatting import PromptFormat, answer_ids, prompt_ids
from pmc_unlearn.trainer import merge_stats

QUESTIONS = ["Who wrote the novel about the lighthouse keeper?", "Where was the author born?"]
ANSWERS = [["It was written by Jane Doe.", "Nobody knows."], ["In a small town by the sea."]]
FMT = PromptFormat(max_length=128)


def _ids(tok):
    prompts = [prompt_ids(tok, q, FMT) for q in QUESTIONS]
    conts = [[answer_ids(tok, a, FMT) for a in ans] for ans in ANSWERS]
    return prompts, conts


def test_score_equals_a_full_forward_pass(tiny):
    prompts, conts = _ids(tiny.tokenizer)
    p, c = prompts[0], conts[0][0]
    with torch.no_grad():
        got = lm.score(tiny.model, [p], [c], tiny.tokenizer.pad_token_id)
        logits = tiny.model(input_ids=torch.tensor([p + c])).logits[0].float()
    want = torch.log_softmax(logits, -1)[len(p) - 1 : -1].gather(1, torch.tensor(c)[:, None]).squeeze(1)
    assert got.logits.shape[1] == len(c) + 1  # the window: from the last prompt position on
    lp = got.logprobs[0][got.mask[0]]
    assert lp.shape == want.shape
    assert torch.allclose(lp, want, atol=1e-5)


def test_score_shared_equals_score_per_row(tiny):
    prompts, conts = _ids(tiny.tokenizer)
    pad = tiny.tokenizer.pad_token_id
    with torch.no_grad():
        shared = lm.score_shared(tiny.model, prompts, conts, pad)
        flat_p = [p for p, cs in zip(prompts, conts) for _ in cs]
        flat_c = [c for cs in conts for c in cs]
        each = lm.score(tiny.model, flat_p, flat_c, pad)
    assert shared.logprobs.shape[0] == each.logprobs.shape[0] == 3
    for r in range(3):
        a = shared.logprobs[r][shared.mask[r]]
        b = each.logprobs[r][each.mask[r]]
        assert len(a) == len(flat_c[r]) and torch.allclose(a, b, atol=1e-4)


def test_generate_greedy_and_sampled(tiny):
    prompts, _ = _ids(tiny.tokenizer)
    greedy = lm.generate(tiny.model, tiny.tokenizer, prompts, lm.Decoding(max_new_tokens=6, n=3))
    assert [len(r) for r in greedy] == [1, 1]  # greedy: one row per prompt whatever n says
    for (c,) in greedy:
        assert c.n_tokens == len(c.ids) - (0 if c.hit_limit else 1) and c.n_tokens <= 6
    again = lm.generate(tiny.model, tiny.tokenizer, prompts[::-1], lm.Decoding(max_new_tokens=6, batch_rows=1))
    assert [c.ids for (c,) in again] == [c.ids for (c,) in greedy][::-1]  # order and batching do not matter
    sampled = lm.generate(tiny.model, tiny.tokenizer, prompts, lm.Decoding(n=2, greedy=False, max_new_tokens=5, seed=3))
    assert [len(r) for r in sampled] == [2, 2]
    assert sampled == lm.generate(tiny.model, tiny.tokenizer, prompts, lm.Decoding(n=2, greedy=False, max_new_tokens=5,
                                                                                    seed=3))


def test_merge_stats_follows_the_method_rules():
    rows = [{"a": 1.0, "n": 2.0, "lo": 0.5, "hi": 0.5, "u": 3.0}, {"a": 3.0, "n": 5.0, "lo": 0.1, "hi": 0.9, "u": 1.0}]
    rules = {"n": "sum", "lo": "min", "hi": "max", "u": "last"}
    assert merge_stats(rows, rules) == {"a": 2.0, "hi": 0.9, "lo": 0.1, "n": 7.0, "u": 1.0}
    assert list(merge_stats(rows, rules)) == ["a", "hi", "lo", "n", "u"]  # keys sorted
    assert merge_stats(rows, {})["n"] == 3.5  # no rule: the mean


def test_train_takes_a_sampler_and_callbacks(tmp_path):
    from pmc_unlearn.config import load_config
    from pmc_unlearn.models import load_tokenizer
    from pmc_unlearn.sampling import FastSampler
    from pmc_unlearn.trainer import train

    calls = []

    class Counting(FastSampler):
        def sample(self, *a, **kw):
            calls.append(len(a[1]))
            return super().sample(*a, **kw)

    cfg = load_config(None, ["model.name=tiny-random", "data.forget=tofu:forget01", "data.retain=tofu:retain99",
                             *FAST, "train.epochs=1", "train.save_every=-1"], method="pmc")
    rows: list[dict] = []
    man = train(cfg, tmp_path / "run", sampler=Counting(load_tokenizer("tiny-random")), callbacks=[rows.append])
    assert calls and calls[0] == 6  # the references: every forget question, through the sampler handed in
    assert [r["step"] for r in rows] == list(range(1, man["steps"] + 1))
    assert all(r["perf/samples_per_s"] >= 0 and "sample/score_mean" in r for r in rows)
    assert "sample/samples_sum" not in rows[0] and "sample/samples" not in rows[0]


@pytest.mark.parametrize("limit", [0.0, 12.5])
def test_time_limit_comes_from_the_method(limit):
    from types import SimpleNamespace

    from pmc_unlearn.methods.baselines import RetainFT, RetainFTConfig

    ctx = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(max_time_s=limit)))
    m = RetainFT(RetainFTConfig())
    m.setup(ctx)
    assert m.time_limit(ctx) == limit and ctx.cfg.train.max_time_s == limit  # read, never rewritten


def test_the_loop_knows_no_method():
    """The training loop merges, shows and times what methods declare; it names no PMC stat or sampler."""
    import inspect

    from pmc_unlearn import trainer

    src = inspect.getsource(trainer)
    for name in ("sample/", "SAMPLERS", "sample_batch_rows", "methods.pmc"):
        assert name not in src, name
