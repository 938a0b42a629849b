#!/usr/bin/env bash
# GPU check in one command (at most 10 minutes on a CUDA machine; needs no network).
#
#   1. the CUDA-marked tests (`pytest -m cuda`: exact retrieval on CUDA equals CPU, the page backend on CUDA equals
#      exact, bf16 memory on CUDA, faiss on CUDA storage);
#   2. benchmarks/bench_retrieval_gpu.py: exact retrieval on CUDA vs faiss-gpu (if installed) vs the page backend,
#      bf16 against fp32 memory, SmolLM2-135M memorize + generate on the GPU.
#
# Results: $OUT/gpu_check.json and $OUT/pytest_cuda.log ($OUT defaults to benchmarks/results/gpu). Without CUDA it is a
# dry run: the CUDA tests skip and the benchmark runs its code on CPU at small sizes.
#
# What travels to the GPU machine (a device call carries the repository plus at most 64 MiB):
#   here, once:   benchmarks/gpu_check.sh --prepare   # fills build/gpu_assets (ignored): SmolLM2's configuration and
#                                                     # tokenizer, 65,536 real keys in bf16 (~30 MiB)
#   there:        run(command="bash benchmarks/gpu_check.sh", carry=["build/gpu_assets"], timeout_s=600)
# The machine's own python3 (PyTorch with CUDA, transformers, pytest, hypothesis) runs the repository in place
# (PYTHONPATH); the virtual environment does not travel. SmolLM2's 538 MB of weights cannot travel either: they are
# used where found (--weights DIR via BENCH_ARGS, build/gpu_assets/SmolLM2-135M-Instruct, or
# ~/.cache/memorizing_hf/SmolLM2-135M-Instruct); elsewhere the model runs with random weights (same shapes and code).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "${1:-}" = "--prepare" ]; then
    exec "$PYTHON" benchmarks/bench_retrieval_gpu.py --prepare
fi

RESULTS=${OUT:-benchmarks/results/gpu}
mkdir -p "$RESULTS"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "no CUDA: dry run")'

status=0
# Only the files that hold CUDA tests: the others may need packages the GPU machine lacks (datasets, gguf).
mapfile -t cuda_tests < <(grep -l "pytest.mark.cuda" tests/test_*.py)
timeout 240 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider "${cuda_tests[@]}" 2>&1 | tee "$RESULTS/pytest_cuda.log" \
    || status=1
# ${BENCH_ARGS} is split on purpose: e.g. BENCH_ARGS="--weights /path/to/SmolLM2-135M-Instruct"
# shellcheck disable=SC2086
timeout 330 "$PYTHON" benchmarks/bench_retrieval_gpu.py --out "$RESULTS/gpu_check.json" ${BENCH_ARGS:-} || status=1
echo "gpu_check: results in $RESULTS (exit $status)"
exit $status
