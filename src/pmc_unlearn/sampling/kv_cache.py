"""The fast sampler's decode caches, one transformers cache layer each.

- `SlabLayer`: a layer's keys and values in a preallocated buffer (any attention kernel, SDPA);
- `BlockLayer`: a contiguous history plus a small chunk being filled, read by our one-query
  attention (`block_attend`), registered with transformers as `BLOCK_ATTENTION`.

Importing this module imports transformers (the classes subclass its `DynamicLayer`); the fast
sampler imports it at its first decode, so `import pmc_unlearn.sampling` stays light.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

BLOCK_ATTENTION = "pmc_block_decode"


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
    out = block_attend(key, query.reshape(R, Hq, D), scaling if scaling is not None else D**-0.5)
    return out.reshape(R, 1, Hq, D), None  # [R, q_len=1, heads, dim], as the attention modules expect


AttentionInterface.register(BLOCK_ATTENTION, block_decode_attention)


def block_attend(layer, q: torch.Tensor, scale: float) -> torch.Tensor:
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
