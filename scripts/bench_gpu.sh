#!/usr/bin/env bash
# The whole accelerator check in one run: benchmarks/floor.py (FGSM vs the machine's floor, a
# 1,000-model population, the population chunk rule), then the full matrix, into
# results/<platform>/ named from the device (e.g. gpu-h200, gpu-h100).
# Usage: scripts/bench_gpu.sh [PYTHON]   (default .venv/bin/python, else python3)
#        scripts/bench_gpu.sh --check    (exit 2 with one line unless an NVIDIA GPU is here;
#                                          `make bench-gpu` runs it before installing CUDA JAX)
#        scripts/bench_gpu.sh --dry-run [PYTHON]
#            the rehearsal, on any machine (CI runs it on CPU): every step below except the
#            CUDA install, each at a tiny size (floor.py on 2,000 images and 8 models, the full
#            matrix with `bench --tiny`), into $MLSHIFT_DRY_RUN_OUT (default: a new temporary
#            folder)/results/<platform>/, the platform named as if the device were
#            $MLSHIFT_DRY_RUN_DEVICE (default "NVIDIA H100 80GB HBM3" -> gpu-h100) on CPU; then
#            checks the folder holds floor.json, floor.md, tables.md, records.csv and run.json.
# MNIST: $MLSHIFT_DATA_DIR, else ./.data/mnist when present (how the lent GPU gets it).
# On a machine without a GPU, the real forms refuse: one line on stderr, exit status 2.
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
dry=0
if [ "${1:-}" = "--dry-run" ]; then
  dry=1
  shift
fi
PY=${1:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MLSHIFT_NO_DOWNLOAD=1 PYTHONUNBUFFERED=1
if [ -z "${MLSHIFT_DATA_DIR:-}" ] && [ -d .data/mnist ]; then
  export MLSHIFT_DATA_DIR="$PWD/.data/mnist"
fi
platform=$("$PY" -c 'from mlshift_jax.bench.report import platform_name; print(platform_name())')
if [ "$dry" = 1 ]; then
  if [ "$platform" = cpu ]; then  # name the folder as the accelerator would be named
    platform=$("$PY" -c 'import sys; from mlshift_jax.bench.report import platform_for
print(platform_for("gpu", sys.argv[1]))' "${MLSHIFT_DRY_RUN_DEVICE:-NVIDIA H100 80GB HBM3}")
  fi
  root=${MLSHIFT_DRY_RUN_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/bench-gpu-dry-run.XXXXXX")}
  out="$root/results/$platform"
  floor=(--images 2000 --population 8 --population-size 1000 --gemm 256)
  bench=(--tiny)
  echo "bench-gpu: DRY RUN on $("$PY" -c 'from mlshift_jax.core.sharding import describe_devices; print(describe_devices())'): every step at a tiny size, no CUDA install, into $out" >&2
else
  if [ "$platform" = cpu ]; then
    echo "bench-gpu: JAX sees no accelerator; install the .[cuda12] extra (see README)" >&2
    exit 2
  fi
  out="results/$platform"
  floor=()
  bench=()
fi
start=$(date +%s)
echo "bench-gpu: [1/3] floor: matmul rate, bandwidth, FGSM vs its floor, a population and its chunk rule" >&2
"$PY" benchmarks/floor.py ${floor[@]+"${floor[@]}"} --out "$out" >/dev/null
echo "bench-gpu: [2/3] the full matrix ($(( $(date +%s) - start )) s so far)" >&2
"$PY" -m mlshift_jax bench --force ${bench[@]+"${bench[@]}"} --out "$out"
echo "bench-gpu: [3/3] the results folder" >&2
missing=()
for f in floor.json floor.md tables.md records.csv run.json; do
  [ -s "$out/$f" ] || missing+=("$f")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench-gpu: $out lacks ${missing[*]}" >&2
  exit 1
fi
echo "bench-gpu: results/$platform written in $(( $(date +%s) - start )) s ($out)"
