"""Attacks on an unlearned model: does the forgotten knowledge come back under pressure?

One module per attack (see docs/attacks.md and docs/metrics.md, "Leakage under attack"):
- `sampling`: k samples per forget question; mean and worst-case ROUGE-L recall;
- `prefill`: the answer is started for the model ("The answer is:"), then greedy;
- `paraphrase`: TOFU's paraphrased forget questions;
- `relearning`: a short fine-tune on half the forget authors (and on retain only), measured on the rest;
- `quantization`: 8-bit and 4-bit weights (torchao, or a plain-torch round-to-nearest fallback);
- `least_likely`: picking the least likely of the true and perturbed answers.
`pure` holds the model-free parts (aggregation, option ranking, author split, prefix handling);
`common` the shared model context; `api.run_attacks` runs any subset and writes attacks.json;
`cli` is `pmc-unlearn attack`.

Attributes are imported lazily so that `pmc-unlearn --help` does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "run_attacks": "api", "read_attacks": "api", "read_attack_records": "api", "ATTACK_NAMES": "api",
    "ATTACKS_FILE": "api", "RECORDS_FILE": "api", "settings_help": "api",
    "aggregate_samples": "pure", "aggregate_options": "pure", "author_split": "pure", "prefix_text": "pure",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
