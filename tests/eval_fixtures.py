"""Fixtures for the evaluation tests (imported by tests/test_eval_*.py; kept out of conftest.py).

The eval record cache goes to a temporary folder for the whole session, so tests never read
results cached by an earlier run and never write into the user's cache.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory):
    """Point PMC_UNLEARN_EVAL_CACHE at a fresh folder for the session."""
    d = tmp_path_factory.mktemp("eval-cache")
    old = os.environ.get("PMC_UNLEARN_EVAL_CACHE")
    os.environ["PMC_UNLEARN_EVAL_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("PMC_UNLEARN_EVAL_CACHE", None)
    else:
        os.environ["PMC_UNLEARN_EVAL_CACHE"] = old


@pytest.fixture(scope="session")
def tiny(eval_cache):
    """The seeded random 2-layer Llama (fp32, CPU) with SmolLM2's tokenizer."""
    from pmc_unlearn.models import load_model

    lm = load_model("tiny-random")
    lm.model.eval()
    return lm
