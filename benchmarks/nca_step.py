"""One NCA step (loss, feature gradient, bank update) at ImageNet scale, four ways, on the CPU.

    python benchmarks/nca_step.py                  # N = 1,281,167, B = 256, D = 128
    python benchmarks/nca_step.py --n 100000       # quicker
    python benchmarks/nca_step.py --classes 32 --variants with_index,no_index   # where it pays

  ours   snca_jax.nca.nca_step (loss, gradient and bank update in one pass; one device here),
         jitted, bank donated so that the update is in place; with the class index where
         training would use one (`nca_class_index='auto'`: no class over 1/50 of the rows)
  no_index  the same without the class index: the same-class sums in the pass over the bank
  with_index  the same with the class index whatever the classes (on request: --variants)
  ours_bf16  the same with matmul_dtype=bfloat16 (bfloat16 products, float32 accumulation)
  pallas, pallas_bf16  the same with kernel='pallas': each device's pass over its rows as one
         Pallas kernel (snca_jax/nca_pallas.py), for GPUs, with the class index where it pays;
         only when asked for (--variants), as on a CPU Pallas interprets it. `pallas:TILES`
         (say pallas_bf16:e64r128w8s3) times another tiling: at most e examples a program, r
         bank rows a step, w Triton warps, s pipeline stages (nca_pallas.Tiles)
  dense  snca_jax.nca.nca_loss (the dense reference) + snca_jax.bank.update, jitted, bank donated
  torch  the original's operation in PyTorch: LinearAverage (x @ memory.T / T; backward
         grad @ memory / T, then the in-place momentum update of the memory) + NCACrossEntropy
  floor  the two matrix products alone: (B, D) x (D, N), then (B, N) x (N, D)
  floor_bf16  the same in bfloat16 (float32 accumulation; the bank converted as the kernels do):
         the floor of the _bf16 variants (on request)

Each variant runs in its own process, so that its peak resident memory (VmHWM) is its own; the
table gives the median step time (after one warm-up step) and the peak memory of the step:
the bank plus the most the steps add to the resident size (VmHWM, reset once the bank and the
inputs exist; JAX variants are compiled before that, so the compiler's memory is not counted),
next to the bank's own size. Labels (5 MB) and inputs are not counted. Beside them, each JAX
variant's first step (the same features, indices and bank in all) against ours: the loss's
relative difference and the feature gradient's largest difference over its largest entry. The
torch variant (its own random bank, as the original's) needs `pip install -r
benchmarks/requirements.txt`.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ('ours', 'ours_bf16', 'no_index', 'dense', 'torch', 'floor')
PALLAS = ('pallas', 'pallas_bf16')     # on request (gpu.sh): interpreted, hence slow, on a CPU
ON_REQUEST = PALLAS + ('with_index', 'floor_bf16')


def parse_variant(variant):
  """'pallas_bf16:e64r128w8s3' -> ('pallas_bf16', Tiles(64, 128, 8, 3)); others: (name, None)."""
  name, _, spec = variant.partition(':')
  if not spec:
    return name, None
  m = re.fullmatch(r'e(\d+)r(\d+)w(\d+)s(\d+)', spec)
  if name not in PALLAS or not m:
    raise ValueError(f'{variant}: a tiling is written pallas[_bf16]:e<examples>r<rows>w<warps>'
                     f's<stages>, say pallas_bf16:e64r128w8s3')
  sys.path.insert(0, ROOT)
  from snca_jax import nca_pallas
  return name, nca_pallas.Tiles(*map(int, m.groups()))


def rss_mb(field='VmRSS'):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) / 1024
  raise RuntimeError(field)


def make_inputs(n, b, d, classes=1000, seed=0):
  rng = np.random.default_rng(seed)
  f = rng.normal(size=(b, d)).astype(np.float32)
  f /= np.linalg.norm(f, axis=1, keepdims=True)
  idx = rng.choice(n, size=b, replace=False).astype(np.int32)
  labels = rng.integers(0, classes, size=n).astype(np.int32)
  return f, idx, labels


def initial_bank(n, d):
  """The bank's initialisation (docs/METHOD.md), made in numpy so that no compilation is needed."""
  stdv = 1.0 / (d / 3) ** 0.5
  return np.random.default_rng(1).uniform(-stdv, stdv, size=(n, d)).astype(np.float32)


