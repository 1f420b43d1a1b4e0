"""Samplers on tiny-random: the fast backend against transformers' generate, EOS, seeds, bucketing."""

import copy
import random

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from pmc_unlearn.formatting import PromptFormat, prompt_ids
from pmc_unlearn.sampling import SAMPLERS, FastSampler, HFSampler, bf16_fast_here, eos_ids

QUESTIONS = [
    "What is the full name of the author born in Kuwait City?",
    "Who wrote it?",
    "What genre does the author write in, and which of the books won the award in 2001?",
    "Name one book.",
    "Where did the author grow up, and how did that place shape the themes of the novels?",
]


@pytest.fixture()
def prompts(tokenizer):
    return [prompt_ids(tokenizer, q, PromptFormat()) for q in QUESTIONS]


def eos_when_argmax_divisible(model, eos: int, mod: int = 4):
    """Make a random model stop: EOS becomes the top logit whenever the argmax id is divisible by `mod`.

    A pure function of the logits, so generate and our loop see the same model.
    """

    def hook(module, inputs, out):
        top = out.argmax(-1)
        out = out.clone()
        out[..., eos] = torch.where(top % mod == 0, out.max(-1).values + 5.0, out[..., eos])
        return out

    return model.lm_head.register_forward_hook(hook)


def hf_greedy(model, tok, p, max_new):
    x = torch.tensor([p])
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
                         pad_token_id=tok.pad_token_id, eos_token_id=sorted(eos_ids(model, tok)))
    return out[0, len(p):].tolist()


def test_fast_is_registered():
    assert SAMPLERS["fast"] is FastSampler and SAMPLERS["hf"] is HFSampler


@pytest.mark.parametrize("drop_frac", [0.0, 0.5, 2.0])
def test_greedy_equals_generate(tiny, prompts, drop_frac):
    model, tok = tiny.model.eval(), tiny.tokenizer
    handle = eos_when_argmax_divisible(model, tok.eos_token_id)
    try:
        fast = FastSampler(tok, batch_rows=3, drop_frac=drop_frac)  # several chunks, rows dropped or not
        res = fast.sample(model, prompts, 4, max_new_tokens=24, greedy=True)  # greedy ignores n
        stopped = 0
        for p, r in zip(prompts, res):
            assert len(r) == 1
            ref = hf_greedy(model, tok, p, 24)
            cut = ref[: ref.index(tok.eos_token_id) + 1] if tok.eos_token_id in ref else ref
            assert r[0].ids == cut
            stopped += not r[0].hit_limit
        assert stopped > 0
    finally:
        handle.remove()


def test_greedy_equals_generate_without_eos(tiny, prompts):
    model, tok = tiny.model.eval(), tiny.tokenizer
    res = FastSampler(tok).sample(model, prompts, 1, max_new_tokens=12, greedy=True)
    for p, r in zip(prompts, res):
        assert r[0].ids == hf_greedy(model, tok, p, 12)
        assert r[0].hit_limit and len(r[0].ids) == 12


def test_eos_cutting_and_truncated_flag(tiny, prompts):
    model, tok = tiny.model, tiny.tokenizer
    handle = eos_when_argmax_divisible(model, tok.eos_token_id, mod=3)
    try:
        res = FastSampler(tok, batch_rows=64).sample(model, prompts, 6, temperature=1.0, top_k=50, top_p=0.95,
                                                   max_new_tokens=10, seed=5)
    finally:
        handle.remove()
    n_stop = n_cut = 0
    for r in res:
        assert len(r) == 6
        for c in r:
            assert tok.eos_token_id not in c.ids[:-1]  # nothing after the first EOS
            if c.hit_limit:
                n_cut += 1
                assert len(c.ids) == 10 and c.ids[-1] != tok.eos_token_id
            else:
                n_stop += 1
                assert c.ids[-1] == tok.eos_token_id and len(c.ids) <= 10
                assert c.text == tok.decode(c.ids[:-1], skip_special_tokens=True).strip()
    assert n_stop and n_cut  # both kinds occur


