#!/usr/bin/env bash
# The whole accelerator check in one run: bench/floor.py (FGSM vs the machine's floor, a
# 1,000-model population), then the full matrix, into results/<platform>/ (e.g. gpu-h200).
# Usage: scripts/bench_gpu.sh [PYTHON]   (default .venv/bin/python, else python3)
#        scripts/bench_gpu.sh --check    (exit 2 with one line unless an NVIDIA GPU is here;
#                                          `make bench-gpu` runs it before installing CUDA JAX)
# MNIST: $MLSHIFT_DATA_DIR, else ./.data/mnist when present (how the lent GPU gets it).
# On a machine without a GPU both forms refuse: one line on stderr, exit status 2.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--check" ]; then
  smi=${MLSHIFT_NVIDIA_SMI:-nvidia-smi}
  if ! gpus=$("$smi" -L 2>/dev/null) || ! grep -q '^GPU' <<<"$gpus"; then
    echo "bench-gpu: no NVIDIA GPU on this machine ($smi -L lists none); nothing was installed or run" >&2
    exit 2
  fi
  exit 0
fi
PY=${1:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MLSHIFT_NO_DOWNLOAD=1 PYTHONUNBUFFERED=1
if [ -z "${MLSHIFT_DATA_DIR:-}" ] && [ -d .data/mnist ]; then
  export MLSHIFT_DATA_DIR="$PWD/.data/mnist"
fi
platform=$("$PY" -c 'from mlshift_jax.bench.report import platform_name; print(platform_name())')
if [ "$platform" = cpu ]; then
  echo "bench-gpu: JAX sees no accelerator; install the .[cuda12] extra (see README)" >&2
  exit 2
fi
start=$(date +%s)
"$PY" bench/floor.py --out "results/$platform"
"$PY" -m mlshift_jax bench --force --out "results/$platform"
echo "bench-gpu: results/$platform written in $(( $(date +%s) - start )) s"
