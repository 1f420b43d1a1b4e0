"""The static decode engine on tiny-random (CPU): greedy = generate, seeded sampling, finished rows, fallback."""

import logging

import pytest
import torch

from pmc_unlearn.formatting import PromptFormat, prompt_ids
from pmc_unlearn.sampling import FastSampler, eos_ids
from pmc_unlearn.sampling.ops import row_seed, sample_next
from pmc_unlearn.sampling.static import StaticEngine, compact_buckets, llama_like, static_sample

QUESTIONS = [
    "What is the full name of the author born in Kuwait City?",
    "Who wrote it?",
    "What genre does the author write in, and which of the books won the award in 2001?",
    "Name one book.",
    "Where did the author grow up, and how did that place shape the themes of the novels?",
    "When was the first novel published?",
]


@pytest.fixture()
def prompts(tokenizer):
    return [prompt_ids(tokenizer, q, PromptFormat()) for q in QUESTIONS]


def stop_when_argmax_divisible(model, eos: int, mod: int):
    """EOS becomes the top logit whenever the argmax id is divisible by `mod` (a pure function of the logits).

    On the LM head's output, so `generate`, the eager loop and the static step (which calls the
    head's weight directly) need the same rule: the static engine gets it through `_logits`.
    """

    def rule(out):
        top = out.argmax(-1)
        out = out.clone()
        out[..., eos] = torch.where(top % mod == 0, out.max(-1).values + 5.0, out[..., eos])
        return out

    handle = model.lm_head.register_forward_hook(lambda m, i, out: rule(out))
    return rule, handle


class RuledEngine(StaticEngine):
    """The static engine with the same logits rule as the hooked LM head."""

    def __init__(self, rule, **kw):
        super().__init__(**kw)
        self.rule = rule

    def _logits(self, *a, **kw):
        return self.rule(super()._logits(*a, **kw))


