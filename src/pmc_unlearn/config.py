"""Typed run configuration: dataclasses, YAML files and `section.key=value` overrides.

Every field carries a help text (`pmc-unlearn unlearn --help-config` prints them). Unknown
sections or keys and out-of-range values raise `UserError` before any work starts. The resolved
config is written as `config.yaml` next to every output and is what `--resume` reads back.

Method-specific sections (`pmc:`, the baselines' sections, `sft:`) come from the method registry
(`pmc_unlearn.methods.REGISTRY`, or the `registry` given to `load_config`); only the active
method's section is kept in the resolved config. The typed-section machinery (`opt`,
`build_section`, overrides, the YAML loader) is `pmc_unlearn.sections`, shared with sweeps, demo
profiles and attack settings.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pmc_unlearn.errors import UserError
from pmc_unlearn.sections import build_section, deep_merge, load_yaml, opt, parse_overrides

log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    name: str = opt("smollm2-135m", "model to start from: a local HF folder, a hub id, or an alias (smollm2-135m, tiny-random)")
    dtype: str = opt("auto", "weights that training updates: auto (float32 master weights on every device; the compute "
                     "precision is train.bf16), float32, or bfloat16 (warns where the device emulates bf16)",
                     choices=("auto", "float32", "bfloat16"))
    lora: bool = opt(False, "train LoRA adapters (peft) instead of all weights; the output has the adapter and a merged copy")
    lora_r: int = opt(16, "LoRA rank", min=1)
    lora_alpha: int = opt(32, "LoRA alpha", min=1)
    lora_dropout: float = opt(0.05, "LoRA dropout", min=0.0, max=1.0)
    lora_target_modules: str = opt("all-linear", "peft target_modules (comma-separated names or all-linear)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")


@dataclass
class DataConfig:
    forget: str = opt("tofu:forget01", "forget set (questions; answers are not needed by PMC): tofu:<split>, a .json/.jsonl/.csv/.parquet file, or a hub dataset")
    retain: str = opt("tofu:retain99", "retain set (question/answer pairs) in the same forms")
    question_key: str = opt("question", "column holding the questions")
    answer_key: str = opt("answer", "column holding the answers")
    use_chat_template: bool = opt(True, "use the tokenizer's chat template when it has one (else 'Question: {q}\\nAnswer: {a}')")
    system_prompt: str | None = opt(None, "system prompt for chat templates (null: the template's default)")
    max_length: int = opt(200, "max prompt + answer tokens (the authors' 200); longer answers are cut and counted", min=8)
    max_forget: int = opt(0, "use only the first N forget questions (0: all; text sources: the first N documents)", min=0)
    text_prefix_tokens: int = opt(32, "text sources (plain documents, e.g. muse-news:forget): tokens of each chunk's prefix, "
                                      "PMC's 'question' (chunks are data.max_length tokens; docs/muse.md)", min=1)


@dataclass
class TrainConfig:
    epochs: float = opt(40.0, "passes over the forget set (authors: 40 for Phi-1.5)", gt=0.0)
    max_steps: int = opt(-1, "stop after this many optimizer steps (-1: run all epochs)", min=-1, not_zero=True)
    batch_size: int = opt(16, "forget questions per micro-batch, per process (authors: 16)", min=1)
    grad_accum: int = opt(4, "micro-batches per optimizer step (authors: 4). Steps never straddle an epoch, so a forget "
                          "set smaller than batch_size x grad_accum (forget01: 40) gets one step per epoch: lower it there", min=1)
    lr: float = opt(5e-5, "peak learning rate (AdamW, linear warm-up then linear decay to 0). The authors use 1e-5 for "
                    "Phi-1.5 (1.3B); the default model here is 10x smaller and needs a larger step (fine-tuning it on TOFU "
                    "took lr 1e-4 to memorise in 5 epochs), so 5e-5", gt=0.0)
    weight_decay: float = opt(0.01, "AdamW weight decay", min=0.0)
    warmup_epochs: float = opt(1.0, "linear warm-up length in epochs (authors: 1)", min=0.0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)", min=0.0)
    step_count: str = opt("epochs", "how epochs become optimizer steps: epochs (ceil(N / batch) micro-batches per epoch, "
                          "steps never straddle an epoch) or authors (the PMC authors' / TOFU's trainer: "
                          "int(epochs x N) // (batch x grad_accum) steps, warm-up max(1, N // (batch x grad_accum)) "
                          "per warm-up epoch)", choices=("epochs", "authors"))
    bf16: bool | str = opt("auto", "bf16 autocast for forward/backward and sampling (fp32 master weights): auto (bf16 "
                            "where the device runs it natively: CUDA, or a CPU with AVX512-BF16/AMX; about 1.6x faster "
                            "there), true, or false. An explicit true on a CPU that emulates bf16 (e.g. AVX2 only: about "
                            "100x slower) runs and warns", auto=True)
    max_time_s: float = opt(0.0, "stop after this much training wall time in seconds (0: no limit); the learning rate then decays over the time or the steps, whichever ends first; e.g. retain_ft for the same time as a PMC run", min=0.0)
    sampler: str = opt("fast", "sampling backend: fast (our decode loop: prefill once per prompt, no full-vocab sort), "
                        "static (fast on a static KV cache shared by a prompt's samples, a CUDA graph on GPU; Llama-like models), "
                        "hf (plain transformers generate), vllm (optional extra)", choices=("fast", "static", "hf", "vllm"))
    seed: int = opt(0, "seed for data order, retain draws and sampling (all derived deterministically)")
    save_every: int = opt(0, "checkpoint every N optimizer steps (0: at the end of every epoch; -1: never, "
                             "for runs of a minute or two: a crash restarts the run)", min=-1)
    keep_checkpoints: int = opt(1, "how many checkpoints to keep", min=1)
    log_every: int = opt(1, "write a log.jsonl line every N optimizer steps", min=1)


@dataclass
class RunConfig:
    method: str = "pmc"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: dict[str, Any] = field(default_factory=dict)  # section name -> method config dataclass
    protocol: str | None = None  # e.g. "pmc-paper:phi-1.5": the protocol whose settings were applied (protocol.py)

    @property
    def method_cfg(self):
        return self.methods[self.method]

    @property
    def primary_data(self) -> str:
        """The data a run trains on first: the method's own `data` key (sft), else the forget set."""
        return getattr(self.method_cfg, "data", None) or self.data.forget

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.method}
        if self.protocol:
            d["protocol"] = self.protocol
        for sec in ("model", "data", "train"):
            d[sec] = dataclasses.asdict(getattr(self, sec))
        if self.method in self.methods:
            d[self.method] = dataclasses.asdict(self.methods[self.method])
        return d


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    method: str | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    defaults: dict[str, dict[str, Any]] | None = None,
    registry: Mapping[str, type] | None = None,
) -> RunConfig:
    """Resolve a config: built-in defaults < `defaults` < YAML file < `extra` (CLI flags) < overrides.

    `registry`: method name -> its config section dataclass; None takes the package's
    (`pmc_unlearn.methods.METHOD_CONFIGS`).
    """
    if registry is None:
        from pmc_unlearn.methods import METHOD_CONFIGS as registry
    raw = load_yaml(path) if path else {}
    layers: list[dict[str, Any]] = [defaults or {}, raw, extra or {}, parse_overrides(overrides or [])]
    chosen = method or next((layer["method"] for layer in reversed(layers) if isinstance(layer.get("method"), str)), None)
    cfg = RunConfig(method=chosen or "pmc")
    proto = next((layer["protocol"] for layer in reversed(layers) if isinstance(layer.get("protocol"), str)), None)
    cfg.protocol = proto
    if cfg.method not in registry:
        raise UserError(f"--method {cfg.method}: unknown method; choose one of {', '.join(sorted(registry))}")
    if "data" in {f.name for f in dataclasses.fields(registry[cfg.method])}:
        layers = own_data_key(layers, cfg.method)
    sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, **registry}
    for layer in layers:
        for sec, values in layer.items():
            if sec in ("method", "protocol"):
                continue
            if sec not in sections:
                raise UserError(f"unknown config section '{sec}'; known: method, {', '.join(sections)}")
            if sec in registry:
                if sec != cfg.method:
                    raise UserError(f"config section '{sec}' is for method {sec}, but the method is {cfg.method}; drop it or pass --method {sec}")
                cfg.methods[sec] = build_section(sections[sec], sec, values, cfg.methods.get(sec))
            else:
                build_section(sections[sec], sec, values, getattr(cfg, sec))
    if cfg.method not in cfg.methods:
        cfg.methods[cfg.method] = build_section(registry[cfg.method], cfg.method, {})
    return cfg


def own_data_key(layers: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    """Layers with an older config's `data.forget` moved to `<method>.data`, for a method whose section
    has its own training data key (sft: `finetune --data`); unchanged when any layer gives that key."""
    if any(isinstance(layer.get(method), dict) and "data" in layer[method] for layer in layers):
        return layers
    out = []
    for layer in layers:
        data = layer.get("data")
        if isinstance(data, dict) and "forget" in data:
            log.warning("data.forget as the training data of %s is deprecated: the key is %s.data now "
                        "(read as %s.data=%s)", method, method, method, data["forget"])
            layer = {**layer, "data": {k: v for k, v in data.items() if k != "forget"}}
            layer = deep_merge(layer, {method: {"data": data["forget"]}})
        out.append(layer)
    return out


def dump_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
