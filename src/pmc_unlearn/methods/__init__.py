"""Unlearning (and fine-tuning) methods: small objects on the one shared training loop.

A method registers its name, its config dataclass (a section of the run config) and its class
here. See `base.Method` for the interface.
"""

from __future__ import annotations

from pmc_unlearn.config import METHOD_CONFIGS
from pmc_unlearn.methods.base import Method, RunContext
from pmc_unlearn.methods.baselines import BASELINES
from pmc_unlearn.methods.pmc import PMC, PMCConfig
from pmc_unlearn.methods.sft import SFT, SFTConfig

METHODS: dict[str, type[Method]] = {"pmc": PMC, "sft": SFT}
METHOD_CONFIGS.update({"pmc": PMCConfig, "sft": SFTConfig})
METHODS.update({name: cls for name, (cls, _) in BASELINES.items()})  # ga gd npo simnpo idk idkdpo rmu retain_ft scrub
METHOD_CONFIGS.update({name: cfg for name, (_, cfg) in BASELINES.items()})


def register(name: str, cls: type[Method], cfg_cls: type) -> None:
    METHODS[name] = cls
    METHOD_CONFIGS[name] = cfg_cls


__all__ = ["METHODS", "Method", "RunContext", "register"]