def hf_greedy(model, tok, p, max_new):
    x = torch.tensor([p], device=next(model.parameters()).device)
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
                         pad_token_id=tok.pad_token_id, eos_token_id=sorted(eos_ids(model, tok)))
    ids = out[0, len(p):].tolist()
    return ids[: ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids


def engine_ids(engine, model, tok, prompts, n, seed=11, max_new=16, greedy=False, **kw):
    """Rows of the engine's decode, grouped per prompt, with FastSampler's per-row seeds."""
    args = dict(temperature=1.25, top_k=50, top_p=0.95)
    args.update(kw)
    seeds, seen = [], {}
    for p in prompts:
        k = seen.get(tuple(p), 0)
        seen[tuple(p)] = k + 1
        seeds += [row_seed(seed, p, k, j) for j in range(n)]
    rows = engine.decode(model, prompts, n, seeds, eos_ids(model, tok), tok.pad_token_id, max_new,
                         args["temperature"], args["top_k"], args["top_p"], greedy)
    return [rows[i * n:(i + 1) * n] for i in range(len(prompts))]


def test_tiny_random_is_llama_like(tiny):
    assert llama_like(tiny.model) is None


def test_greedy_equals_generate_with_finished_rows_and_compaction(tiny, prompts):
    model, tok = tiny.model.eval(), tiny.tokenizer
    rule, handle = stop_when_argmax_divisible(model, tok.eos_token_id, 32)
    try:
        eng = RuledEngine(rule, compile="eager", span_bucket=4)
        got = engine_ids(eng, model, tok, prompts, 1, max_new=24, greedy=True)
        refs = [hf_greedy(model, tok, p, 24) for p in prompts]
    finally:
        handle.remove()
    assert [g[0] for g in got] == refs
    assert any(len(r) < 24 for r in refs) and any(len(r) == 24 for r in refs)  # both kinds
    assert eng.stats["compactions"] >= 1  # finished questions were dropped from the static shapes


def test_fast_sampler_static_engine_greedy_equals_generate(tiny, prompts):
    """Through the sampler's option: engine="static" gives generate's greedy tokens, several chunks."""
    model, tok = tiny.model.eval(), tiny.tokenizer
    res = FastSampler(tok, batch_rows=2, engine="static").sample(model, prompts, 3, max_new_tokens=12, greedy=True)
    for p, r in zip(prompts, res):
        assert len(r) == 1 and r[0].ids == hf_greedy(model, tok, p, 12)


def test_sampling_equals_the_eager_loop(tiny, prompts):
    """Same seeds, same model: the static engine draws the eager loop's tokens row for row (fp32)."""
    model, tok = tiny.model, tiny.tokenizer
    kw = dict(temperature=1.25, top_k=50, top_p=0.95, max_new_tokens=10, seed=3)
    eager = FastSampler(tok, engine="eager").sample(model, prompts, 4, **kw)
    static = FastSampler(tok, engine="static").sample(model, prompts, 4, **kw)
    assert [[c.ids for c in r] for r in static] == [[c.ids for c in r] for r in eager]
    assert model.training  # left in its mode


def test_seeded_sampling_is_reproducible_and_independent_of_company(tiny, prompts):
    model, tok = tiny.model.eval(), tiny.tokenizer
    rule, handle = stop_when_argmax_divisible(model, tok.eos_token_id, 3)
    try:
        eng = RuledEngine(rule, compile="eager", span_bucket=3)
        ref = engine_ids(eng, model, tok, prompts, 3)
        assert engine_ids(RuledEngine(rule, compile="eager"), model, tok, prompts, 3) == ref  # reproducible
        assert engine_ids(eng, model, tok, prompts, 3, seed=12) != ref
        perm = [3, 0, 5, 4, 2, 1]
        shuffled = engine_ids(eng, model, tok, [prompts[i] for i in perm], 3)
        assert [shuffled[perm.index(i)] for i in range(len(prompts))] == ref
        for i in (1, 4):  # alone: no other question in the batch
            assert engine_ids(eng, model, tok, [prompts[i]], 3) == [ref[i]]
        twice = engine_ids(eng, model, tok, [prompts[1], prompts[1]], 3)
        assert twice[0] == ref[1] and twice[1] != twice[0]  # a repeated prompt gets its own streams
    finally:
        handle.remove()


def test_finished_rows_never_change_the_other_rows(tiny, prompts):
    """Rows that stop (and questions compacted away) leave every other row's tokens as they were."""
    model, tok = tiny.model.eval(), tiny.tokenizer
    rule, handle = stop_when_argmax_divisible(model, tok.eos_token_id, 8)
    try:
        eng = RuledEngine(rule, compile="eager", span_bucket=5)
        rows = engine_ids(eng, model, tok, prompts, 4, max_new=20)
        lens = [len(x) for r in rows for x in r]
        assert min(lens) < 5 and max(lens) == 20  # some stop early, some run to the limit
        assert eng.stats["compactions"] >= 1
        for i, p in enumerate(prompts):  # each question alone: nothing else finishes beside it
            assert engine_ids(RuledEngine(rule, compile="eager"), model, tok, [p], 4, max_new=20) == [rows[i]]
    finally:
        handle.remove()
    without_rule = engine_ids(StaticEngine("eager"), model, tok, prompts, 4, max_new=20)
    assert without_rule != rows  # the rule mattered: rows did stop


def test_static_sample_matches_sample_next_and_flags_ties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 500, generator=g)
    u = torch.rand(64, generator=g, dtype=torch.float64)
    for k, p, temp in ((50, 0.95, 1.25), (5, 1.0, 0.7), (20, 0.5, 1.0)):
        tok, over = static_sample(logits, u, temp, k, p)
        assert not over.any()
        assert torch.equal(tok, sample_next(logits, u, temp, k, p))
    tied = logits.clone()
    tied[3, :40] = 9.0  # 40 tokens tie at the top: past top_k=10 + the 16-candidate margin
    tok, over = static_sample(tied, u, 1.0, 10, 1.0)
    assert over.tolist() == [r == 3 for r in range(64)]
    assert torch.equal(tok[over.logical_not()], sample_next(tied, u, 1.0, 10, 1.0)[over.logical_not()])