def reset_peak():
  """Makes VmHWM start again from the current resident size (Linux clear_refs 5), where the
  kernel allows it (not in every sandbox: there the peak counts from the process's start)."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
  except OSError:
    pass


def jax_variant(name, args):
  import jax
  import jax.numpy as jnp
  sys.path.insert(0, ROOT)
  from snca_jax import bank as bank_lib
  from snca_jax import mesh as mesh_lib
  from snca_jax import nca
  from snca_jax import nca_pallas
  name, tiles = parse_variant(name)
  nca_pallas.TILES = tiles or nca_pallas.Tiles()    # this variant's tiling (or the default)
  f, idx, labels = make_inputs(args.n, args.b, args.d, args.classes)
  mesh = mesh_lib.make_mesh()
  labels = jax.device_put(labels, mesh_lib.row_sharding(mesh))
  auto = name in ('ours', 'ours_bf16') + PALLAS and nca.class_index_pays(labels)
  index = nca.class_index(labels, mesh) if auto or name == 'with_index' else None
  f, idx = jnp.asarray(f), jnp.asarray(idx)
  T = 0.05

  if name == 'floor':
    def step(bank, f):
      return bank, (f @ bank.T) @ bank
  elif name == 'floor_bf16':
    def step(bank, f):
      b16 = bank.astype(jnp.bfloat16)
      s = jnp.einsum('bd,nd->bn', f.astype(jnp.bfloat16), b16, preferred_element_type=jnp.float32)
      return bank, jnp.einsum('bn,nd->bd', s.astype(jnp.bfloat16), b16,
                              preferred_element_type=jnp.float32)
  elif name in ('ours', 'ours_bf16', 'no_index') + ON_REQUEST:
    dtype = jnp.bfloat16 if name.endswith('_bf16') else jnp.float32
    kernel = 'pallas' if name in PALLAS else 'xla'

    def step(bank, f):
      (loss, bank), grad = jax.value_and_grad(lambda x: nca.nca_step(
          x, idx, bank, labels, 0.5, temperature=T, mesh=mesh, chunk_size=args.chunk or None,
          matmul_dtype=dtype, kernel=kernel, class_index=index), has_aux=True)(f)
      return bank, (loss, grad)
  else:
    def step(bank, f):
      loss, grad = jax.value_and_grad(
          lambda x: nca.nca_loss(x, idx, bank, labels, temperature=T))(f)
      return bank_lib.update(bank, idx, f, 0.5), (loss, grad)
  # Compile first, so that the compiler's own memory is not counted as the step's.
  abstract_bank = jax.ShapeDtypeStruct((args.n, args.d), jnp.float32,
                                       sharding=mesh_lib.row_sharding(mesh))
  compiled = jax.jit(step, donate_argnums=0).lower(abstract_bank, f).compile()
  bank = jax.device_put(initial_bank(args.n, args.d), mesh_lib.row_sharding(mesh))
  jax.block_until_ready(bank)
  reset_peak()
  base = rss_mb() - args.n * args.d * 4 / 2**20      # the footprint without the bank
  times, first = [], None
  for i in range(args.repeats + 1):
    t = time.perf_counter()
    bank, out = compiled(bank, f)     # the bank is donated: updated in place
    jax.block_until_ready((bank, out))
    times.append(time.perf_counter() - t)
    first = out if first is None else first     # every variant's first step: the same inputs
  if name.startswith('floor'):
    return times[1:], base, None
  loss, grad = first
  return times[1:], base, (float(loss), np.asarray(grad, np.float32))


def torch_variant(args):
  import torch
  torch.set_num_threads(os.cpu_count())
  f, idx, labels = make_inputs(args.n, args.b, args.d, args.classes)
  stdv = 1.0 / (args.d / 3) ** 0.5
  memory = torch.rand(args.n, args.d).mul_(2 * stdv).add_(-stdv)
  labels = torch.from_numpy(labels).long()
  idx = torch.from_numpy(idx).long()
  reset_peak()
  base = rss_mb() - args.n * args.d * 4 / 2**20      # the footprint without the bank
  T, momentum = 0.05, 0.5

  class LinearAverageOp(torch.autograd.Function):
    """The original's LinearAverage: scores against the memory, momentum update in backward."""

    @staticmethod
    def forward(ctx, x, y, memory):
      ctx.save_for_backward(x, y, memory)
      return torch.mm(x, memory.t()) / T

    @staticmethod
    def backward(ctx, grad_out):
      x, y, memory = ctx.saved_tensors
      grad_in = torch.mm(grad_out, memory) / T
      rows = memory.index_select(0, y).mul_(momentum).add_(x * (1 - momentum))
      rows.div_(rows.pow(2).sum(1, keepdim=True).sqrt())
      memory.index_copy_(0, y, rows)
      return grad_in, None, None

  def nca_cross_entropy(scores, y):
    """The original's NCACrossEntropy (margin 0): plain exp, self excluded, masked log."""
    b, n = scores.shape
    e = torch.exp(scores)
    same = labels.index_select(0, y).view(b, 1).expand(b, n).eq(labels)
    e = e.scatter(1, y.view(-1, 1), 0)
    p = (e * same.float()).sum(1)
    z = e.sum(1)
    prob = p / z
    return -torch.log(torch.masked_select(prob, prob.ne(0))).sum() / b

  times = []
  for i in range(args.repeats + 1):
    x = torch.from_numpy(f).clone().requires_grad_(True)
    t = time.perf_counter()
    loss = nca_cross_entropy(LinearAverageOp.apply(x, idx, memory), idx)
    loss.backward()
    times.append(time.perf_counter() - t)
  return times[1:], base, None      # its own bank (torch.rand): nothing to compare


