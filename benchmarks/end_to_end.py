"""End to end: train.py and eval_knn.py on a folder of ImageNet-sized JPEGs, against the same
training step on synthetic batches, in one run.

    python benchmarks/end_to_end.py                  # ResNet-50 recipe, 25,600 JPEGs (a GPU)
    python benchmarks/end_to_end.py --n 6400 --steps 40 --config configs/folder.py
    python benchmarks/end_to_end.py --smoke          # tiny, on whatever backend JAX has

1. Writes --n JPEGs of 500x375 (benchmarks/input_pipeline.py's pictures, repeated) into
   ROOT/train/<class>/ and --n / 10 into ROOT/val/<class>/, in --classes classes.
2. Runs `train.py --config CONFIG --config.data.root=ROOT` for one epoch, which prepares the
   folder (its time from the prepared split's meta.json) and trains on it: the images/s of the
   steps after the first logged one (compilation excluded), from metrics.jsonl.
3. Times the same jitted training step (the recipe's model, batch, precision and a bank of
   --n rows) in this process on synthetic uint8 batches already on the device: the rate the
   input pipeline has to keep up with.
4. Prints end to end / synthetic (the goal: at least 0.9), and the time and line of eval_knn.py
   on the run (which runs before step 3, while no process of this run holds the accelerator).
The host's cores read and transform as the recipe says (`data.num_threads`, `worker_count`).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))


def write_folder(root, n, classes):
  """n training and n // 10 validation JPEGs of 500x375 in `classes` class folders: a
  picture's copies are all of one class (picture k in class k % classes), so that the kNN
  evaluation of the run finds each validation picture's copies among the training ones."""
  from input_pipeline import photos
  unique, kind = photos(min(n, 256))
  for split, count in (('train', n), ('val', max(classes, n // 10))):
    for i in range(count):
      k = (i * 7 + (split == 'val')) % len(unique)
      d = os.path.join(root, split, f'n{k % classes:08d}')
      os.makedirs(d, exist_ok=True)
      with open(os.path.join(d, f'img_{i:06d}.JPEG'), 'wb') as f:
        f.write(unique[k])
  return kind


def load_config(spec, overrides):
  """The recipe `file.py[:arg]` with `--config.FIELD=VALUE` overrides, as train.py reads them."""
  import ast
  import importlib.util
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('recipe', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for item in overrides:
    field, _, text = item[len('--config.'):].partition('=')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = field.split('.')
    target = config
    for name in parents:
      target = target[name]
    target[leaf] = value
  return config


def synthetic_rate(config, n, steps):
  """Images/s of the recipe's jitted training step on synthetic batches already placed."""
  import jax
  from snca_jax import mesh as mesh_lib
  from snca_jax import models
  from snca_jax import optim
  from snca_jax import state as state_lib
  from snca_jax import step as step_lib
  mesh = mesh_lib.make_mesh()
  b, size = config.batch_size, config.data.image_size
  model = models.model_from_config(config, num_devices=mesh.size)
  tx = optim.make_optimizer(config, max(1, n // b))
  state = state_lib.create_train_state(
      model, tx, key=jax.random.key(0), bank_labels=np.arange(n, dtype=np.int32) % 10,
      image_shape=(size, size, 3), low_dim=config.low_dim, mesh=mesh)
  train_step = step_lib.make_train_step(model, tx, config, steps_per_epoch=max(1, n // b),
                                        shardings=jax.tree.map(lambda a: a.sharding, state),
                                        mesh=mesh)
  rng = np.random.default_rng(0)
  batches = [step_lib.device_batch({
      'image': rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
      'index': rng.choice(n, b, replace=False).astype(np.int32),
      'label': rng.integers(0, 10, b).astype(np.int32)}, mesh) for _ in range(4)]
  for i in range(2):                                   # compile and warm up
    state, metrics = train_step(state, batches[i])
  jax.block_until_ready(metrics['loss'])
  t0 = time.perf_counter()
  for i in range(steps):
    state, metrics = train_step(state, batches[i % len(batches)])
  jax.block_until_ready(metrics['loss'])
  return steps * b / (time.perf_counter() - t0)


def steady_rate(metrics_path, batch):
  """Images/s between the first and the last logged training step of metrics.jsonl."""
  rows = [r for r in map(json.loads, open(metrics_path)) if 'train/loss' in r]
  if len(rows) < 2:
    raise SystemExit(f'{metrics_path} has {len(rows)} logged steps: raise --n or lower '
                     f'--config.log_every_steps')
  first, last = rows[0], rows[-1]
  return (last['step'] - first['step']) * batch / (last['time'] - first['time'])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/imagenet_resnet50.py:folder')
  parser.add_argument('--n', type=int, default=25600, help='training JPEGs')
  parser.add_argument('--classes', type=int, default=100)
  parser.add_argument('--steps', type=int, default=60, help='synthetic steps timed')
  parser.add_argument('--workdir', default=None, help='keep the folder and the run here')
  parser.add_argument('--smoke', action='store_true', help='tiny sizes and a tiny network: '
                      'to check that it runs')
  args, overrides = parser.parse_known_args()
  bad = [o for o in overrides if not o.startswith('--config.')]
  if bad:
    parser.error(f'unknown arguments {bad}: give --config.FIELD=VALUE overrides')
  if args.smoke:
    print('smoke run: tiny sizes, to check that the benchmark runs; its figures mean nothing')
    args.n, args.classes, args.steps = 48, 4, 2
    overrides = ['--config.model=tiny_resnet', '--config.low_dim=16',
                 '--config.data.image_size=32', '--config.batch_size=8',
                 '--config.grad_accum_steps=1', '--config.knn.batch_size=8',
                 '--config.dtype=float32', '--config.nca_matmul_dtype=float32'] + overrides
  overrides = ['--config.num_epochs=1', '--config.log_every_steps=2',
               '--config.keep_best=False'] + overrides
  config = load_config(args.config, overrides)
  work = args.workdir or tempfile.mkdtemp()
  root, run = os.path.join(work, 'photos'), os.path.join(work, 'run')
  try:
    kind = write_folder(root, args.n, args.classes)
    print(f'{args.n} training JPEGs of 500x375 ({kind}) in {args.classes} classes; '
          f'{args.config}, batch {config.batch_size}, {config.model}, {config.dtype}')
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, 'train.py', '--config', args.config,
                        f'--config.data.root={root}', '--workdir', run, *overrides],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    train_s = time.perf_counter() - t0
    if r.returncode:
      raise SystemExit(f'train.py failed:\n{r.stderr[-3000:]}')
    prepared = json.load(open(os.path.join(root, 'snca_prepared', 'train', 'meta.json')))
    seconds = prepared['seconds']                   # to 0.1 s
    print(f'train.py: {train_s:.0f} s in all, of which preparing the training folder '
          f'{seconds:.1f} s' + (f' ({args.n / seconds:.0f} images/s)' if seconds else ''))
    end_to_end = steady_rate(os.path.join(run, 'metrics.jsonl'), config.batch_size)
    # eval_knn.py before this process takes the accelerator (JAX reserves most of a GPU's
    # memory for the process that first uses it).
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, 'eval_knn.py', '--workdir', run], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if r.returncode:
      raise SystemExit(f'eval_knn.py failed:\n{r.stderr[-3000:]}')
    evaluated = f'eval_knn.py: {time.perf_counter() - t0:.0f} s; ' + (
        r.stdout.strip().splitlines()[-1])
    synthetic = synthetic_rate(config, args.n, args.steps)
    print(f'training step, synthetic batches on the device: {synthetic:8.0f} images/s')
    print(f'train.py on the JPEG folder (after compiling):  {end_to_end:8.0f} images/s = '
          f'{end_to_end / synthetic:.2f} x synthetic')
    print(evaluated)
  finally:
    if args.workdir is None:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