def test_ties_past_the_static_candidates_are_redrawn_exactly(tiny, prompts):
    """A tie past top_k + margin makes the host redraw that step with the growing eager sampler."""
    model, tok = tiny.model.eval(), tiny.tokenizer

    def flat_top(out):  # 40 tokens share the top logit on every step
        out = out.clone()
        out[..., 100:140] = out.max(-1, keepdim=True).values + 1.0
        return out

    handle = model.lm_head.register_forward_hook(lambda m, i, out: flat_top(out))
    try:
        eng = RuledEngine(flat_top, compile="eager")
        got = engine_ids(eng, model, tok, prompts[:2], 3, top_k=10, top_p=1.0, max_new=6)
        kw = dict(temperature=1.25, top_k=10, top_p=1.0, max_new_tokens=6, seed=11)
        ref = FastSampler(tok, engine="eager").sample(model, prompts[:2], 3, **kw)
    finally:
        handle.remove()
    assert eng.stats["redraws"] == 5  # every step after the prefill's (which the eager sampler draws)
    assert got == [[c.ids for c in r] for r in ref]
    assert all(100 <= t < 140 for r in got for x in r for t in x)


def test_top_k_off_and_top_p_only(tiny, prompts):
    model, tok = tiny.model, tiny.tokenizer
    kw = dict(temperature=1.0, top_k=0, top_p=0.8, max_new_tokens=6, seed=1)
    a = FastSampler(tok, engine="static").sample(model, prompts[:3], 2, **kw)
    b = FastSampler(tok, engine="eager").sample(model, prompts[:3], 2, **kw)
    assert [[c.ids for c in r] for r in a] == [[c.ids for c in r] for r in b]


def test_other_architectures_fall_back_with_a_log_line(tokenizer, prompts, caplog):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(cfg).eval()  # q/k/v projections with biases: not Llama's step
    assert llama_like(model) is not None
    with caplog.at_level(logging.INFO, logger="pmc_unlearn.sampling.fast"):
        res = FastSampler(tokenizer, engine="static").sample(model, prompts[:2], 2, max_new_tokens=4, seed=0)
    assert [len(r) for r in res] == [2, 2]
    assert any("static decode engine: not for this model" in r.message for r in caplog.records)
    ref = FastSampler(tokenizer, engine="eager").sample(model, prompts[:2], 2, max_new_tokens=4, seed=0)
    assert [[c.ids for c in r] for r in res] == [[c.ids for c in r] for r in ref]


def test_weights_follow_the_live_model(tiny, prompts):
    """The engine copies the weights at every call: an update between calls is sampled from."""
    model, tok = tiny.model.eval(), tiny.tokenizer
    s = FastSampler(tok, engine="static")
    before = s.sample(model, prompts[:2], 1, max_new_tokens=8, greedy=True)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-3.0)
    after = s.sample(model, prompts[:2], 1, max_new_tokens=8, greedy=True)
    assert [r[0].ids for r in after] == [hf_greedy(model, tok, p, 8) for p in prompts[:2]]
    assert [r[0].ids for r in after] != [r[0].ids for r in before]


def test_bf16_copy_runs_the_static_engine(tiny, prompts):
    from pmc_unlearn.sampling import bf16_fast_here

    if not bf16_fast_here(torch.device("cpu")):
        pytest.skip("no native bf16 on this CPU")
    model, tok = tiny.model, tiny.tokenizer
    res = FastSampler(tok, bf16=True, engine="static").sample(model, prompts, 3, max_new_tokens=6, seed=0,
                                                            temperature=1.0, top_k=20)
    assert [len(r) for r in res] == [3] * len(prompts)
    assert next(model.parameters()).dtype == torch.float32  # the live model untouched


