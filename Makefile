# Two commands for a new user: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
VENV_OLDEST ?= .venv-oldest
TORCH ?= torch==2.13.0
# The oldest transformers release we support (setup.cfg: transformers>=5.3,<5.26); CI tests it too.
TRANSFORMERS_OLDEST ?= transformers==5.3.0

.PHONY: demo test test-oldest test-next smoke lint bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip install -q -e ".[test,experiments]"
	touch $@

$(VENV_OLDEST)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/python -m pip install -q $(TORCH) "$(TRANSFORMERS_OLDEST)"
	$(VENV_OLDEST)/bin/python -m pip install -q -e ".[test,experiments]" "$(TRANSFORMERS_OLDEST)"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python -m memorizing_experiments.demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m ruff check memorizing_hf memorizing_experiments tests benchmarks training
	$(VENV)/bin/python -m pytest

test-oldest: $(VENV_OLDEST)/.installed
	$(VENV_OLDEST)/bin/python -m pytest -m "not slow" -p no:cacheprovider

# Canary, not part of `make test`: the suite on the newest transformers release, ignoring the cap in setup.cfg; one line.
test-next:
	@PYTHON=$(PYTHON) TORCH=$(TORCH) .ci/test-next

smoke: $(VENV)/.installed
	$(VENV)/bin/python training/train.py configs/tiny_smoke.yaml

lint: $(VENV)/.installed
	$(VENV)/bin/python -m ruff check .
	$(VENV)/bin/python -m ruff format --check memorizing_hf memorizing_experiments

# Benchmark-only extras: lucidrains' memorizing-transformers-pytorch 0.4.1 for the side-by-side comparison (its
# metadata requires faiss-gpu, hence --no-deps and its real dependencies by hand), and faiss-cpu.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(VENV)/bin/python -m pip install -q faiss-cpu einops einops_exts filelock joblib
	$(VENV)/bin/python -m pip install -q --no-deps memorizing-transformers-pytorch==0.4.1
	touch $@

# The whole suite (about 1.5-2 h on 2 busy cores; the first run also reads 262K tokens of real keys, ~30 min).
# Timed comparisons use one torch thread. Results: benchmarks/results/*.json, docs/performance.md.
bench: $(VENV)/.installed $(VENV)/.bench-installed
	$(VENV)/bin/python benchmarks/bench_retrieval.py --threads 1
	$(VENV)/bin/python benchmarks/real_keys.py --entries 1048576
	$(VENV)/bin/python benchmarks/bench_retrieval_scale.py --threads 1 --sizes 8192 65536 262144 1048576 \
		--hnsw-m 15 32 --ef 16 64 256 --nprobe 8 32 128 256
	$(VENV)/bin/python benchmarks/bench_retrieval_scale.py --threads 1 --normalize --sizes 65536 262144 \
		--nprobe 4 8 16 32 64 --ef 16 64 256
	$(VENV)/bin/python benchmarks/bench_training.py --models tiny lucidrains \
		--out benchmarks/results/training_tiny_lucidrains.json
	$(VENV)/bin/python benchmarks/bench_training.py --models smollm2 --out benchmarks/results/training_smollm2.json
	$(VENV)/bin/python benchmarks/bench_training.py --models tiny lucidrains --interleave --sizes 8192 65536 262144 \
		--backends nosearch exact ivf --out benchmarks/results/training_interleaved.json
	$(VENV)/bin/python benchmarks/bench_memory_rss.py --sizes 8192 65536 262144 524288 1048576
	$(VENV)/bin/python benchmarks/bench_matmul_fraction.py --threads 1
	$(VENV)/bin/python benchmarks/bench_retrieval_bounds.py --threads 1
	$(VENV)/bin/python benchmarks/report.py

clean:
	rm -rf $(VENV) $(VENV_OLDEST) .venv-next *.egg-info .pytest_cache .ruff_cache