def child(args):
  for v in args.run.split(','):      # one variant a process, but in a smoke run (all in one)
    if v == 'torch':
      times, base, first = torch_variant(args)
    else:
      times, base, first = jax_variant(v, args)
    row = {'variant': v, 'ms': 1000 * float(np.median(times)), 'peak_mb': rss_mb('VmHWM') - base}
    if first is not None:            # the first step's loss and feature gradient, to compare
      row['loss'], row['grad_file'] = first[0], v.replace(':', '_') + '.npy'
      np.save(os.path.join(args.outputs, row['grad_file']), first[1])
    print(json.dumps(row), flush=True)


def agreement(results, outputs):
  """Per variant, its first step against ours (same inputs, same bank): the loss's relative
  difference and the feature gradient's largest difference over its largest entry."""
  ref = results.get('ours', {})
  if 'grad_file' not in ref:
    return {}
  g0 = np.load(os.path.join(outputs, ref['grad_file']))
  out = {}
  for v, r in results.items():
    if 'grad_file' in r:
      g = np.load(os.path.join(outputs, r['grad_file']))
      out[v] = (abs(r['loss'] - ref['loss']) / abs(ref['loss']),
                float(np.abs(g - g0).max() / np.abs(g0).max()))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--n', type=int, default=1_281_167)
  p.add_argument('--b', type=int, default=256)
  p.add_argument('--d', type=int, default=128)
  p.add_argument('--chunk', type=int, default=0, help='0: nca.default_chunk_size(B)')
  p.add_argument('--classes', type=int, default=1000, help='balanced random labels')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--variants', default=','.join(VARIANTS))
  p.add_argument('--run', help=argparse.SUPPRESS)
  p.add_argument('--outputs', help=argparse.SUPPRESS)
  p.add_argument('--smoke', action='store_true',
                 help='tiny sizes (N = 2,000, B = 16), to check that it runs')
  args = p.parse_args(argv)
  if args.smoke:
    args.n, args.b, args.repeats = 2_000, 16, 1
  try:
    [parse_variant(v) for v in (args.run or args.variants).split(',')]
  except ValueError as e:
    p.error(str(e))
  if args.run:
    unknown = {v for v in args.run.split(',')
               if parse_variant(v)[0] not in VARIANTS + ON_REQUEST}
    if unknown:
      p.error(f'--run {",".join(sorted(unknown))}: choose from {", ".join(VARIANTS + ON_REQUEST)}')
    return child(args)
  if args.smoke:
    print('smoke run: tiny sizes, to check that the benchmark runs; its figures mean nothing')
  bank_mb = args.n * args.d * 4 / 2**20
  sys.path.insert(0, ROOT)
  from snca_jax import distributed
  print(f'NCA step, N={args.n:,} B={args.b} D={args.d}, {args.classes} classes, JAX on its '
        f'default backend, CPU '
        f'x{os.cpu_count()} ({distributed.processor()}), median of {args.repeats}; bank = '
        f'{bank_mb:.0f} MB (peak MB: host memory)')
  results, failed = {}, []
  outputs = tempfile.mkdtemp()
  # Each variant in a process of its own, so that its peak memory is its own; a smoke run's
  # figures mean nothing, and its variants share one process (the suite's time).
  variants = args.variants.split(',')
  for group in [variants] if args.smoke else [[v] for v in variants]:
    cmd = [sys.executable, __file__, '--run', ','.join(group), '--n', str(args.n), '--b',
           str(args.b), '--d', str(args.d), '--chunk', str(args.chunk), '--repeats',
           str(args.repeats), '--classes', str(args.classes), '--outputs', outputs] + [
               '--smoke'] * args.smoke
    r = subprocess.run(cmd, capture_output=True, text=True)
    for line in r.stdout.splitlines():
      if line.startswith('{'):
        results[json.loads(line)['variant']] = json.loads(line)
    if r.returncode != 0:
      why = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode
      for v in group[len([v for v in group if v in results]):]:
        print(f'{v:6s} failed: {why}')
        failed.append(v)
  agree = agreement(results, outputs)
  shutil.rmtree(outputs, ignore_errors=True)
  width = max([11] + [len(v) + 1 for v in results])
  print(f"{'variant':{width}s}{'ms/step':>10s}{'x floor':>9s}{'peak MB':>10s}{'x bank':>8s}"
        f"{'loss vs ours':>14s}{'grad vs ours':>14s}"
        + ('   (_bf16 variants: x floor_bf16)' if 'floor_bf16' in results else ''))
  for v, r in results.items():
    own = 'floor_bf16' if '_bf16' in v and 'floor_bf16' in results else 'floor'
    floor = results.get(own, {}).get('ms')
    ratio = f"{r['ms'] / floor:.2f}" if floor else '-'
    loss_diff, grad_diff = (f'{x:.1e}' for x in agree[v]) if v in agree else ('-', '-')
    print(f"{v:{width}s}{r['ms']:10.1f}{ratio:>9s}{r['peak_mb']:10.0f}"
          f"{r['peak_mb'] / bank_mb:8.2f}{loss_diff:>14s}{grad_diff:>14s}")
  for v in ('ours', 'ours_bf16', 'no_index') + ON_REQUEST[:-1]:      # not floor_bf16
    others = [o for o in ('torch', 'dense', 'no_index') if o in results and o not in (v, 'ours')]
    if v in results and others:
      print(f'{v}: ' + ', '.join(f"{results[o]['ms'] / results[v]['ms']:.2f}x faster than {o}"
                                 for o in others))
  if failed:
    sys.exit(f'nca_step.py: variant(s) {", ".join(failed)} failed')


if __name__ == '__main__':
  main()
