"""Unlearning (and fine-tuning) methods: small objects on the one shared training loop.

`REGISTRY` is the one list of methods: name -> (method class, config section dataclass). The
config loader reads the sections from it (`config.load_config(..., registry=METHOD_CONFIGS)`, the
default); the trainer, the demo and sweeps build methods from `METHODS`. Nothing registers itself
on import: a new method is one line here. See `base.Method` for the interface.
"""

from __future__ import annotations

from pmc_unlearn.methods.base import Method, RunContext
from pmc_unlearn.methods.baselines import (
    GAConfig, GDConfig, GradientAscent, GradientDifference, IdkConfig, IdkDPO, IdkDPOConfig, IdkNLL, NPO, NPOConfig,
    RetainFT, RetainFTConfig, RMU, RMUConfig, SCRUB, SCRUBConfig, SimNPO, SimNPOConfig,
)
from pmc_unlearn.methods.pmc import PMC, PMCConfig
from pmc_unlearn.methods.sft import FINETUNE_DEFAULTS, SFT, SFTConfig

REGISTRY: dict[str, tuple[type[Method], type]] = {
    "pmc": (PMC, PMCConfig),
    "sft": (SFT, SFTConfig),  # plain fine-tuning (`pmc-unlearn finetune`), not unlearning
    "ga": (GradientAscent, GAConfig),
    "gd": (GradientDifference, GDConfig),
    "npo": (NPO, NPOConfig),
    "simnpo": (SimNPO, SimNPOConfig),
    "idk": (IdkNLL, IdkConfig),
    "idkdpo": (IdkDPO, IdkDPOConfig),
    "rmu": (RMU, RMUConfig),
    "retain_ft": (RetainFT, RetainFTConfig),
    "scrub": (SCRUB, SCRUBConfig),
}
METHODS: dict[str, type[Method]] = {name: cls for name, (cls, _) in REGISTRY.items()}
METHOD_CONFIGS: dict[str, type] = {name: cfg for name, (_, cfg) in REGISTRY.items()}

__all__ = ["FINETUNE_DEFAULTS", "METHODS", "METHOD_CONFIGS", "REGISTRY", "Method", "RunContext"]
