#!/usr/bin/env bash
# The accelerator benchmarks in one go (steps 1 and 2 took under 5 minutes on one H200; step 3
# has not run on one yet):
#   1. the whole training step, ResNet-50 at 224x224 in bfloat16 on synthetic data, bank of
#      1,281,167 rows: images/s and model FLOPs utilisation, then the step with each lever
#      (twice the batch, BatchNorm statistics in bfloat16, the Pallas NCA kernel)
#      (benchmarks/train_step.py);
#   2. the NCA step at ImageNet scale (N = 1,281,167, B = 256) against its matrix-product floor,
#      the XLA kernel and the Pallas one (benchmarks/nca_step.py; torch's variant runs on the
#      CPU there, so it is left out; a variant that fails is reported and the script goes on);
#   3. end to end: train.py with the ResNet-50 recipe on a folder of 25,600 generated
#      ImageNet-sized JPEGs (prepared, read and transformed by the host's cores), against the
#      same step on synthetic batches, then eval_knn.py (benchmarks/end_to_end.py).
# Needs jax with the GPU or TPU backend, flax, optax, orbax-checkpoint and ml_collections, and
# for step 3 the input pipeline's packages too (grain, array_record, msgpack, simplejpeg,
# tensorflow-datasets, absl-py, tqdm, tensorboardX, Pillow): where they are missing, install
# their wheels first (the device tool's README says how to carry them).
#
#   benchmarks/gpu.sh [--smoke] [more flags for train_step.py]
# --smoke runs both steps at tiny sizes on whatever backend JAX has (the CPU in `make test`),
# so that a change that breaks this script turns the suite red before a GPU ever runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
NCA_ARGS=(--variants ours,ours_bf16,no_index,pallas,pallas_bf16,dense,floor --repeats 10)
if [[ "${1:-}" == --smoke ]]; then
  NCA_ARGS=(--variants ours,pallas,floor --smoke)
fi
"$PYTHON" -c 'import jax; print("devices:", jax.devices())'
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
"$PYTHON" benchmarks/train_step.py --accelerator --levers "$@"
"$PYTHON" benchmarks/nca_step.py "${NCA_ARGS[@]}" || echo "(nca_step.py: a variant failed; going on)"
if [[ "${1:-}" == --smoke ]]; then
  "$PYTHON" benchmarks/end_to_end.py --smoke
else
  "$PYTHON" benchmarks/end_to_end.py
fi