def test_compact_buckets():
    assert compact_buckets(1) == [1]
    assert compact_buckets(8) == [8, 4, 2, 1]
    assert compact_buckets(13) == [13, 7, 4, 2, 1]


def test_engine_option_is_checked(tokenizer):
    with pytest.raises(ValueError, match="engine"):
        FastSampler(tokenizer, engine="fastest")
    with pytest.raises(ValueError, match="compile"):
        StaticEngine("jit")


@pytest.mark.compile
def test_compiled_step_equals_generate(tiny, prompts):
    """torch.compile (inductor) of the layer step: generate's greedy tokens (or eager after one log line, no compiler)."""
    model, tok = tiny.model.eval(), tiny.tokenizer
    eng = StaticEngine("inductor")
    got = engine_ids(eng, model, tok, prompts[:3], 1, max_new=8, greedy=True)
    assert [g[0] for g in got] == [hf_greedy(model, tok, p, 8) for p in prompts[:3]]
    assert eng._compile_ok or eng._compile_failed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_the_eager_step(tiny, prompts):
    model, tok = tiny.model.eval().cuda(), tiny.tokenizer
    graph = engine_ids(StaticEngine("graph"), model, tok, prompts, 3, max_new=12)
    eager = engine_ids(StaticEngine("eager"), model, tok, prompts, 3, max_new=12)
    assert graph == eager
    greedy = engine_ids(StaticEngine("graph"), model, tok, prompts, 1, max_new=12, greedy=True)
    assert [g[0] for g in greedy] == [hf_greedy(model, tok, p, 12) for p in prompts]


def test_compiled_output_check_hand_worked():
    from pmc_unlearn.sampling.static import compiled_matches, relative_error

    b = torch.tensor([3.0, 4.0])  # norm 5
    assert relative_error(torch.tensor([3.0, 4.05]), b) == pytest.approx(0.01, rel=1e-4)
    assert compiled_matches(torch.tensor([3.0, 4.05]), b)  # 1% < 2%
    assert not compiled_matches(torch.tensor([3.0, 0.0]), b)  # 80%: the zeros a bad compile returned
    assert not compiled_matches(torch.tensor([3.0, float("nan")]), b)
    assert not compiled_matches(torch.tensor([3.0, 4.0, 0.0]), b)


def test_train_sampler_static_runs_pmc_on_the_static_engine(tmp_path, monkeypatch):
    """`train.sampler=static` reaches the engine from a config: PMC's references and samples go through it."""
    from conftest import FAST
    from pmc_unlearn.config import load_config
    from pmc_unlearn.sampling import SAMPLERS, StaticSampler
    from pmc_unlearn.trainer import train

    assert SAMPLERS["static"] is StaticSampler and StaticSampler.__mro__[1] is FastSampler
    decoded = []
    real = StaticEngine.decode

    def counting(self, model, prompts, *a, **kw):
        decoded.append(len(prompts))
        return real(self, model, prompts, *a, **kw)

    monkeypatch.setattr(StaticEngine, "decode", counting)
    cfg = load_config(None, ["model.name=tiny-random", "data.forget=tofu:forget01", "data.retain=tofu:retain99", *FAST,
                             "train.epochs=1", "train.save_every=-1", "train.sampler=static"], method="pmc")
    man = train(cfg, tmp_path / "run")
    assert man["steps"] == 2
    assert decoded and decoded[0] == 6  # the 6 references first, then each micro-batch's unresolved questions
    assert sum(decoded) > 6


def test_static_sampler_keeps_other_options(tokenizer):
    from pmc_unlearn.sampling import StaticSampler

    s = StaticSampler(tokenizer, batch_rows=32, bf16=True)
    assert s.engine == "static" and s.batch_rows == 32 and s.bf16
    assert StaticSampler(tokenizer, engine="auto").engine == "auto"
