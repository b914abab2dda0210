#!/usr/bin/env bash
# The accelerator benchmarks in one go, the most wanted first; a run cut short loses the least
# wanted. Each step's start is stamped with the seconds since the script began. About 8 minutes
# on one H200 (an estimate from the steps' times in the runs of 2026-12-04: BENCHMARKS.md).
#   1. the NCA step at ImageNet scale (N = 1,281,167, B = 256) against its matrix-product floor:
#      the XLA kernel and the Pallas one, in float32 and bfloat16 (each against the floor in its
#      own precision), and each variant's first step against ours (benchmarks/nca_step.py;
#      torch's variant runs on the CPU there, so it is left out; a variant that fails is
#      reported and the script goes on);
#   2. the whole training step, ResNet-50 at 224x224 in bfloat16 on synthetic data, bank of
#      1,281,167 rows: images/s, model FLOPs utilisation, then the step with each lever (the
#      other NCA kernel; twice the batch with BatchNorm statistics in bfloat16 and the Pallas
#      kernel; the network in float16), each printed as it finishes; then, in a process of its
#      own with XLA's CUDA graphs off (so that the trace names each kernel's operation; graphs
#      changed the step by 1% there), where the step's time goes: a profiler trace summed by
#      kind of operation (benchmarks/train_step.py);
#   3. the input pipeline on the host's cores: preparing a folder and whole epochs as train.py
#      reads them, against the cores times one core's rate (benchmarks/input_pipeline.py
#      --end_to_end; not in the smoke run, where tests/test_benchmarks.py runs it alone);
#   4. end to end: train.py with the ResNet-50 recipe on a folder of 25,600 generated
#      ImageNet-sized JPEGs (prepared, read and transformed by the host's cores), against the
#      same step on synthetic batches, then eval_knn.py (benchmarks/end_to_end.py).
# Compiled programs are cached in JAX_COMPILATION_CACHE_DIR (default a folder in /tmp; not in
# the smoke run), so that the steps that build the same program compile it once.
# Needs jax with the GPU or TPU backend, flax, optax, orbax-checkpoint and ml_collections, and
# for step 4 the input pipeline's packages too (grain, array_record, msgpack, simplejpeg,
# tensorflow-datasets, absl-py, tqdm, tensorboardX, Pillow): where they are missing, install
# their wheels first (the device tool's README says how to carry them).
#
#   benchmarks/gpu.sh [--smoke] [more flags for train_step.py]
# --smoke runs steps 1, 2 and 4 at tiny sizes on whatever backend JAX has (the CPU in `make
# test`), so that a change that breaks this script turns the suite red before a GPU runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
NCA_ARGS=(--variants ours,ours_bf16,pallas,pallas_bf16,floor,floor_bf16 --repeats 10)
E2E_ARGS=()
if [[ "${1:-}" != --smoke ]]; then
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/snca-jax-compilation-cache}
else
  NCA_ARGS=(--variants ours,pallas:e32r64w8s3,floor,floor_bf16 --smoke)
  E2E_ARGS=(--smoke)
fi
step() { echo "== ${SECONDS} s: $1"; }
"$PYTHON" -c 'import jax; print("devices:", jax.devices())'
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
step 'the NCA step'
"$PYTHON" benchmarks/nca_step.py "${NCA_ARGS[@]}" \
  || echo "(nca_step.py: a variant failed; going on)"
step 'the training step'
if [[ "${1:-}" != --smoke ]]; then
  "$PYTHON" benchmarks/train_step.py --accelerator --levers "$@" \
    || echo "(train_step.py failed; going on)"
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
    "$PYTHON" benchmarks/train_step.py --accelerator --whole_only --profile "$@" \
    || echo "(train_step.py --profile failed; going on)"
else                             # one process (the suite's time): the profile in it
  "$PYTHON" benchmarks/train_step.py --accelerator --levers --profile "$@"
fi
if [[ "${1:-}" != --smoke ]]; then
  step 'the input pipeline'
  "$PYTHON" benchmarks/input_pipeline.py --end_to_end --n 12800 \
    || echo "(input_pipeline.py failed; going on)"
fi
step 'end to end'
"$PYTHON" benchmarks/end_to_end.py "${E2E_ARGS[@]}" || echo "(end_to_end.py failed; going on)"
step 'done'
