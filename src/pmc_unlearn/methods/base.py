"""The method interface and the context the training loop hands to methods.

The loop (pmc_unlearn.trainer) owns data order, micro-batches, the optimizer, checkpoints and
logging. A method only says what to do with a micro-batch of primary-set indices:

    configure_model(model)      optional: before the optimizer exists (freeze weights)
    setup(ctx)                  once, before training (PMC: greedy reference answers);
                                skipped state is restored from a checkpoint instead
    on_epoch_start(ctx, epoch)  optional hook
    prepare(ctx, idx, ridx)     build the batch (PMC samples and selects here) -> Prepared
    loss(ctx, model, prepared)  -> (scalar loss, {log key: float}); runs under autocast, on a
                                batch the loop has put on the device; the model is scored
                                through `lm.score_batch` and the loss math is in `losses`
    state_dict / load_state_dict  whatever must survive a crash (PMC: references, memory)
    time_limit(ctx)             optional: training wall-time limit in seconds (0: none); read
                                by the loop after setup (retain_ft: a matched run's time)

and declares how the loop logs it:

    stat_merge                  {stat: "sum" | "min" | "max" | "last"} for stats in
                                Prepared.stats that are not averaged over the micro-batches of
                                an optimizer step and over processes (the default: the mean)
    progress_stats              stats shown in the progress bar after the loss

`idx` are indices into the primary set (the forget set for unlearning, the training set for
fine-tuning); `ridx` are retain indices drawn by the loop, one per primary index.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from pmc_unlearn.formatting import PromptFormat


def derive_seed(*keys: Any) -> int:
    """A 31-bit seed from any keys (seed, step, example, ...): same keys, same seed, any process."""
    h = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


@dataclass
class RunContext:
    cfg: Any  # RunConfig
    model: Any  # possibly wrapped by accelerate (DDP/FSDP)
    tokenizer: Any
    fmt: PromptFormat
    primary: list[dict]
    retain: list[dict]
    accelerator: Any
    sampler: Any = None  # a sampler handed to train() (benchmarks); methods that sample use it, else build their own
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro: int = 0  # micro-batch index within the epoch
    write_samples: Callable[[list[dict]], None] = lambda rows: None
    bf16: bool = False  # the loop's resolved autocast (train.bf16 on this device)
    weights_dtype: str = "float32"  # the resolved model.dtype

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def raw_model(self):
        return self.accelerator.unwrap_model(self.model)

    def gather(self, obj: list) -> list:
        """Concatenate a list from every process (identity with one process)."""
        if self.accelerator.num_processes == 1:
            return obj
        from accelerate.utils import gather_object

        return gather_object(obj)


@dataclass
class Prepared:
    batch: dict[str, torch.Tensor]  # collated tensors (right-padded), forget rows first
    n_primary: int  # rows [0, n_primary) are primary-set rows, the rest retain rows
    stats: dict[str, float] = field(default_factory=dict)
    tokens: int = 0  # answer tokens trained on (for throughput)
    samples: int = 0  # answers generated to build this batch (for throughput: perf/samples_per_s)


class Method:
    name = "base"
    uses_primary_answers = True  # PMC: False (it never reads the forget answers)
    uses_retain = True
    stat_merge: ClassVar[dict[str, str]] = {}
    progress_stats: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg):
        self.cfg = cfg

    def configure_model(self, model) -> None:
        """Called once before the optimizer is built: freeze weights here (e.g. RMU trains a few layers)."""

    def setup(self, ctx: RunContext) -> None:
        pass

    def on_epoch_start(self, ctx: RunContext, epoch: int) -> None:
        pass

    def prepare(self, ctx: RunContext, idx: list[int], ridx: list[int]) -> Prepared:
        raise NotImplementedError

    def loss(self, ctx: RunContext, model, prep: Prepared) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def time_limit(self, ctx: RunContext) -> float:
        """Training wall-time limit in seconds (0: none), read once after `setup`: train.max_time_s."""
        return ctx.cfg.train.max_time_s

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def manifest_info(self) -> dict:
        """Extra facts for manifest.json (e.g. a reference model's memory cost)."""
        return {}

