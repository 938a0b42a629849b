# Two commands for a new user: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
VENV_OLDEST ?= .venv-oldest
TORCH ?= torch==2.13.0
# The oldest transformers release we support (setup.cfg: transformers>=5.3,<6); CI tests it too.
TRANSFORMERS_OLDEST ?= transformers==5.3.0

.PHONY: demo test test-oldest smoke lint bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip install -q -e ".[test,demo,plot]"
	touch $@

$(VENV_OLDEST)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/python -m pip install -q $(TORCH) "$(TRANSFORMERS_OLDEST)"
	$(VENV_OLDEST)/bin/python -m pip install -q -e ".[test,demo,plot]" "$(TRANSFORMERS_OLDEST)"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python -m memorizing_hf.demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m ruff check memorizing_hf tests benchmarks training
	$(VENV)/bin/python -m pytest

test-oldest: $(VENV_OLDEST)/.installed
	$(VENV_OLDEST)/bin/python -m pytest -m "not slow" -p no:cacheprovider

smoke: $(VENV)/.installed
	$(VENV)/bin/python training/train.py configs/tiny_smoke.yaml

lint: $(VENV)/.installed
	$(VENV)/bin/python -m ruff check .
	$(VENV)/bin/python -m ruff format --check memorizing_hf

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/bench_retrieval.py

clean:
	rm -rf $(VENV) $(VENV_OLDEST) *.egg-info .pytest_cache .ruff_cache
