"""TOFU evaluation in two stages: collect per-example records (model), then aggregate (pure).

- `suite`: what is evaluated (`tofu_suite`: splits of items), the greedy settings and the prompt
  format a model is evaluated with (`prompt_format_for`).
- `scoring`: the model part (through `pmc_unlearn.lm`): per-example scores and greedy
  generations, reusable as `answer_nll`, `answer_scores`, `question_scores`, `generate_greedy`.
- `records`: records on disk: the per-split cache, records.jsonl, resuming, sharding over
  processes (`collect_records`).
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
    "collect_records": "records", "answer_nll": "scoring", "answer_scores": "scoring",
    "generate_greedy": "scoring", "tofu_suite": "suite", "rouge_recall": "scoring",
    "EvalItem": "suite", "SplitSpec": "suite", "GenSettings": "suite", "EVAL_FORMAT": "suite",
    "prompt_format_for": "suite",
    "summarize": "metrics", "RetainReference": "metrics", "with_scores": "metrics",
    "read_reference": "reference",
    "write_open_unlearning": "export",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
