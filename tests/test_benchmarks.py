"""Every benchmark runs: each script in benchmarks/ (gpu.sh and its Python steps included) in
its smoke mode, tiny sizes on the CPU, so that a change that breaks one turns the suite red.
Where a smoke run can check a figure that does not depend on the machine, it does."""

import os
import re
import subprocess
import sys

import numpy as np
from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, 'benchmarks')


def run(*cmd, devices=None):
  env = subprocess_env(devices, PYTHON=sys.executable)
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
  assert 'smoke run' in r.stdout
  return r.stdout


def test_every_benchmark_has_a_smoke_test():
  tested = {'gpu.sh', 'train_step.py', 'nca_step.py', 'knn.py', 'memory_resnet50.py',
            'scaling.py', 'raw_pixel_knn.py', 'input_pipeline.py', 'end_to_end.py',
            'startup.py'}
  scripts = {f for f in os.listdir(BENCHMARKS) if f.endswith(('.py', '.sh'))}
  assert scripts == tested, f'benchmarks without a smoke test: {sorted(scripts - tested)}'


def test_gpu_script_runs_the_training_step_the_nca_step_and_end_to_end():
  """gpu.sh --smoke: train_step.py --accelerator (bfloat16, FLOPs counted by XLA),
  nca_step.py (its variants in one child process, the Pallas kernel with another tiling and the
  bfloat16 floor among them) and end_to_end.py (train.py on a generated JPEG folder, the
  synthetic step, eval_knn.py), on the CPU."""
  out = run('bash', os.path.join(BENCHMARKS, 'gpu.sh'), '--smoke')
  assert re.search(r'ours: whole step\s+[\d.]+ ms', out) and 'bfloat16' in out
  assert 'XLA counts' in out and 'MFU' in out
  # The smoke run's levers: the combined one (most settings) and float16; and the profile of
  # the step by kind of operation (on a GPU in a process of its own, with CUDA graphs off).
  for lever in ('batch 16, BatchNorm statistics in bfloat16, Pallas NCA',
                'the network in float16'):
    assert re.search(rf'^{lever}\s+[\d.]+ ms\s+[\d.]+ images/s\s+[\d.]+x$', out, re.M), out
  assert_busy(out)
  assert re.search(r'^  elementwise fusions\s+[\d.]+ ms', out, re.M), out
  for variant in ('ours', 'pallas:e32r64w8s3', 'floor', 'floor_bf16'):
    assert re.search(rf'^{variant}\s+[\d.]+\s+[\d.]+', out, re.M), (variant, out)
  # The Pallas kernel (another tiling) against ours in its first step: float32 rounding apart.
  pallas = re.search(r'^pallas:e32r64w8s3\s+(?:\S+\s+){4}(\S+)\s+(\S+)$', out, re.M)
  assert float(pallas[1]) < 1e-5 and float(pallas[2]) < 1e-4, out
  assert 'failed' not in out
  assert re.search(r'synthetic batches on the device:\s+\d+ images/s', out), out
  assert re.search(r'on the JPEG folder \(after compiling\):\s+\d+ images/s = [\d.]+ x', out)
  assert re.search(r'eval_knn.py: \d+ s; kNN \(K=\d+.*top-1 [\d.]+%', out)


def test_train_step_beside_pytorch():
  out = run(sys.executable, 'benchmarks/train_step.py', '--smoke')
  assert re.search(r"torch, the original's step\s+[\d.]+ ms", out)
  assert re.search(r'ours / torch: [\d.]+x', out)


def assert_busy(out):
  """A profile's first line: the operations' time is a real share of the step (on a CPU, the
  trace's operations were once looked for on threads that run none: 0%)."""
  busy = re.search(r'^where the step goes .*: busy ([\d.]+) ms of the ([\d.]+) ms step', out, re.M)
  assert busy and float(busy[1]) > 0.1 * float(busy[2]), out


def test_demo_step_and_its_levers():
  """train_step.py --demo --profile: make demo's step as the demo runs it (a device per core),
  with the NCA kernel's share of it, and where its time goes by kind of operation (each
  operation's kind from the compiled program: the NCA kernel's products, the network's
  convolutions forward and backward, the collectives)."""
  out = run(sys.executable, 'benchmarks/train_step.py', '--demo', '--smoke', '--profile')
  assert f'xla_force_host_platform_device_count={os.cpu_count()} ' in out   # as the Makefile
  for label in ('the demo step', 'a bank of 100 rows'):
    assert re.search(rf'^{label}\s+[\d.]+ images/s\s+[\d.]+x$', out, re.M), out
  assert re.search(r'the NCA kernel against the bank: about -?\d+% of the step', out), out
  assert_busy(out)
  for kind in ('NCA kernel and bank update: matrix products', 'network: convolutions, forward',
               'network: convolutions, backward') + ('collectives (BatchNorm statistics',) * (
                   os.cpu_count() > 1):
    assert re.search(rf'^  {re.escape(kind)}.*\s[\d.]+ ms\s+[\d.]+%$', out, re.M), (kind, out)


