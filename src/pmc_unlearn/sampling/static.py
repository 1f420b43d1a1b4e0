"""Static-shape decoding for Llama-like models: one preallocated KV cache, one step replayed.

`StaticEngine.decode` does what `FastSampler._decode` does (same inputs, same outputs: token ids
per row, cut at the first stop token) with shapes that stay fixed for a whole call:

- **Prompt KV shared by a question's n samples.** The prompts are prefilled once by the model's
  own forward; each layer keeps the prompt keys/values as [B, Hkv, P, D] (B questions), never
  copied per sample. The generated keys/values live in a preallocated [B, Hkv, n, T, D] buffer
  (T = the new-token limit). A step's attention is two batched matmuls per layer: the n x g query
  rows of a question (g = query heads per KV head) against its prompt block at once, and each
  sample's g query rows against its own generated block (only the first `span` slots: the
  step's slot rounded up to a bucket of 16 or 32); one fp32 softmax over both.
- **One step for all layers, sampling included**, written as plain tensor code on static
  buffers (no Python branch on data, no host sync inside): embedding, RMSNorm, fused q/k/v and
  gate/up matmuls, RoPE from a precomputed table, the cache write (`index_copy_` at the step's
  slot), attention, MLP, LM head, then top-k/top-p sampling (`static_sample`) or argmax, and the
  bookkeeping (token written for live rows, stop tokens, lengths). Finished rows keep their
  slot; whole questions whose rows all finished are compacted away in halving buckets
  (`compact_buckets`), so a call sees at most log2(B) shapes.
- **Replay.** On CUDA the step is captured as a CUDA graph once per (shape, span) and replayed
  (the GPU path is launch-bound otherwise; `compile="graph"`, the default there). On CPU the
  layer step can be compiled by torch.compile (`compile="inductor"`: one graph shared by all
  layers, a fallback to eager with one log line when no C++ compiler works), but the default
  there is eager with oneDNN-prepacked bf16 weights: inductor's bf16 matmuls on weights that
  change every call (not frozen, so not prepacked) ran about 3x slower than the prepacked ones
  (bench/RESULTS.md), and matmuls are most of a CPU step.

Randomness is the fast sampler's: row r draws its t-th token with the t-th uniform of its own
generator (seeded by `sampling.ops.row_seed` from the prompt's content), inverse CDF over the
same kept set as transformers' warpers, so a question's samples do not depend on the other
questions in the call. The kept set is exact: `static_sample` takes top_k + a margin of
candidates; when a tie at the k-th score reaches the margin's end (rare) the host redoes that
step's draw with `sampling.ops.sample_next`, which grows the margin.

Which models: `llama_like(model)` checks the structure (LlamaForCausalLM-shaped: RMSNorm, SiLU
gated MLP, no biases, no sliding window, no softcapping, no q/k norms); anything else returns a
reason and the caller falls back to its eager path with a log line.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pmc_unlearn.cpu import adapt_threads
from pmc_unlearn.sampling.ops import nucleus_keep, order_candidates, draw, greedy_next, row_uniforms, sample_next

log = logging.getLogger(__name__)

# Candidates beyond top_k that the static sampler takes, so ties at the k-th score fit (see module doc).
STATIC_TIE_MARGIN = 16


# ----- which models -------------------------------------------------------------------------------

def llama_like(model) -> str | None:
    """None when `model` is LlamaForCausalLM-shaped (the static step computes its function), else why not."""
    cfg = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if cfg is None or inner is None or not hasattr(model, "lm_head"):
        return "not a causal LM with .model and .lm_head"
    for attr in ("hidden_size", "num_attention_heads", "num_hidden_layers", "rms_norm_eps"):
        if not isinstance(getattr(cfg, attr, None), (int, float)):
            return f"config has no {attr}"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(cfg, 'hidden_act', None)!r} (SiLU needed)"
    for attr in ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping", "attention_bias", "mlp_bias"):
        if getattr(cfg, attr, None):
            return f"config.{attr} is set"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    if not all(hasattr(inner, x) for x in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "no embed_tokens/layers/norm/rotary_emb"
    norms = [inner.norm]
    for layer in inner.layers:
        a, m = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if a is None or m is None or any(hasattr(a, x) for x in ("q_norm", "k_norm")):
            return "attention with extra norms or no self_attn/mlp"
        try:
            mods = [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
        except AttributeError:
            return "projections not named as Llama's"
        if any(type(x) is not torch.nn.Linear or x.bias is not None for x in mods):
            return "projections are not plain bias-free Linear layers (adapters? merge them first)"
        if not hasattr(a, "scaling"):
            return "attention has no scaling"
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    if any(not type(x).__name__.endswith("RMSNorm") or not hasattr(x, "variance_epsilon") for x in norms):
        return "norms are not Llama's RMSNorm"
    if type(inner.embed_tokens) is not torch.nn.Embedding or type(model.lm_head) is not torch.nn.Linear:
        return "embedding or head is not a plain Embedding/Linear"
    if model.lm_head.bias is not None:
        return "LM head has a bias"
    return None


# ----- pure pieces of the step ------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: fp32 statistics, the result cast back, then the weight (as transformers computes it)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [R, H, D] rotated with cos/sin [R, 1, D] (rotate_half convention)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def shared_prompt_attention(q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor,
                            pbias: torch.Tensor, gbias: torch.Tensor) -> torch.Tensor:
    """One query position per row over a shared prompt block and each row's own generated block.

    q [B, Hkv, n, g, D] (already scaled); kp, vp [B, Hkv, P, D]; kg, vg [B, Hkv, n, T, D];
    pbias [B, 1, 1, 1, P] and gbias [T] fp32 (0 or -inf). Returns [B, Hkv, n, g, D].
    fp32 scores and softmax, probabilities cast to the value dtype (as eager attention).
    """
    B, Hkv, n, g, D = q.shape
    P = kp.shape[2]
    sp = torch.matmul(q.reshape(B, Hkv, n * g, D), kp.transpose(-1, -2)).float().view(B, Hkv, n, g, P) + pbias
    sg = torch.matmul(q, kg.transpose(-1, -2)).float() + gbias  # [B, Hkv, n, g, T]
    p = torch.softmax(torch.cat([sp, sg], -1), -1).to(vp.dtype)
    op = torch.matmul(p[..., :P].reshape(B, Hkv, n * g, P), vp).view(B, Hkv, n, g, D)
    return op + torch.matmul(p[..., P:], vg)


def static_sample(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  margin: int = STATIC_TIE_MARGIN) -> tuple[torch.Tensor, torch.Tensor]:
    """`sampling.ops.sample_next` with a fixed candidate count (no host sync): (tokens [R], overflow [R]).

    The top_k + margin largest logits are the candidates; the kept set and the draw are the same
    functions as the eager sampler's. `overflow` marks rows where a tie with the k-th score
    reaches the last candidate: the set may be incomplete there and the caller must redraw them
    with `sample_next`. Needs 0 < top_k < vocabulary.
    """
    V = logits.shape[-1]
    k2 = min(V, top_k + margin)
    raw, idx = torch.topk(logits, k2, dim=-1)
    vals = raw.float()
    if temperature != 1.0:
        vals = vals / temperature
    valid = vals >= vals[:, top_k - 1 : top_k]
    overflow = valid[:, -1] & (k2 < V)
    vals, idx = order_candidates(vals, idx, valid)
    keep = torch.isfinite(vals) if top_p >= 1.0 else nucleus_keep(vals, top_p, None)
    return draw(vals, idx, keep, u), overflow


def compact_buckets(B: int) -> list[int]:
    """Question counts a call may shrink to: B, then halves (rounded up) down to 1."""
    out = [B]
    while out[-1] > 1:
        out.append((out[-1] + 1) // 2)
    return out


# ----- weights ------------------------------------------------------------------------------------

@dataclass
class _LayerW:
    ln1: torch.Tensor
    wqkv: torch.Tensor  # [(Hq + 2 Hkv) D, H]
    wo: torch.Tensor
    ln2: torch.Tensor
    wgu: torch.Tensor  # [2 I, H]
    wd: torch.Tensor
    eps1: float
    eps2: float


class StaticWeights:
    """The model's decode weights in static buffers, q/k/v and gate/up concatenated; `refresh` copies them again.

    Own buffers (not the model's parameters): their addresses never change, which a CUDA graph
    needs, and the live model's weights are never touched (the optimizer holds them).
    """

    def __init__(self, model):
        inner = model.model
        self.model_ids = [id(p) for p in model.parameters()]
        self.packed: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            self.embed = inner.embed_tokens.weight.detach().clone()
            self.norm = inner.norm.weight.detach().clone()
            self.norm_eps = float(inner.norm.variance_epsilon)
            tied = model.lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr()
            self.head = self.embed if tied else model.lm_head.weight.detach().clone()
            self.tied = tied
            self.layers = []
            for layer in inner.layers:
                a, m = layer.self_attn, layer.mlp
                self.layers.append(_LayerW(
                    layer.input_layernorm.weight.detach().clone(),
                    torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(),
                    a.o_proj.weight.detach().clone(), layer.post_attention_layernorm.weight.detach().clone(),
                    torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(), m.down_proj.weight.detach().clone(),
                    float(layer.input_layernorm.variance_epsilon), float(layer.post_attention_layernorm.variance_epsilon)))

    def pack(self, rows: int) -> None:
        """oneDNN-blocked copies of the matmul weights (bf16 on a CPU with native bf16); redone after `refresh`.

        F.linear reorders a bf16 weight on every call; the prepacked path computes the same values
        (FastSampler measured 10-19% faster matmuls at 80 rows).
        """
        self.packed = {}
        w0 = self.head
        if w0.device.type != "cpu" or w0.dtype != torch.bfloat16:
            return
        from pmc_unlearn.precision import native_bf16

        if not native_bf16(w0.device)[0]:
            return
        try:
            for w in [x for lw in self.layers for x in (lw.wqkv, lw.wo, lw.wgu, lw.wd)] + [w0]:
                self.packed[id(w)] = torch.ops.mkldnn._reorder_linear_weight(w, max(1, rows))
        except (RuntimeError, AttributeError) as e:  # an older torch or oneDNN without the op: plain F.linear
            log.debug("no prepacked oneDNN linear (%s)", e)
            self.packed = {}

    def matches(self, model) -> bool:
        return [id(p) for p in model.parameters()] == self.model_ids

    @torch.no_grad()
    def refresh(self, model) -> None:
        self.packed = {}
        inner = model.model
        self.embed.copy_(inner.embed_tokens.weight)
        self.norm.copy_(inner.norm.weight)
        if not self.tied:
            self.head.copy_(model.lm_head.weight)
        for w, layer in zip(self.layers, inner.layers):
            a, m = layer.self_attn, layer.mlp
            w.ln1.copy_(layer.input_layernorm.weight)
            torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], out=w.wqkv)
            w.wo.copy_(a.o_proj.weight)
            w.ln2.copy_(layer.post_attention_layernorm.weight)
            torch.cat([m.gate_proj.weight, m.up_proj.weight], out=w.wgu)
            w.wd.copy_(m.down_proj.weight)


# ----- the state of one call ------------------------------------------------------------------------

@dataclass
class _State:
    """Every tensor one decode step reads or writes, shapes fixed for a bucket of B questions."""

    tok: torch.Tensor  # [R] the token to feed (long)
    pos0: torch.Tensor  # [R] position of the first new token
    t: torch.Tensor  # [1] long: the step (slot in the generated cache)
    kp: list  # per layer [B, Hkv, P, D]
    vp: list
    kg: list  # per layer [B, Hkv, n, T, D]
    vg: list
    pbias: torch.Tensor  # [B, 1, 1, 1, P] fp32
    U: torch.Tensor | None  # [R, T] uniforms (fp64), None when greedy
    tokens: torch.Tensor  # [R, T] output tokens (pad where finished)
    length: torch.Tensor  # [R] tokens kept (T until a stop token)
    done: torch.Tensor  # [R] bool
    rows: torch.Tensor  # [R] slot -> output row
    prev_done: torch.Tensor  # [R] done before this step (to redo a step's draw exactly)
    prev_length: torch.Tensor
    logits: torch.Tensor | None = None  # [R, V] the step's logits (kept for a redraw)
    nxt: torch.Tensor | None = None  # [R] the step's tokens
    overflow: torch.Tensor | None = None  # [R] bool
    flags: torch.Tensor | None = None  # [2] (all done, any overflow), read by the host
    extra: dict = field(default_factory=dict)

    @property
    def B(self) -> int:
        return self.kp[0].shape[0]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32 (0 when both are zero)."""
    a, b = a.float(), b.float()
    denom = float(b.norm())
    return float((a - b).norm()) / denom if denom > 0 else float((a - b).norm())


def compiled_matches(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-2) -> bool:
    """A compiled step's output agrees with the eager one: same shape, finite, relative error below tol
    (bf16 rounding differs between the two paths by well under 1%)."""
    return a.shape == b.shape and bool(torch.isfinite(a).all()) and relative_error(a, b) < tol


class StaticEngine:
    """Static-shape decode (module doc) for one Llama-like model; built by `FastSampler` when asked.

    compile: "auto" (CUDA: graphs; CPU: eager, what measured best there), "graph" (CUDA graphs,
    CUDA only), "inductor" (torch.compile of each layer's step, CPU or CUDA), "eager".
    """

    def __init__(self, compile: str = "auto", prepack: bool = True, span_bucket: int | None = None):
        self.prepack = prepack
        self.compact_every = 4  # steps between checks for questions to compact away (each check syncs the host)
        # generated slots attention reads, rounded up to this: 16 eager (CPU), 32 with CUDA graphs (one capture each)
        self.span_bucket = span_bucket
        if compile not in ("auto", "graph", "inductor", "eager"):
            raise ValueError(f"compile={compile!r}: choose auto, graph, inductor or eager")
        self.compile = compile
        self.weights: StaticWeights | None = None
        self._layer_fn = None  # compiled layer step, or None for eager
        self._compile_failed = False
        self._compile_ok = False
        self._checks_left = 64  # compiled layer calls checked against eager (a few decode steps' worth)
        self._mode_now = "eager"
        self._graphs: dict = {}  # CUDA graphs of the current state, by span
        self._cuda_warm = False
        self.stats: dict[str, int] = {"redraws": 0, "compactions": 0, "graph_captures": 0}

    # ----- setup ----------------------------------------------------------------------------------
    def prepare(self, model) -> None:
        """Point the engine at `model`'s current weights (copied into the static buffers)."""
        if self.weights is None or not self.weights.matches(model):
            self.weights = StaticWeights(model)
            self._graphs = {}
        else:
            self.weights.refresh(model)
        cfg = model.config
        self.Hq, self.Hkv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = float(model.model.layers[0].self_attn.scaling)
        self.rotary = model.model.rotary_emb

    def _mode(self, device: torch.device) -> str:
        if self.compile == "auto":
            return "graph" if device.type == "cuda" else "eager"
        if self.compile == "graph" and device.type != "cuda":
            return "eager"
        return self.compile

    def _layer_step(self):
        """The layer step to call: eager, or torch.compile'd (inductor) with a fallback to eager on first failure."""
        if self._mode_now != "inductor" or self._compile_failed:
            return self._layer
        if self._layer_fn is None:
            self._layer_fn = torch.compile(functools.partial(self._layer, lin=F.linear), dynamic=None)
        return self._compiled_layer

    def _compiled_layer(self, *args):
        try:
            out = self._layer_fn(*args)
        except Exception as e:  # noqa: BLE001 (no C++ compiler, unsupported platform: eager works everywhere)
            if self._compile_ok:
                raise  # it compiled and ran before: a real error
            self._compile_failed = True
            log.info("static decode: torch.compile failed (%s: %s); decoding eagerly", type(e).__name__,
                     str(e).strip().splitlines()[0][:200] if str(e).strip() else "")
            return self._layer(*args)
        if self._checks_left > 0:
            # The first compiled calls are checked against the eager step (same inputs; the eager call
            # rewrites the same K/V slot): inductor code built for a restricted instruction set
            # (ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU) returned wrong values here once, silently.
            self._checks_left -= 1
            ref = self._layer(*args)
            if not compiled_matches(out, ref):
                self._compile_failed = True
                log.warning("static decode: the compiled layer step disagrees with the eager one (relative error "
                            "%.3g); decoding eagerly", relative_error(out, ref))
                return ref
        self._compile_ok = True
        return out

    # ----- the step -------------------------------------------------------------------------------
    def _layer(self, h, w1, wqkv, wo, w2, wgu, wd, kp, vp, kg, vg, cos, sin, t, pbias, gbias, eps1: float, eps2: float,
               n: int, Hq: int, Hkv: int, D: int, scaling: float, span: int, lin=None):
        """One layer of the one-token step for all rows; writes this position's K/V at slot t (a [1] tensor).

        Attention reads the first `span` generated slots (gbias [span] closes those past t).
        """
        lin = lin or self._lin
        R = h.shape[0]
        B, g = R // n, Hq // Hkv
        x = rms_norm(h, w1, eps1)
        qkv = lin(x, wqkv)
        qk = rope(qkv[:, : (Hq + Hkv) * D].view(R, Hq + Hkv, D), cos, sin)
        v = qkv[:, (Hq + Hkv) * D :].view(B, n, Hkv, 1, D).transpose(1, 2)
        kg.index_copy_(3, t, qk[:, Hq:].reshape(B, n, Hkv, 1, D).transpose(1, 2))
        vg.index_copy_(3, t, v)
        q = (qk[:, :Hq] * scaling).view(B, n, Hkv, g, D).transpose(1, 2)  # [B, Hkv, n, g, D]
        o = shared_prompt_attention(q, kp, vp, kg[:, :, :, :span], vg[:, :, :, :span], pbias, gbias)
        h = h + lin(o.transpose(1, 2).reshape(R, Hq * D), wo)
        x = rms_norm(h, w2, eps2)
        gu = lin(x, wgu)
        inter = gu.shape[-1] // 2
        return h + lin(F.silu(gu[:, :inter]) * gu[:, inter:], wd)

    def _lin(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x @ w.T, through oneDNN's prepacked weight when there is one (bf16 on CPU: `StaticWeights.pack`)."""
        p = self.weights.packed.get(id(w)) if self.weights is not None else None
        if p is None:
            return F.linear(x, w)
        return torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")

    def _logits(self, s: _State, tok: torch.Tensor, slot: torch.Tensor, span: int) -> torch.Tensor:
        """New tokens [R] (the slot-th of each row) -> next-token logits [R, V]; writes every layer's K/V at slot."""
        W = self.weights
        n = s.kg[0].shape[2]
        pos = s.pos0 + slot
        cos = s.extra["cos"].index_select(0, pos).unsqueeze(1)
        sin = s.extra["sin"].index_select(0, pos).unsqueeze(1)
        gbias = s.extra["gbias"].index_select(0, slot).squeeze(0)[:span]  # slots <= slot open
        h = F.embedding(tok, W.embed)
        step = self._layer_step()
        for w, kp, vp, kg, vg in zip(W.layers, s.kp, s.vp, s.kg, s.vg):
            h = step(h, w.ln1, w.wqkv, w.wo, w.ln2, w.wgu, w.wd, kp, vp, kg, vg, cos, sin, slot, s.pbias, gbias,
                     w.eps1, w.eps2, n, self.Hq, self.Hkv, self.D, self.scaling, span)
        return self._lin(rms_norm(h, W.norm, W.norm_eps), W.head)

    def _step(self, s: _State, span: int) -> None:
        """One whole decode step on the state, in place (no host sync: capturable as a CUDA graph).

        `span`: generated slots attention reads (a multiple of `span_bucket` covering the step's slot).
        """
        cfg = s.extra["cfg"]
        t = s.t  # the token fed now is the (t-1)-th new one; the one drawn is the t-th
        logits = self._logits(s, s.tok, t - 1, span)
        s.logits.copy_(logits)
        if cfg["greedy"]:
            nxt = greedy_next(logits)
            overflow = torch.zeros_like(s.done)
        elif cfg["static_sampling"]:
            u = s.U.index_select(1, t).squeeze(1)
            nxt, overflow = static_sample(logits, u, cfg["temperature"], cfg["top_k"], cfg["top_p"])
        else:  # top_k off: the eager sampler (its candidate set grows with host checks)
            nxt = sample_next(logits, s.U.index_select(1, t).squeeze(1), cfg["temperature"], 0, cfg["top_p"])
            overflow = torch.zeros_like(s.done)
        s.prev_done.copy_(s.done)
        s.prev_length.copy_(s.length)
        self._commit(s, nxt, t + 1)
        s.overflow.copy_(overflow & ~s.prev_done)
        s.flags.copy_(torch.stack([s.done.all(), s.overflow.any()]))
        s.t.add_(1)

    @staticmethod
    def _commit(s: _State, nxt: torch.Tensor, t1: torch.Tensor) -> None:
        """Record step t1 - 1's tokens nxt [R] for the rows not done before it; feed them next."""
        live = ~s.prev_done
        s.tokens.index_copy_(1, t1 - 1, torch.where(live, nxt, s.tokens.index_select(1, t1 - 1).squeeze(1)).unsqueeze(1))
        hit = live & torch.isin(nxt, s.extra["stop"])
        s.length.copy_(torch.where(hit, t1, s.prev_length))
        s.done.copy_(s.prev_done | hit)
        s.nxt.copy_(nxt)
        s.tok.copy_(nxt)

    def _redraw(self, s: _State) -> None:
        """The step just taken had a tie past the static candidates: draw it again exactly, eagerly."""
        cfg = s.extra["cfg"]
        t = s.t - 1
        nxt = sample_next(s.logits, s.U.index_select(1, t).squeeze(1), cfg["temperature"], cfg["top_k"], cfg["top_p"])
        self._commit(s, nxt, s.t)
        s.flags.copy_(torch.stack([s.done.all(), torch.zeros((), dtype=torch.bool, device=s.done.device)]))
        self.stats["redraws"] += 1

    def _run_step(self, s: _State, mode: str, span: int) -> None:
        if mode != "graph":
            self._step(s, span)
            return
        if self._graphs.get("state") is not s:
            self._graphs = {"state": s}  # graphs of an older state hold its (dead) buffers
        g = self._graphs.get(span)
        if g is None:
            g = self._graphs[span] = self._capture(s, span)
        g.replay()

    def _capture(self, s: _State, span: int):
        """Capture one step of `s` as a CUDA graph; the first capture of the process runs warm-up steps first.

        Capturing records the kernels without running them, so the state is untouched; the
        warm-up steps (side stream, as CUDA graphs require for lazy initialisation) are undone.
        """
        if not self._cuda_warm:
            saved = {k: getattr(s, k).clone() for k in ("tok", "t", "tokens", "length", "done", "prev_done", "prev_length")}
            kv = [x.clone() for x in s.kg + s.vg]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(s, span)
            torch.cuda.current_stream().wait_stream(stream)
            for k, v in saved.items():
                getattr(s, k).copy_(v)
            for dst, src in zip(s.kg + s.vg, kv):
                dst.copy_(src)
            self._cuda_warm = True
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(s, span)
        self.stats["graph_captures"] += 1
        return graph

    # ----- one call ---------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, model, prompts: list[list[int]], n: int, seeds: list[int], stop: set[int], pad: int,
               max_new: int, temperature: float, top_k: int, top_p: float, greedy: bool) -> list[list[int]]:
        """Token ids for each of len(prompts) x n rows (prompt-major), each cut after its first stop token."""
        from transformers import DynamicCache

        from pmc_unlearn.formatting import collate_prompts

        self.prepare(model)
        device = self.weights.embed.device
        mode = self._mode_now = self._mode(device)
        batch = collate_prompts(prompts, pad)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        B, P = ids.shape
        R, T = B * n, max_new
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=torch.tensor([P - 1], device=device))
        first_logits = out.logits[:, -1]
        kp = [layer.keys.contiguous() for layer in cache.layers]
        vp = [layer.values.contiguous() for layer in cache.layers]
        del cache, out
        dtype = kp[0].dtype
        U = None if greedy else row_uniforms(seeds, T).to(device)
        stop_t = torch.tensor(sorted(stop), device=device)
        if greedy:
            nxt = greedy_next(first_logits)
        else:
            nxt = sample_next(first_logits, U[:, 0], temperature, top_k, top_p, repeat=n)
        pos0 = (pos[:, -1] + 1).repeat_interleave(n)
        length = torch.full((R,), T, dtype=torch.long, device=device)
        hit = torch.isin(nxt, stop_t)
        length = torch.where(hit, 1, length)
        tokens = torch.full((R, T), pad, dtype=torch.long, device=device)
        tokens[:, 0] = nxt
        s = _State(
            tok=nxt.clone(), pos0=pos0, t=torch.ones(1, dtype=torch.long, device=device), kp=kp, vp=vp,
            kg=[torch.zeros(B, self.Hkv, n, T, self.D, dtype=dtype, device=device) for _ in kp],
            vg=[torch.zeros(B, self.Hkv, n, T, self.D, dtype=dtype, device=device) for _ in kp],
            pbias=torch.zeros(B, 1, 1, 1, P, device=device).masked_fill(mask[:, None, None, None, :] == 0, float("-inf")),
            U=U, tokens=tokens, length=length, done=hit.clone(), rows=torch.arange(R, device=device),
            prev_done=hit.clone(), prev_length=length.clone(), logits=first_logits.new_empty(R, first_logits.shape[-1]),
            nxt=nxt.clone(), overflow=torch.zeros(R, dtype=torch.bool, device=device),
            flags=torch.zeros(2, dtype=torch.bool, device=device))
        cos, sin = self._rope_table(P + T, device, dtype)
        tri = torch.full((T, T), float("-inf"), device=device).triu(1)  # row t: slots <= t open
        s.extra = {"cos": cos, "sin": sin, "gbias": tri, "stop": stop_t,
                   "cfg": {"greedy": greedy, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                           "static_sampling": not greedy and 0 < top_k < first_logits.shape[-1]}}
        if mode == "graph" and not (greedy or s.extra["cfg"]["static_sampling"]):
            mode = self._mode_now = "eager"  # top_k off: the sampler's candidate set grows with host checks, not capturable
        if mode == "eager" and self.prepack and not self.weights.packed:
            self.weights.pack(R)  # once per call (the weights were refreshed); R is only a blocking hint
        results_tokens = torch.empty(R, T, dtype=torch.long, device=device)
        results_length = torch.empty(R, dtype=torch.long, device=device)
        all_done = bool(hit.all())
        buckets = compact_buckets(B)
        bucket = max(1, self.span_bucket or (32 if mode == "graph" else 16))
        t = 1
        while t < T and not all_done:
            if device.type == "cpu":
                adapt_threads()  # one thread fewer while other processes hold a core (pmc_unlearn/cpu.py)
            self._run_step(s, mode, min(T, -(-t // bucket) * bucket))
            t += 1
            flags = s.flags.tolist()
            if flags[1]:
                self._redraw(s)
                flags = s.flags.tolist()
            all_done = flags[0]
            if not all_done and t < T and t % self.compact_every == 0:
                s = self._maybe_compact(s, n, buckets, results_tokens, results_length)
        results_tokens[s.rows] = s.tokens
        results_length[s.rows] = s.length
        tok_list, len_list = results_tokens.cpu().tolist(), results_length.cpu().tolist()
        return [tok_list[r][: len_list[r]] for r in range(R)]

    def _rope_table(self, L: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [L, D] of positions 0..L-1 from the model's own rotary module, in the model dtype."""
        x = torch.zeros(1, 1, self.D, dtype=dtype, device=device)
        cos, sin = self.rotary(x, torch.arange(L, device=device)[None])
        return cos[0].to(dtype), sin[0].to(dtype)

    def _maybe_compact(self, s: _State, n: int, buckets: list[int], res_tokens, res_length) -> _State:
        """Drop whole questions whose n rows all finished, when the live ones fit the next smaller bucket."""
        B = s.B
        smaller = [b for b in buckets if b < B]
        if not smaller:
            return s
        q_done = s.done.view(B, n).all(1)
        live_q = B - int(q_done.sum())
        target = min((b for b in buckets if b >= live_q), default=B)
        if target >= B:
            return s
        finished = torch.nonzero(q_done).flatten()
        # Keep the live questions and fill the bucket with finished ones (their rows stay done).
        keep_q = torch.cat([torch.nonzero(~q_done).flatten(), finished])[:target].sort().values
        gone_q = torch.ones(B, dtype=torch.bool, device=q_done.device)
        gone_q[keep_q] = False
        gone_rows = (gone_q[:, None].expand(B, n)).reshape(-1)
        res_tokens[s.rows[gone_rows]] = s.tokens[gone_rows]
        res_length[s.rows[gone_rows]] = s.length[gone_rows]
        keep_r = (keep_q[:, None] * n + torch.arange(n, device=keep_q.device)).reshape(-1)
        self.stats["compactions"] += 1
        return _State(
            tok=s.tok[keep_r], pos0=s.pos0[keep_r], t=s.t.clone(), kp=[x[keep_q] for x in s.kp],
            vp=[x[keep_q] for x in s.vp], kg=[x[keep_q] for x in s.kg], vg=[x[keep_q] for x in s.vg],
            pbias=s.pbias[keep_q], U=None if s.U is None else s.U[keep_r], tokens=s.tokens[keep_r],
            length=s.length[keep_r], done=s.done[keep_r], rows=s.rows[keep_r], prev_done=s.prev_done[keep_r],
            prev_length=s.prev_length[keep_r], logits=s.logits[keep_r], nxt=s.nxt[keep_r],
            overflow=s.overflow[keep_r], flags=s.flags.clone(),
            extra=s.extra)
