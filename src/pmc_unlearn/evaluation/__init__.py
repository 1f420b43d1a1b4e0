"""TOFU evaluation in two stages: collect per-example records (model), then aggregate (pure).

- `collect`: the model part (records, caching, resuming, sharding) and reusable helpers
  `answer_nll`, `answer_scores`, `generate_greedy`, `collect_records`, `tofu_suite`.
- `scores`: per-example scores from token log-probs (Min-K%, Min-K%++, ZLib, EM, ES, truth ratio),
  under either convention (open-unlearning, the default, or pmc-unlearn; docs/metrics.md).
- `metrics`: aggregation of records into summary numbers (both families); `with_scores` derives
  the per-example scores of a convention from the records' per-token lists.
- `reference`: reading the retain model's records for forget quality and PrivLeak.
- `export`: open-unlearning's TOFU_EVAL.json / TOFU_SUMMARY.json.
- `api.evaluate`: everything for one model; `cli`: the `pmc-unlearn eval` command.

Attributes are imported lazily so that `pmc-unlearn --help` does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate": "api",
    "collect_records": "collect", "answer_nll": "collect", "answer_scores": "collect",
    "generate_greedy": "collect", "tofu_suite": "collect", "rouge_recall": "collect",
    "EvalItem": "collect", "SplitSpec": "collect", "GenSettings": "collect", "Generation": "collect",
    "EVAL_FORMAT": "collect",
    "summarize": "metrics", "RetainReference": "metrics", "with_scores": "metrics",
    "read_reference": "reference",
    "write_open_unlearning": "export",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
