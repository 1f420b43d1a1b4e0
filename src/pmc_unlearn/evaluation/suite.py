"""What TOFU evaluation runs on: the splits of the suite, their items, and the prompt format.

Pure definitions (no model): `tofu_suite` lists the splits for one forget split (`SplitSpec`s
of `EvalItem`s and what to compute on each), `GenSettings` the greedy decoding, and
`prompt_format_for` the prompt format a model is evaluated with. `evaluation.scoring` runs the
model on them, `evaluation.records` caches and collects the records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmc_unlearn.data import TOFU_SPLITS, load_qa, load_rows
from pmc_unlearn.errors import UserError
from pmc_unlearn.evaluation import metrics as M
from pmc_unlearn.formatting import PromptFormat

FORGET_SPLITS = ("forget01", "forget05", "forget10")
RETAIN_SAMPLES = ("perturbed", "rng400")
RNG400_SEED, RNG400_SIZE = 12345, 400
EVAL_FORMAT = PromptFormat(max_length=512)  # TOFU answers fit; longer ones are cut and counted ("truncated")

Record = dict[str, Any]


def prompt_format_for(model, fmt: PromptFormat | None = None, default: PromptFormat | None = None) -> PromptFormat:
    """The prompt format to evaluate `model` with: `fmt` when given; else the one saved beside a
    model folder we trained (pmc_unlearn_prompt.json: the format it learned with, at the
    evaluation's max_length); else `default`, else EVAL_FORMAT."""
    if fmt is not None:
        return fmt
    from pmc_unlearn.models import saved_prompt_format

    saved = saved_prompt_format(str(model)) if isinstance(model, (str, Path)) else None
    if saved:
        return PromptFormat(saved["use_chat_template"], saved["system_prompt"], EVAL_FORMAT.max_length)
    return default or EVAL_FORMAT


@dataclass
class EvalItem:
    """One question with its ground truth and (optionally) the paraphrased and perturbed answers."""

    index: int
    question: str
    answer: str
    para_answer: str | None = None
    pert_answers: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # copied into the record (e.g. source_index)


@dataclass
class SplitSpec:
    """A named list of items and what to compute on them."""

    name: str
    source: str  # where the items come from; part of the cache key
    items: list[EvalItem]
    nll: bool = True  # answer / paraphrase / perturbed NLL, EM, ES and MIA scores
    generate: bool = True  # greedy generation and ROUGE
    # "qa": the question goes through the prompt format. "text" (MUSE-News): the question is raw
    # text continued as is (no template), and the NLL part scores the answer as a plain document
    # (its NLL and Min-K%, no question).
    mode: str = "qa"
    max_new_tokens: int | None = None  # this split's generation limit (None: the run's GenSettings)
    first_line: bool = False  # cut the generation at its first line break (KnowMem's one-line answers)


@dataclass(frozen=True)
class GenSettings:
    """Greedy decoding settings (the prompt alone as input, cut at EOS)."""

    max_new_tokens: int = 200


def holdout_for(forget_split: str) -> str:
    return "holdout" + forget_split.removeprefix("forget")


def retain_for(forget_split: str) -> str:
    """retainXX whose union with forgetXX is `full` (retain99 for forget01): what the PMC authors sample from."""
    return f"retain{100 - int(forget_split.removeprefix('forget'))}"


def rng400_indices(n_rows: int, seed: int = RNG400_SEED, size: int = RNG400_SIZE) -> list[int]:
    """The PMC authors' retain sample: numpy default_rng(12345).integers(0, n_rows, 400), with replacement."""
    import numpy as np

    return [int(i) for i in np.random.default_rng(seed).integers(0, n_rows, size)]


def tofu_suite(forget_split: str, retain_sample: str = "perturbed", max_examples: int | None = None) -> list[SplitSpec]:
    """The TOFU evaluation splits for one forget split (first `max_examples` rows of each when given)."""
    if forget_split not in FORGET_SPLITS:
        raise UserError(f"--forget-split {forget_split}: choose one of {', '.join(FORGET_SPLITS)}")
    if retain_sample not in RETAIN_SAMPLES:
        raise UserError(f"--retain-sample {retain_sample}: choose one of {', '.join(RETAIN_SAMPLES)}")
    if max_examples is not None and max_examples < 1:
        raise UserError(f"--max-examples {max_examples}: must be at least 1 (or left out for every example)")
    cut = (lambda xs: xs[:max_examples]) if max_examples else (lambda xs: xs)

    def perturbed(split: str, with_para: bool) -> list[EvalItem]:
        rows = load_rows(f"tofu:{split}")
        return [EvalItem(i, r["question"], r["answer"], r["paraphrased_answer"] if with_para else None,
                         list(r["perturbed_answer"])) for i, r in enumerate(cut(rows))]

    fsrc = f"tofu:{forget_split}_perturbed"
    frows = cut(load_rows(fsrc))
    specs = [
        SplitSpec(M.FORGET, fsrc, perturbed(f"{forget_split}_perturbed", True)),
        SplitSpec(M.FORGET_PARA, fsrc + "#paraphrased",
                  [EvalItem(i, r["paraphrased_question"], r["paraphrased_answer"]) for i, r in enumerate(frows)],
                  nll=False),
        SplitSpec(M.RETAIN, "tofu:retain_perturbed", perturbed("retain_perturbed", True)),
    ]
    if retain_sample == "rng400":
        rsplit = retain_for(forget_split)
        rows = load_qa(f"tofu:{rsplit}")
        idx = rng400_indices(len(rows))
        specs.append(SplitSpec(
            M.RETAIN_SAMPLE, f"tofu:{rsplit}#rng{RNG400_SEED}x{RNG400_SIZE}",
            [EvalItem(i, rows[j]["question"], rows[j]["answer"], extra={"source_index": j})
             for i, j in enumerate(cut(idx))],
            nll=False))
    specs += [
        SplitSpec(M.REAL_AUTHORS, "tofu:real_authors_perturbed", perturbed("real_authors_perturbed", False)),
        SplitSpec(M.WORLD_FACTS, "tofu:world_facts_perturbed", perturbed("world_facts_perturbed", False)),
    ]
    hsplit = holdout_for(forget_split)
    assert hsplit in TOFU_SPLITS
    specs.append(SplitSpec(M.HOLDOUT, f"tofu:{hsplit}",
                           [EvalItem(i, r["question"], r["answer"]) for i, r in enumerate(cut(load_qa(f"tofu:{hsplit}")))],
                           generate=False))
    return specs