def sample_ids(sampler, model, prompts, n=3, seed=11, **kw):
    args = dict(temperature=1.25, top_k=50, top_p=0.95, max_new_tokens=8, seed=seed)
    args.update(kw)
    return [[c.ids for c in r] for r in sampler.sample(model, prompts, n, **args)]


def test_seeded_sampling_is_reproducible_and_independent_of_history(tiny, prompts):
    model, tok = tiny.model, tiny.tokenizer
    a = sample_ids(FastSampler(tok), model, prompts)
    torch.manual_seed(123)  # global RNG state must not matter
    random.random()
    s = FastSampler(tok)
    sample_ids(s, model, prompts, seed=99)  # an earlier call must not matter either
    assert sample_ids(s, model, prompts) == a
    assert sample_ids(s, model, prompts, seed=12) != a
    flat = [ids for r in a for ids in r]
    assert len({tuple(x) for x in flat}) == len(flat)  # the n samples of a prompt differ


def test_results_do_not_depend_on_order_bucketing_or_company(tiny, prompts):
    model, tok = tiny.model, tiny.tokenizer
    handle = eos_when_argmax_divisible(model, tok.eos_token_id, mod=3)
    try:
        ref = sample_ids(FastSampler(tok, batch_rows=256), model, prompts)
        perm = [3, 0, 4, 2, 1]
        shuffled = sample_ids(FastSampler(tok, batch_rows=4, drop_frac=0.0), model, [prompts[i] for i in perm])
        assert [shuffled[perm.index(i)] for i in range(len(prompts))] == ref
        alone = sample_ids(FastSampler(tok), model, [prompts[2]])
        assert alone[0] == ref[2]
        # an identical prompt twice gets two different sets of samples
        twice = sample_ids(FastSampler(tok), model, [prompts[1], prompts[1]])
        assert twice[0] == ref[1] and twice[1] != twice[0]
    finally:
        handle.remove()


def test_first_token_distribution_matches_softmax(tiny, prompts, tokenizer):
    model = tiny.model.eval()
    p = prompts[0]
    T, k, top_p, N = 1.25, 20, 0.9, 6000
    with torch.no_grad():
        logits = model(torch.tensor([p])).logits[0, -1:].float()
    s = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(k)(None, logits / T))
    probs = torch.softmax(s, -1)[0].double()
    res = FastSampler(tokenizer, batch_rows=N).sample(model, [p], N, temperature=T, top_k=k, top_p=top_p,
                                                     max_new_tokens=1, seed=0)
    first = torch.tensor([r.ids[0] for r in res[0]])
    freq = torch.bincount(first, minlength=probs.numel()).double() / N
    assert (freq[probs == 0] == 0).all()
    tv = 0.5 * (freq - probs).abs().sum().item()
    assert tv < 0.05, tv


def test_hf_and_fast_agree_on_the_kept_set_in_distribution(tiny, prompts, tokenizer):
    """Both backends only ever produce first tokens from the warpers' kept set."""
    model = tiny.model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompts[1]])).logits[0, -1:].float()
    kept = torch.isfinite(TopPLogitsWarper(0.5)(None, TopKLogitsWarper(5)(None, logits / 1.3)))[0]
    for s in (FastSampler(tokenizer), HFSampler(tokenizer)):
        res = s.sample(model, [prompts[1]], 40, temperature=1.3, top_k=5, top_p=0.5, max_new_tokens=1, seed=2)
        assert all(kept[c.ids[0]] for c in res[0])


def test_empty_prompt_list_and_n_samples(tiny, prompts):
    s = FastSampler(tiny.tokenizer)
    assert s.sample(tiny.model, [], 3) == []
    res = s.sample(tiny.model, prompts[:2], 3, max_new_tokens=2)
    assert [len(r) for r in res] == [3, 3]


def test_model_left_in_its_training_mode(tiny, prompts):
    model = tiny.model.train()
    FastSampler(tiny.tokenizer).sample(model, prompts[:1], 2, max_new_tokens=2)
    assert model.training


