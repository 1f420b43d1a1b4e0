"""Shared fixtures: everything offline, on tiny random models."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# A fixed thread count: the library otherwise follows the machine's load (pmc_unlearn.cpu), and a
# matmul's summation order, so its last bits, can change with the thread count; the tests that
# compare a resumed run's weights with an uninterrupted one's need the same order in both.
os.environ.setdefault("PMC_UNLEARN_THREADS", str(min(2, os.cpu_count() or 1)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    from pmc_unlearn.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture()
def tiny():
    """A fresh seeded 2-layer random Llama with SmolLM2's tokenizer (milliseconds to build)."""
    from pmc_unlearn.models import load_model

    return load_model("tiny-random")


# Settings that keep a PMC run on tiny-random to a few seconds: short samples, few questions.
FAST = [
    "data.max_forget=6", "train.batch_size=3", "train.grad_accum=1", "train.epochs=2",
    "pmc.n_samples=2", "pmc.max_new_tokens=8", "train.lr=1e-3", "train.save_every=1",
]