def test_nca_step_against_torch_and_dense():
  """The variants gpu.sh's smoke run leaves out (each runs in a process of its own)."""
  out = run(sys.executable, 'benchmarks/nca_step.py', '--smoke', '--variants',
            'ours_bf16,no_index,with_index,dense,torch')
  assert re.search(r'ours_bf16: [\d.]+x faster than torch, [\d.]+x faster than dense, '
                   r'[\d.]+x faster than no_index', out)
  assert re.search(r'^with_index\s+[\d.]+\s', out, re.M), out
  assert 'failed' not in out


def test_knn_finds_faiss_neighbours():
  """Exact search: in float32 ours finds the same K neighbours as faiss's exact index (ties
  aside), and classifies every query alike, as do the tiled search and the blocked one; their
  constants from the command line, and only the methods asked for (one process: the suite's
  time)."""
  out = run(sys.executable, 'benchmarks/knn.py', '--smoke',
            '--methods=ours,ours_bf16,native_screened,tiled,blocked', '--block=16',
            '--group_blocks=64',
            '--tile_queries=8', '--count_from_k=1', '--native_queries=16', '--native_tile_mb=1')
  assert out.count('blocks of 16, 64 maxima a group, 8 queries a tile (small banks), counted '
                   'from K = 1; native tiles of 16 queries x 1 MB;') == 2          # K = 30, 200
  # ours: the native search on the smoke run's small bank; native_screened: the same screened
  # in bfloat16; tiled; blocked: the two-pass one
  rows = re.findall(r'^(?:ours|native_screened|tiled|blocked)\s+[\d.]+\s+\d+\s+[\d.]+\s+'
                    r'([\d.]+)%\s+([\d.]+)%', out, re.M)
  assert len(rows) == 8, out
  assert all(float(overlap) >= 99.5 and float(same) == 100.0 for overlap, same in rows)
  assert len(re.findall(r'^ours_bf16\s', out, re.M)) == 2
  assert not re.search(r'^chunked\s', out, re.M)


def test_knn_on_exported_embeddings(tmp_path):
  """`--embeddings` reads what `eval_knn.py --export` writes, and the screened search finds
  faiss's neighbours there; `--parts` says where its time goes (the native search's, screened
  too, with the queries its screen proves, and, on this small bank, the tiled search's)."""
  rng = np.random.default_rng(0)
  unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  bank = unit(rng.normal(size=(3000, 16)))
  np.save(tmp_path / 'database.npy', bank)
  np.save(tmp_path / 'database_labels.npy', np.arange(3000) % 4)
  np.save(tmp_path / 'queries.npy', unit(bank[:50] + 0.3 * rng.normal(size=(50, 16))))
  out = run(sys.executable, 'benchmarks/knn.py', '--smoke', '--embeddings', str(tmp_path),
            '--k=5', '--methods=screened', '--parts')
  assert f'Q=50 queries, N=3,000 x D=16 (embeddings of {tmp_path})' in out
  assert re.search(r'^screened\s+[\d.]+\s+\d+\s+[\d.]+\s+100.00%\s+100.00%$', out, re.M), out
  assert 'where the time goes, K=5, 32 queries, one device, 2,976 rows in blocks of 32' in out
  parts = re.findall(r'^  (\S.*\S)\s+[\d.]+ s$', out, re.M)
  assert parts[0] == 'the bank read once (summed)' and 'screened search' in parts, out
  assert 'first pass, bfloat16, 27 blocks (screened)' in parts and len(parts) == 20, out
  assert parts[-9:-4] == ['native: products + a pass over them, float32',
                          'native: products + a pass over them, bfloat16',
                          'native search, float32', 'native search, bfloat16',
                          'native search, float32 screened'], out
  assert parts[-4:] == ['tiled: products + block maxima, float32',      # a small bank
                        'tiled: products + block maxima, bfloat16',
                        'tiled search, float32', 'tiled search, bfloat16'], out
  assert '(the plain search scores 160 rows a query again: 0.00 GB gathered, 1.7 x the bank)' \
      in out, out
  proven = re.search(r'\(the screened native search proves (\d+) of the 32 queries; the others '
                     r'are searched again with float32 products\)', out)
  assert proven and int(proven.group(1)) == 32, out    # gaps far above bfloat16's error here