@pytest.mark.skipif(not bf16_fast_here(torch.device("cpu")), reason="no native bf16 matmuls on this CPU")
def test_bf16_copy_tracks_the_live_weights(tiny, prompts):
    model, tok = tiny.model, tiny.tokenizer
    s = FastSampler(tok, bf16=True)

    def ref_bf16():
        m = copy.deepcopy(model).to(torch.bfloat16)
        for b, b0 in zip(m.buffers(), model.buffers()):  # buffers (RoPE) stay fp32, as in the sampler's copy
            b.data = b0.data.clone()
        return sample_ids(FastSampler(tok), m, prompts)

    assert sample_ids(s, model, prompts) == ref_bf16()
    with torch.no_grad():  # an "optimizer step"
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert sample_ids(s, model, prompts) == ref_bf16()
    assert next(model.parameters()).dtype == torch.float32  # the live model is untouched


def test_lora_model_samples_with_merged_weights(tiny, prompts):
    from pmc_unlearn.models import apply_lora

    model = apply_lora(tiny.model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.1)  # non-zero adapters
    tok = tiny.tokenizer
    merged = copy.deepcopy(model).merge_and_unload()
    assert sample_ids(FastSampler(tok), model, prompts) == sample_ids(FastSampler(tok), merged, prompts)
    if bf16_fast_here(torch.device("cpu")):
        assert len(sample_ids(FastSampler(tok, bf16=True), model, prompts)) == len(prompts)


@pytest.mark.parametrize("chunk,drop_frac", [(3, 0.0), (16, 2.0), (1, 0.3)])
def test_block_attention_equals_generate(tiny, prompts, chunk, drop_frac):
    """Our decode attention (forced on in fp32 here) gives generate's greedy tokens; chunk folds and drops included."""
    model, tok = tiny.model.eval(), tiny.tokenizer
    handle = eos_when_argmax_divisible(model, tok.eos_token_id, mod=5)
    try:
        fast = FastSampler(tok, batch_rows=4, drop_frac=drop_frac, block_attention=True, block_chunk=chunk)
        res = fast.sample(model, prompts, 1, max_new_tokens=20, greedy=True)
        for p, r in zip(prompts, res):
            ref = hf_greedy(model, tok, p, 20)
            assert r[0].ids == (ref[: ref.index(tok.eos_token_id) + 1] if tok.eos_token_id in ref else ref)
        # sampling: the same tokens as the SDPA path, row for row
        kw = dict(n=3, max_new_tokens=12)
        a = sample_ids(FastSampler(tok, block_attention=True, block_chunk=chunk, drop_frac=drop_frac), model, prompts, **kw)
        b = sample_ids(FastSampler(tok, block_attention=False), model, prompts, **kw)
        assert a == b
    finally:
        handle.remove()
    assert model.config._attn_implementation == "sdpa"  # restored after decoding


def test_llama_decoder_step_matches_the_model_forward(tiny, prompts):
    """The written-out decode step gives the model's own next-token logits (fp32, fused weights)."""
    from transformers import DynamicCache

    from pmc_unlearn.sampling.decode_step import LlamaDecoder
    from pmc_unlearn.sampling.kv_cache import BlockLayer

    model = tiny.model.eval()
    twin = copy.deepcopy(model)
    assert LlamaDecoder.supports(twin)
    dec = LlamaDecoder(twin)  # fuses twin's weights (views): twin still computes the same function
    ids = torch.tensor([prompts[0][:12], prompts[2][:12]])
    caches = []
    with torch.no_grad():
        for m in (model, twin):
            c = DynamicCache(config=m.config)
            m(input_ids=ids, past_key_values=c, use_cache=True)
            bias = torch.zeros(2, 1, 1, 64)
            for i, layer in enumerate(c.layers):
                c.layers[i] = BlockLayer(layer.keys, layer.values, bias, 4)
            caches.append(c)
        tok = torch.tensor([17, 4242])
        for t in range(6):  # crosses a chunk fold
            pos = torch.full((2,), 12 + t)
            model.config._attn_implementation = "pmc_block_decode"
            try:
                ref = model(input_ids=tok[:, None], position_ids=pos[:, None], past_key_values=caches[0],
                            use_cache=True).logits[:, -1]
            finally:
                model.config._attn_implementation = "sdpa"
            got = dec.step(tok, pos, caches[1])
            assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
            tok = ref.argmax(-1)
