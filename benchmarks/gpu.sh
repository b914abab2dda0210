#!/usr/bin/env bash
# The accelerator benchmarks in one go (under 5 minutes on one H200):
#   1. the whole training step, ResNet-50 at 224x224 in bfloat16 on synthetic data, bank of
#      1,281,167 rows: images/s and model FLOPs utilisation (benchmarks/train_step.py);
#   2. the NCA step at ImageNet scale (N = 1,281,167, B = 256) against its matrix-product floor
#      (benchmarks/nca_step.py; torch's variant runs on the CPU there, so it is left out).
# Needs jax with the GPU or TPU backend, flax, optax, orbax-checkpoint and ml_collections
# (PYTHONPATH may name a wheel of it: PYTHONPATH=path/to/ml_collections-1.1.0-py3-none-any.whl).
#
#   benchmarks/gpu.sh [--smoke] [more flags for train_step.py]
# --smoke runs both steps at tiny sizes on whatever backend JAX has (the CPU in `make test`),
# so that a change that breaks this script turns the suite red before a GPU ever runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
NCA_ARGS=(--variants ours,ours_bf16,dense,floor --repeats 10)
if [[ "${1:-}" == --smoke ]]; then
  NCA_ARGS=(--variants ours,floor --smoke)
fi
"$PYTHON" -c 'import jax; print("devices:", jax.devices())'
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
"$PYTHON" benchmarks/train_step.py --accelerator "$@"
"$PYTHON" benchmarks/nca_step.py "${NCA_ARGS[@]}"