def test_memory_and_scaling_reports():
  out = run(sys.executable, 'benchmarks/memory_resnet50.py', '--smoke')
  assert re.search(r'bank \+ labels \(1/2 of', out) and 'step temporaries' in out
  out = run(sys.executable, 'benchmarks/scaling.py', '--smoke')
  rows = re.findall(r'^\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$', out, re.M)
  assert [r[0] for r in rows] == ['1,000', '5,000']
  # The bank per device grows with N; the step's communication does not.
  assert float(rows[1][1]) > 4 * float(rows[0][1]) and rows[0][3] == rows[1][3]


def test_raw_pixel_knn(fake_idx_dir):
  """The printed accuracies are weighted kNN on L2-normalised pixels (the first 500 training
  and 100 test images in smoke mode), as the reference computes them."""
  from conftest import weighted_knn_reference
  from snca_jax.data import fashion_mnist
  out = run(sys.executable, 'benchmarks/raw_pixel_knn.py', '--smoke', '--idx_dir', fake_idx_dir)
  printed = re.findall(r'K=\s*(\d+): top-1 ([\d.]+)%  top-5 ([\d.]+)%', out)
  assert [k for k, _, _ in printed] == ['30', '1']

  def load(prefix, n):
    read = lambda stem: fashion_mnist.read_idx(fashion_mnist.find_idx_file(fake_idx_dir, stem))
    x = read(f'{prefix}-images-idx3-ubyte')[:n].reshape(-1, 784).astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True), read(f'{prefix}-labels-idx1-ubyte')[:n]

  (train_x, train_y), (test_x, test_y) = load('train', 500), load('t10k', 100)
  for k, top1, top5 in printed:
    want = weighted_knn_reference(test_x, test_y, train_x, train_y, k=int(k), sigma=0.05)
    assert abs(float(top1) - 100 * want[1]) <= 1.0 and abs(float(top5) - 100 * want[5]) <= 1.0


def test_startup_times_each_import_in_fresh_processes(tmp_path):
  """Both columns (this environment, and --against a directory put ahead on the path) time the
  statement in fresh processes; the smoke run times the cheapest one, ml_dtypes's import."""
  out = run(sys.executable, 'benchmarks/startup.py', '--smoke', '--against', str(tmp_path))
  rows = re.findall(r'^(import [\w. ;]+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$', out,
                    re.M)
  assert [r[0] for r in rows] == ['import numpy; import ml_dtypes'], out
  assert all(float(x) > 0 for r in rows for x in r[1:]), out
  assert f'--against {tmp_path}: ml_dtypes' in out
  assert re.search(r'own import time by package \(this environment\), s: total [\d.]+; '
                   r'numpy [\d.]+', out), out         # the package that takes most, here


def test_input_pipeline():
  out = run(sys.executable, 'benchmarks/input_pipeline.py', '--smoke')
  assert re.search(r'ours: train transform\s+\d+', out) and 'prepare (read' in out


def test_input_pipeline_end_to_end():
  out = run(sys.executable, 'benchmarks/input_pipeline.py', '--end_to_end', '--smoke',
            '--threads=3')
  for name in ('one thread', 'threads, two per core'):      # worker processes: test_folder
    assert re.search(rf'prepare, {name}:\s+\d+ images/s = [\d.]+ x cores x one thread, '
                     rf'this process [\d.]+ cores busy', out), out
  assert re.search(r'reads them with threads by default', out), out     # few files
  assert re.search(r'reading the prepared records in batches of \d+, shuffled, one thread: '
                   r'[\d.]+ us an image \([\d.]+ us of CPU\)', out), out
  assert re.search(r'(\d+)% holding the GIL', out), out
  for name in ('configs/imagenet_resnet50.py:folder (from the cores)',
               'configs/folder.py (from the cores)', 'grain workers, 1 thread each',
               '1 grain worker, 2 threads (as on >= 5 cores)', '3 threads, no workers'):
    assert re.search(re.escape(name) + r'.*?(\s+\d+){3}(\s+[\d.]+){2}\s+\d+$', out, re.M), out
