"""Which floating-point precision to compute in: decided per device, in this one place.

Every precision setting of the tool accepts `auto`, the default:

- `train.bf16` (autocast in training and the training-time samplers) and `relearning.bf16`
  (the relearning attack's fine-tuning): `auto` = bf16 where the device runs it natively;
- the evaluation's, the attacks' and the sweep's weight dtype (`eval --dtype`, `attack --dtype`,
  the demo's `evaluate.dtype`, a sweep's `eval.dtype`): `auto` = bfloat16 where native, float32
  elsewhere;
- `model.dtype` (the weights that training updates): `auto` = float32 everywhere, because AdamW
  keeps its master weights there; the compute precision comes from `train.bf16`.

"Native" means: CUDA with bf16 support, or a CPU whose oneDNN reports native bf16 (AVX512-BF16
or AMX). Elsewhere torch emulates bf16 matrix products at about 1% of fp32's speed (a 2-core
AVX2 EPYC: 0.8 against 96 GFLOP/s; one bf16-autocast training step 140 s against 6.3 s), so
`auto` never picks it there. An explicit bf16 on such a device still runs, and logs one warning
line with the slowdown measured on this machine (a few-millisecond matmul in each dtype).

The decision and its reason go into every run's `manifest.json` and `summary.json`
(`precision`). Tests patch `cpu_native_bf16` to play either kind of CPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch

from pmc_unlearn.errors import UserError

log = logging.getLogger(__name__)

AUTO = "auto"
WEIGHT_DTYPES = ("auto", "float32", "bfloat16")


def check_run_args(batch_size: int, max_new_tokens: int, dtype: str) -> None:
    """The arguments every evaluation and attack run takes: a UserError naming the bad flag."""
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if dtype not in WEIGHT_DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(WEIGHT_DTYPES)}")
_BF16_WORDS = {"bfloat16", "bf16", True}
_FP32_WORDS = {"float32", "fp32", False}

_cpu_native: bool | None = None
_warned: set[str] = set()


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (oneDNN: AVX512-BF16 or AMX). Cached."""
    global _cpu_native
    if _cpu_native is None:
        try:
            _cpu_native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # torch built without oneDNN
            _cpu_native = False
    return _cpu_native


def native_bf16(device: str | torch.device) -> tuple[bool, str]:
    """(bf16 runs natively on `device`, a short reason naming what was checked)."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return ok, f"CUDA device {'supports' if ok else 'lacks'} bf16"
    if device.type == "cpu":
        ok = cpu_native_bf16()
        cap = torch.backends.cpu.get_cpu_capability()
        return ok, f"CPU {cap}, oneDNN bf16 {'native' if ok else 'emulated'}"
    return False, f"{device.type}: bf16 autocast not used on this device type"


def bf16_slowdown(device: str | torch.device = "cpu", size: int = 128, reps: int = 5) -> float:
    """Time of a [size, size] bf16 matmul over the fp32 one on `device` (best of `reps`)."""
    device = torch.device(device)

    def best(dtype) -> float:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        a @ b  # warm-up
        out = float("inf")
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out = min(out, time.perf_counter() - t)
        return max(out, 1e-7)

    return best(torch.bfloat16) / best(torch.float32)


def _warn_emulated(device: torch.device, what: str) -> None:
    key = device.type
    if key in _warned:
        return
    _warned.add(key)
    ratio = bf16_slowdown(device)
    log.warning("%s asks for bf16, but this %s emulates it (a bf16 matmul measured %.0fx slower than fp32 here); "
                "set it to auto or float32 to run in fp32", what, device.type.upper(), ratio)


def default_device() -> str:
    """Where a model runs when nothing says otherwise: the GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Precision:
    """A resolved precision: what was asked, what runs, and why."""

    setting: str  # what the configuration said: auto, bf16/true, fp32/false, a dtype name
    bf16: bool  # compute (autocast) or weights in bf16
    reason: str

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.bf16 else "float32"

    def as_dict(self) -> dict:
        return {**asdict(self), "dtype": self.dtype}

    @classmethod
    def of_model(cls, model) -> "Precision":
        """The precision of a model the caller loaded (its parameters' dtype, taken as it is)."""
        dt = next(model.parameters()).dtype
        return cls(str(dt).removeprefix("torch."), dt == torch.bfloat16, "the caller's loaded model")


def _norm(setting) -> str | bool:
    if isinstance(setting, str):
        s = setting.strip().lower()
        if s in ("true", "false"):
            return s == "true"
        return s
    return setting


def resolve_bf16(setting, device: str | torch.device, what: str = "train.bf16") -> Precision:
    """`auto` | true/bf16 | false/fp32 -> whether to compute in bf16 on `device`."""
    device = torch.device(device)
    s = _norm(setting)
    native, why = native_bf16(device)
    if s == AUTO:
        return Precision("auto", native, f"auto: {why}")
    if s in _BF16_WORDS:
        if device.type not in ("cpu", "cuda"):
            return Precision("bf16", False, f"bf16 asked for, but {why}")
        if not native:
            _warn_emulated(device, what)
            return Precision("bf16", True, f"bf16 asked for ({why}: slow here)")
        return Precision("bf16", True, f"bf16 asked for ({why})")
    if s in _FP32_WORDS:
        return Precision("fp32", False, "fp32 asked for")
    raise UserError(f"{what}={setting!r}: choose auto, true (bf16) or false (fp32)")


def resolve_dtype(setting, device: str | torch.device, what: str = "dtype", training: bool = False) -> Precision:
    """A weights dtype setting (`auto`, `float32`, `bfloat16`) -> the dtype to load on `device`.

    `training=True` (model.dtype): `auto` keeps float32 master weights whatever the device.
    """
    s = _norm(setting)
    if s == AUTO:
        if training:
            return Precision("auto", False, "auto: float32 master weights (compute precision: train.bf16)")
        p = resolve_bf16(AUTO, device, what)
        return Precision("auto", p.bf16, p.reason)
    if s in ("bfloat16", "bf16"):
        p = resolve_bf16(True, device, what)
        return Precision("bfloat16", p.bf16, p.reason)
    if s in ("float32", "fp32"):
        return Precision("float32", False, "float32 asked for")
    raise UserError(f"{what}={setting!r}: choose one of {', '.join(WEIGHT_DTYPES)}")
