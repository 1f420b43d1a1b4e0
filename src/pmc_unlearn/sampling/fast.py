"""The `fast` backend: our own decode loop on the same model (`FastSampler`).

Each prompt is prefilled once for its n samples, top-k/top-p are exact without a full-vocab sort
(`sampling.ops`), finished rows are dropped, and bf16 weights decode on CPUs that run them
natively. The caches live in `sampling.kv_cache`, the written-out Llama step in
`sampling.decode_step`.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections import Counter

import torch

from pmc_unlearn.cpu import adapt_threads
from pmc_unlearn.formatting import collate_prompts
from pmc_unlearn.sampling.interface import Completion, eos_ids, finish, unwrap
from pmc_unlearn.sampling.ops import greedy_next, row_seed, row_uniforms, sample_next

log = logging.getLogger(__name__)


def bf16_fast_here(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here (CUDA, or a CPU with AVX512-BF16/AMX via oneDNN)."""
    from pmc_unlearn.precision import native_bf16

    return native_bf16(device)[0]


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
       or drawn by `sampling.ops.sample_next` (temperature, top-k, top-p with the distribution
       of transformers' warpers, no vocabulary sort, one uniform number per row);
    3. a row stops at EOS; finished rows are dropped from the batch and cache once they make up
       `drop_frac` of it (compaction copies the cache, so not at every single finish).

    Two decode paths (bench/RESULTS.md has the measurements):
    - bf16 (`bf16=True` on a CPU with native bf16 matmuls): a bf16 copy of the weights, refreshed
      from the live model at every call (the live model is never touched). For Llama-architecture
      models the step is written out (`LlamaDecoder`: fused q/k/v and gate/up matmuls, oneDNN
      prepacked weights) over `BlockLayer` caches with our one-query attention; for other known
      families the model's forward runs with that attention; else SDPA over `SlabLayer` caches.
    - fp32: the model's own forward, SDPA over `SlabLayer` (preallocated, no per-step torch.cat);
      greedy output equals `generate(do_sample=False)` token for token.
    - `engine="static"` (or `"auto"` on CUDA): `pmc_unlearn.sampling.static.StaticEngine` instead of
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
        # engine: "eager" (the loop below), "static" (sampling.static: static KV cache, prompt KV shared
        # by a question's samples, a replayable step; Llama-like models, others fall back here with a
        # log line), "auto" (static on CUDA, eager on CPU: bench/RESULTS.md).
        self.engine = engine
        self.static_compile = static_compile
        self._static = None
        self._static_refused: str | None = None

    # ----- weights ------------------------------------------------------------------------------
    def _runner(self, model):
        """(module that samples, its `LlamaDecoder` or None): the model itself, or a bf16 copy of its current weights."""
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
        from pmc_unlearn.sampling.decode_step import LlamaDecoder

        want = self.custom_decoder if self.custom_decoder is not None else True
        if not (want and LlamaDecoder.supports(shadow)):
            return None
        return LlamaDecoder(shadow)

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
        model, n = unwrap(model, n, greedy)
        if not prompts:
            return []
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
        from pmc_unlearn.sampling.static import StaticEngine, llama_like

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

        from pmc_unlearn.sampling.kv_cache import BLOCK_ATTENTION, BlockLayer, SlabLayer

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



class StaticSampler(FastSampler):
    """`train.sampler=static`: `FastSampler` with `engine="static"` (`sampling.static.StaticEngine`).

    The same interface, tokens and seeds as `fast`; the step runs on a static KV cache with each
    prompt's KV shared by its samples (a CUDA graph on GPU). Models that are not Llama-like fall
    back to the eager loop with one log line.
    """

    def __init__(self, tokenizer, **kw):
        kw.setdefault("engine", "static")
        super().__init__(tokenizer, **kw)
