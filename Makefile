# Two entry points on a fresh machine:
#   make demo   set up, get Fashion-MNIST, train configs/fashion_mnist.py:demo, evaluate kNN
#   make test   set up, run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PILLOW_RECORD := $(VENV)/.pillow
WORKDIR ?= workdir
FMNIST := /usr/share/datasets/fashion-mnist
# Pillow-SIMD replaces Pillow where it builds: the same API and filters, with resizes several
# times faster (benchmarks/input_pipeline.py); AVX2 where the CPU has it. Where it cannot be
# built (no compiler or JPEG headers), Pillow from requirements.txt stays.
PILLOW_SIMD := pillow-simd==12.1.1.post0

.PHONY: demo test data clean experiments

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	@if [ ! -e /usr/include/jpeglib.h ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q libjpeg-dev zlib1g-dev >/dev/null 2>&1 || true; fi
	@# Exactly one of the two: both install the same PIL package, so neither may stay beside the
	@# other. $(PILLOW_RECORD) names the one installed (tests/test_environment.py checks it).
	@$(BIN)/pip uninstall -q -y pillow pillow-simd >/dev/null 2>&1; \
	  if CC="cc $$(grep -qw avx2 /proc/cpuinfo 2>/dev/null && echo -mavx2)" \
	     $(BIN)/pip install -q $(PILLOW_SIMD) >/dev/null 2>&1; then \
	    echo "Pillow-SIMD installed"; echo Pillow-SIMD > $(PILLOW_RECORD); \
	  else \
	    echo "Pillow-SIMD could not be built: using Pillow"; \
	    $(BIN)/pip install -q "$$(grep -i '^pillow==' requirements.txt)" && echo Pillow > $(PILLOW_RECORD); \
	  fi
	touch $@

# Debian's dataset-fashion-mnist where apt-get can install it; otherwise the builder downloads
# the IDX files (or set --config.data.idx_dir).
data:
	@if [ ! -e $(FMNIST)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null \
	    && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist; } || \
	  echo "dataset-fashion-mnist could not be installed: the IDX files will be downloaded"; \
	fi

# The CPU as one JAX device per core, each running XLA single-threaded: the demo's small
# convolutions keep two cores busier as two data-parallel devices than as one device of two
# threads (README, "The demo", for the times with and without). Anything already in XLA_FLAGS
# comes after, so it wins; `make demo CPU_DEVICES=` turns this off.
CPU_DEVICES ?= --xla_force_host_platform_device_count=$(shell nproc) \
  --xla_cpu_multi_thread_eigen=false
RUN_CPU := XLA_FLAGS="$(CPU_DEVICES) $$XLA_FLAGS"

demo: $(STAMP) data
	$(RUN_CPU) $(BIN)/python train.py --config configs/fashion_mnist.py:demo --workdir $(WORKDIR)
	$(RUN_CPU) $(BIN)/python eval_knn.py --workdir $(WORKDIR)

# The paper's claims on Fashion-MNIST, NCA beside softmax, 3 seeds: runs/experiments/results.*
# (RESULTS.md). 27 runs of EXPERIMENT_EPOCHS epochs each: at 2, 70 min on the 2-core Intel Xeon
# (RESULTS.md); `make experiments EXPERIMENT_EPOCHS=5` gives the default config's schedule.
EXPERIMENT_EPOCHS ?= 2
experiments: $(STAMP) data
	$(RUN_CPU) $(BIN)/python experiments.py --workdir runs/experiments --epochs $(EXPERIMENT_EPOCHS)

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -p no:warnings -n 2 --dist loadfile --durations=15

clean:
	rm -rf $(VENV) $(WORKDIR)
