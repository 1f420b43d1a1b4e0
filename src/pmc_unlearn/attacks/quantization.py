"""Quantization: re-evaluate forget recall after 8-bit and 4-bit weight quantization.

Unlearning by small weight changes can sit below the quantization step: rounding the weights
to 8 or 4 bits may snap them back towards the original model, and the forgotten answers return
(Zhang et al. 2024, "Catastrophic failure of LLM unlearning via quantization"). Knowledge that
comes back was hidden, not removed.

What is quantized: the weights of every `nn.Linear` except the output head (`lm_head`, kept in
full precision as the Hugging Face quantizers do; `quantization.skip_lm_head=false` includes it),
weight-only (activations stay in float), symmetric round-to-nearest:
- 8-bit: one scale per output channel;
- 4-bit: one scale per group of `group_size_4bit` input columns of each output channel (32 by
  default; 0 = per output channel), as 4-bit schemes do (per channel is too coarse at 4 bits).
scale = max|w| / ((qmax - qmin) / 2), q = clamp(round(w / scale), qmin, qmax) with
[qmin, qmax] = [-128, 127] or [-8, 7]: torchao's symmetric mapping.

Backends: `torchao` (PyTorch's maintained quantization library; pinned in requirements.lock)
when importable: `Int8WeightOnlyConfig()` for 8-bit and `IntxWeightOnlyConfig(torch.int4,
PerGroup(g) | PerAxis(0))` for 4-bit, both of which run on CPU (torchao's `Int4WeightOnlyConfig`
needs CUDA kernels (mslk), so it is not used). `rtn`: the same rounding done here in plain
torch (`rtn_quantize`: the weights are replaced by their dequantized values), used when torchao
is missing or `quantization.backend=rtn`. attacks.json records which one ran and why.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from pmc_unlearn.attacks.common import AttackContext, AttackResult, Timer
from pmc_unlearn.attacks.pure import mean
from pmc_unlearn.sections import opt
from pmc_unlearn.errors import UserError
from pmc_unlearn.rewards import rougeL_recall

BITS = (8, 4)


@dataclass
class Settings:
    bits: list[int] = opt([8, 4], "weight bit widths to try, each on a fresh copy (a YAML list of 8 and/or 4)")
    backend: str = opt("auto", "auto (torchao when importable, else rtn), torchao, or rtn (plain-torch round-to-nearest)",
                       choices=("auto", "torchao", "rtn"))
    group_size_4bit: int = opt(32, "4-bit: input columns sharing one scale (0: one scale per output channel)", min=0)
    skip_lm_head: bool = opt(True, "keep the output head (lm_head) in full precision")

    def validate(self) -> None:
        if not self.bits or any(b not in BITS for b in self.bits) or len(set(self.bits)) != len(self.bits):
            raise UserError(f"quantization.bits={self.bits!r}: give a list of distinct values from 8, 4")
        if self.backend == "torchao":
            ok, why = torchao_status()
            if not ok:
                raise UserError(f"quantization.backend=torchao: {why}; install it (pip install -r requirements.lock) "
                                "or use quantization.backend=rtn")


_TORCHAO: tuple[bool, str] | None = None


def torchao_status() -> tuple[bool, str]:
    """(importable, version or the import error). Its CUDA-only extensions' load warnings are silenced on CPU."""
    global _TORCHAO
    if _TORCHAO is None:
        quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        try:
            import torchao
            import torchao.quantization  # noqa: F401

            _TORCHAO = (True, f"torchao {torchao.__version__}")
        except (ImportError, OSError, RuntimeError) as e:
            _TORCHAO = (False, f"torchao is not importable ({type(e).__name__}: {e})")
        finally:
            for lg, lv in zip(quiet, levels):
                lg.setLevel(lv)
    return _TORCHAO


def backend_used(s: Settings) -> tuple[str, str]:
    """(backend, why) for attacks.json."""
    ok, info = torchao_status()
    if s.backend == "rtn":
        return "rtn", "quantization.backend=rtn was asked for"
    if ok:
        return "torchao", f"{info}: maintained library, weight-only int8/int4 configs run on CPU"
    return "rtn", f"{info}; fell back to plain-torch round-to-nearest (same rounding as torchao's symmetric mapping)"


def _targets(model, skip_lm_head: bool) -> list[tuple[str, torch.nn.Linear]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not (skip_lm_head and n.split(".")[-1] == "lm_head")]


def group_for(bits: int, group_size_4bit: int) -> int:
    """Group size along input columns; 0 = one scale per output channel."""
    return group_size_4bit if bits == 4 else 0


