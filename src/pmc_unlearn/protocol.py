"""Named protocols: a published run's settings in one YAML (configs/protocol-NAME.yaml).

`--protocol NAME[:VARIANT]` on `pmc-unlearn finetune`, `unlearn` and `eval` applies them. A
protocol file holds `common` settings per command and `variants` (one per model family of the
publication, e.g. phi-1.5 and llama-3.2-3b-instruct), each with the `model_types` (config.json
`model_type`) it is chosen for when no variant is named. For `finetune` and `unlearn` the
settings are config sections (the layer above the built-in defaults, below --config, flags and
overrides); for `eval` they are the command's options (`retain_sample`, `max_new_tokens`).

Only `pmc-paper` ships (the PMC authors' README rows, docs/reproduce.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pmc_unlearn.errors import UserError
from pmc_unlearn.sections import deep_merge

PROTOCOLS = ("pmc-paper",)
COMMANDS = ("finetune", "unlearn", "eval")


@dataclass
class Protocol:
    """A protocol's settings for one command and one variant."""

    name: str
    variant: str
    command: str
    settings: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.name}:{self.variant}"

    def describe(self) -> str:
        """The settings as YAML under a one-line heading (printed by the commands)."""
        body = yaml.safe_dump(self.settings, sort_keys=False, default_flow_style=False).rstrip()
        return f"protocol {self.label} ({self.command}) sets:\n" + "\n".join("  " + ln for ln in body.splitlines())


def protocol_file(name: str) -> Path:
    return Path(str(resources.files("pmc_unlearn") / "configs" / f"protocol-{name}.yaml"))


def model_type(model: str) -> str | None:
    """config.json's model_type of a model alias, folder or cached hub id (None when it cannot be read offline)."""
    from pmc_unlearn.models import ALIASES

    if model in ALIASES:  # both aliases are Llama-architecture models
        return "llama"
    p = Path(model).expanduser() / "config.json"
    if p.exists():
        try:
            return json.loads(p.read_text()).get("model_type")
        except (OSError, json.JSONDecodeError):
            return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model).model_type
    except Exception:  # noqa: BLE001  (offline, not a model: the caller asks for an explicit variant)
        return None


def load(spec: str, command: str, model: str | None) -> Protocol:
    """The settings of `spec` ("pmc-paper" or "pmc-paper:phi-1.5") for `command`, the variant chosen
    by name or by `model`'s model_type."""
    if command not in COMMANDS:
        raise ValueError(f"protocol for unknown command {command!r}")
    name, _, variant = spec.partition(":")
    if name not in PROTOCOLS:
        raise UserError(f"--protocol {spec}: unknown protocol; choose one of {', '.join(PROTOCOLS)}")
    raw = yaml.safe_load(protocol_file(name).read_text())
    variants: dict[str, dict] = raw["variants"]
    if variant:
        if variant not in variants:
            raise UserError(f"--protocol {spec}: unknown variant {variant!r}; choose {name}:"
                            f"{f' or {name}:'.join(variants)}")
    else:
        mt = model_type(model) if model else None
        found = [v for v, d in variants.items() if mt in d.get("model_types", [])]
        if len(found) != 1:
            what = f"model_type {mt!r}" if mt else "a model type that cannot be read"
            raise UserError(f"--protocol {spec}: {model or 'the model'} has {what}, which picks no single variant; "
                            f"name one: {', '.join(f'{name}:{v}' for v in variants)}")
        variant = found[0]
    settings = deep_merge(raw.get("common", {}).get(command, {}) or {}, variants[variant].get(command, {}) or {})
    return Protocol(name, variant, command, settings)