def check(ctx: AttackContext, s: Settings) -> None:
    """Model-dependent checks, before any attack runs: group size must divide every layer's width."""
    if 4 in s.bits and s.group_size_4bit:
        for n, m in _targets(ctx.model, s.skip_lm_head):
            if m.in_features % s.group_size_4bit:
                raise UserError(f"quantization.group_size_4bit={s.group_size_4bit}: does not divide the width "
                                f"{m.in_features} of {n}; choose a divisor (or 0: per channel)")


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int = 0) -> torch.Tensor:
    """Symmetric round-to-nearest weight quantization, returned dequantized (same shape and dtype).

    w [out, in]; one scale per output row (group_size 0) or per `group_size` consecutive columns
    of a row. scale = max|w| / ((qmax - qmin) / 2); q = clamp(round(w / scale), qmin, qmax),
    round half to even. Example, 4 bits, one group: [1.5, -0.75, 0.3, 0.0] -> scale 0.2 ->
    [7.5, -3.75, 1.5, 0] -> [7 (8 clamped), -4, 2, 0] -> [1.4, -0.8, 0.4, 0.0].
    """
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out_f, in_f = w.shape
    g = group_size or in_f
    if in_f % g:
        raise ValueError(f"group size {g} does not divide {in_f}")
    x = w.detach().float().reshape(out_f, in_f // g, g)  # [out, groups, g]
    scale = x.abs().amax(-1, keepdim=True) / ((qmax - qmin) / 2)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(x / scale), qmin, qmax)
    return (q * scale).reshape(out_f, in_f).to(w.dtype)


def _rel_error(w: torch.Tensor, deq: torch.Tensor) -> float:
    return float((deq.float() - w.float()).norm() / w.float().norm().clamp(min=1e-12))


def quantize_copy(model, bits: int, s: Settings, backend: str) -> tuple[torch.nn.Module, dict]:
    """A quantized deep copy of `model` and facts about it (layers, mean relative weight error, config)."""
    q = copy.deepcopy(model).eval()
    for p in q.parameters():
        p.requires_grad_(False)
    targets = _targets(q, s.skip_lm_head)
    originals = {n: m.weight.detach().clone() for n, m in targets}
    g = group_for(bits, s.group_size_4bit)
    if backend == "torchao":
        torchao_status()
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup

        if bits == 8:
            cfg = Int8WeightOnlyConfig()
        else:
            cfg = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(g) if g else PerAxis(0))
        names = set(originals)
        quantize_(q, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn in names)
        errs = []
        for n, m in _targets(q, s.skip_lm_head):
            deq = getattr(m.weight, "dequantize", None)
            if deq is not None:
                errs.append(_rel_error(originals[n], deq()))
        desc = repr(cfg)
    else:
        errs = []
        with torch.no_grad():
            for n, m in targets:
                new = rtn_quantize(m.weight, bits, g)
                errs.append(_rel_error(originals[n], new))
                m.weight.copy_(new)
        desc = f"rtn_quantize(bits={bits}, group_size={g})"
    return q, {"layers_quantized": len(targets), "weight_rel_error_mean": mean(errs), "config": desc,
               "group_size": g or "per_channel"}


def run(ctx: AttackContext, s: Settings) -> AttackResult:
    backend, why = backend_used(s)
    items = ctx.forget_items
    base = ctx.baseline_recall()
    by_bits, records = {}, []
    for bits in s.bits:
        with Timer() as t:
            qm, info = quantize_copy(ctx.model, bits, s, backend)
            gens = ctx.greedy([it.question for it in items], model=qm, desc=f"quantized {bits}-bit")
            rs = [rougeL_recall(it.answer, g.text) for it, g in zip(items, gens)]
            del qm
        by_bits[str(bits)] = {"forget_rougeL_recall": mean(rs), **info, "time_s": round(t.s, 3)}
        records += [{"bits": bits, "index": it.index, "question": it.question, "answer": it.answer,
                     "generation": g.text, "rougeL_recall": r, "hit_limit": g.hit_limit}
                    for it, g, r in zip(items, gens, rs)]
    worst = max(by_bits.values(), key=lambda v: v["forget_rougeL_recall"])
    m = {"forget_rougeL_recall_baseline": base, "by_bits": by_bits,
         "forget_rougeL_recall_max_over_bits": worst["forget_rougeL_recall"]}
    return AttackResult(
        m, {"metric": "forget_rougeL_recall_max_over_bits", "value": worst["forget_rougeL_recall"], "reference": base,
            "reference_name": "greedy forget ROUGE-L recall of the unquantized model"},
        records, {"backend": backend, "backend_reason": why}, len(items))
