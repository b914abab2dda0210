"""The whole training step: images per second, ours beside PyTorch written the original's way.

    python benchmarks/train_step.py                    # CPU: CIFAR ResNet-18, batch 128, 32x32
    python benchmarks/train_step.py --accelerator      # GPU/TPU: ResNet-50, 224x224, bfloat16

CPU mode, in one run, on all of this machine's cores:
  ours        snca_jax's jitted train_step (step.py): ResNet forward and backward, the NCA
              kernel against a bank of N = 50,000 rows with the bank update fused in, SGD with
              Nesterov momentum and weight decay; the state donated
  ours_resnet the same network's forward and backward alone (a linear loss on the embedding,
              no NCA, no optimizer), so that the rest of the step's share can be read off
  torch       the original's step in PyTorch: the same CIFAR ResNet-18, its LinearAverage
              (x @ memory.T / T, backward grad @ memory / T, in-place momentum update of the
              memory) and NCACrossEntropy, torch.optim.SGD (Nesterov, weight decay)
The step's inputs are synthetic (uint8 images for ours, normalised on the device; float32 for
torch, as its loader hands them over), and so are the labels.

Demo mode (--demo): the step `make demo` trains (configs/fashion_mnist.py:demo: small_resnet_s2,
batch 128 of 28x28x1, bank of 60,000 rows, NCA products in bfloat16 where the CPU has them),
run as the demo runs it (one JAX device per core, each single-threaded, unless XLA_FLAGS
already names a device count), with each lever beside it, all compiled first and then timed in
turns (the machine's busy spells fall on all alike):
  a bank of 6,000 rows (the NCA kernel's share of the step: its work scales with the bank),
  the default config's step (small_resnet, NCA products in float32: the demo's before),
  the NCA products in the other precision, batch 256 (learning rate 0.2), the network in
  bfloat16.
Every step reads the previous step's metrics back, as train.py does. With --profile, where the
demo step's time goes: a trace of it summed by kind of operation (`device_time`), each kind read
from the compiled program (`cpu_kinds`: the NCA kernel's products and the rest of it, the
network's convolutions forward and backward, layout transposes, collectives, ...).

Accelerator mode: ResNet-50 at 224x224 in bfloat16 (float32 parameters, optimizer state and
bank), bank of N = 1,281,167 rows; images/s, and the model FLOPs utilisation: the FLOPs XLA
counts in the compiled step over its time, against the chip's dense bfloat16 peak
(--peak_tflops, by default from the device's name: 989 for H100/H200). --levers times the step
again with each lever; --profile says where its time goes (a profiler trace summed by XLA
operation and kind: `device_time`); --whole_only times the whole step alone, with the settings
of --nca_kernel, --bn_statistics and --network_dtype (in a process of its own for XLA_FLAGS:
gpu.sh takes the profile so, with XLA's CUDA graphs off, which hide the kernels in them).
"""

import argparse
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK_BF16_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'TPU v4': 275.0,
                    'TPU v5 lite': 197.0, 'TPU v5': 459.0, 'TPU v6 lite': 918.0}


def compiled_step(config, n_bank, image_shape, classes):
  """`config`'s jitted train step as training makes it (with the class index where training
  would use one), on the default devices, compiled for 4 synthetic batches of uint8 images:
  (model, tx, state, batches, compiled)."""
  import jax
  from snca_jax import mesh as mesh_lib
  from snca_jax import models
  from snca_jax import optim
  from snca_jax import state as state_lib
  from snca_jax import step as step_lib

  mesh = mesh_lib.make_mesh()
  batch = config.batch_size
  model = models.model_from_config(config, num_devices=mesh.size)
  tx = optim.make_optimizer(config, n_bank // batch)
  labels = np.arange(n_bank, dtype=np.int32) % classes
  state = state_lib.create_train_state(model, tx, key=jax.random.key(0), bank_labels=labels,
                                       image_shape=image_shape,
                                       low_dim=models.embedding_dim(config), mesh=mesh)
  step = step_lib.make_train_step(
      model, tx, config, steps_per_epoch=n_bank // batch,
      shardings=jax.tree.map(lambda a: a.sharding, state), mesh=mesh,
      class_index=step_lib.class_index(config, state.bank_labels, mesh))
  rng = np.random.default_rng(0)
  batches = [step_lib.device_batch({
      'image': rng.integers(0, 256, (batch,) + image_shape, dtype=np.uint8),
      'index': rng.choice(n_bank, batch, replace=False).astype(np.int32),
      'label': rng.integers(0, classes, batch).astype(np.int32)}, mesh) for _ in range(4)]
  return model, tx, state, batches, step.lower(state, batches[0]).compile()


def ours(args, model_name, image_size, dtype, n_bank, batch_size=None, bn_float32=True,
         count_flops=True, nca_kernel='auto', network_dtype=None):
  """The step, compiled: (run_full, run_resnet, flops); `network_dtype` ('float16'): the
  network in another dtype than `dtype`, the NCA products' (float16 with its loss scaling)."""
  import jax
  import jax.numpy as jnp
  from configs import cifar10_resnet18
  from snca_jax import mesh as mesh_lib
  from snca_jax import models
  from snca_jax import state as state_lib
  from snca_jax import step as step_lib

  config = cifar10_resnet18.get_config()
  args = argparse.Namespace(**{**vars(args), 'batch': batch_size or args.batch})
  config.model = model_name
  config.bn_float32_statistics = bn_float32
  config.nca_kernel = nca_kernel
  config.dtype, config.nca_matmul_dtype = network_dtype or dtype, dtype
  config.nca_chunk_size = args.chunk
  config.batch_size = args.batch
  model, tx, state, batches, compiled = compiled_step(
      config, n_bank, (image_size, image_size, 3), 1000 if n_bank > 100_000 else 10)
  if not count_flops:
    def run_only(steps):
      nonlocal state
      for i in range(steps):
        state, metrics = compiled(state, batches[i % len(batches)])
      jax.block_until_ready(metrics['loss'])
    return run_only, None, float('nan')
  # The FLOPs of the step as written, which is what model FLOPs utilisation divides: XLA's
  # count of the same step lowered for the CPU, before any backend rewrites convolutions into
  # library calls it does not count (the NCA kernel's scan counts as one chunk: a lower bound).
  cpu = mesh_lib.make_mesh(jax.devices('cpu')[:1])
  abstract = state_lib.abstract_train_state(model, tx, image_shape=(image_size, image_size, 3),
                                            low_dim=128, num_examples=n_bank, mesh=cpu)
  on_cpu = step_lib.make_train_step(model, tx, config, steps_per_epoch=n_bank // args.batch,
                                    shardings=jax.tree.map(lambda a: a.sharding, abstract),
                                    mesh=cpu)
  rows = mesh_lib.row_sharding(cpu)
  cost = on_cpu.lower(abstract, {
      'image': jax.ShapeDtypeStruct((args.batch, image_size, image_size, 3), jnp.uint8,
                                    sharding=rows),
      'index': jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=rows),
      'label': jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=rows)}).cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  flops = cost.get('flops', float('nan'))

  def run_full(steps):
    nonlocal state
    for i in range(steps):
      state, metrics = compiled(state, batches[i % len(batches)])
    jax.block_until_ready(metrics['loss'])

  # The network alone: forward and backward with a linear loss on the embedding.
  mean, std = tuple(config.data.mean), tuple(config.data.std)

  @jax.jit
  def resnet_only(params, batch_stats, images):
    def loss(p):
      f, _ = model.apply({'params': p, 'batch_stats': batch_stats},
                         models.normalize_images(images, mean, std), train=True,
                         mutable=['batch_stats'])
      return jnp.sum(f * 0.01)
    return jax.grad(loss)(params)

  images = [b['image'] for b in batches]

  def run_resnet(steps):
    for i in range(steps):
      g = resnet_only(state.params, state.batch_stats, images[i % len(images)])
    jax.block_until_ready(g)

  return run_full, run_resnet, flops


def demo(args):
  """The demo's step and its levers: [(label, images/s)], timed in turns."""
  import jax
  from configs import fashion_mnist
  from snca_jax import schema

  n_bank, size = (1_000, 28) if args.smoke else (60_000, 28)

  def build(overrides, rows=n_bank):
    config = fashion_mnist.get_config('demo')
    for item in overrides:
      schema.override(config, item)
    if args.smoke:
      config.model, config.batch_size = 'tiny_resnet', config.batch_size // 16
    _, _, state, batches, compiled = compiled_step(config, rows, (size, size, 1), 10)

    def run(steps):
      nonlocal state
      pending = None
      for i in range(steps):
        state, metrics = compiled(state, batches[i % len(batches)])
        if pending is not None:
          jax.device_get(pending)                  # as train.py: the previous step's metrics
        pending = metrics
      jax.device_get(pending)
    run(2)                                         # warm up
    return run, config.batch_size, compiled

  other = 'float32' if fashion_mnist.get_config('demo').nca_matmul_dtype == 'bfloat16' else (
      'bfloat16')
  variants = [('the demo step', [], n_bank),
              (f'a bank of {n_bank // 10:,} rows', [], n_bank // 10),
              ("the default config's step", ['model=small_resnet', 'nca_matmul_dtype=float32',
                                             'num_epochs=5'], n_bank),
              (f'NCA products in {other}', [f'nca_matmul_dtype={other}'], n_bank),
              ('batch 256, learning rate 0.2', ['batch_size=256', 'learning_rate=0.2'], n_bank),
              ('the network in bfloat16', ['dtype=bfloat16'], n_bank)]
  if args.smoke:         # every lever's settings checked, two steps compiled (the suite's time)
    for _, overrides, _ in variants:
      for item in overrides:
        schema.override(fashion_mnist.get_config('demo'), item)
    variants = variants[:2]
  runs = [build(overrides, rows) for _, overrides, rows in variants]
  # The same images in each variant's run: the demo batch's steps, fewer with a larger batch.
  images = (args.steps or (2 if args.smoke else 40)) * runs[0][1]
  times = [[] for _ in runs]
  for _ in range(args.repeats):
    for i, (run, batch, _) in enumerate(runs):
      t = time.perf_counter()
      run(max(1, images // batch))
      times[i].append(time.perf_counter() - t)
  results = [(label, max(1, images // batch) * batch / float(np.median(ts)))
             for (label, _, _), (_, batch, _), ts in zip(variants, runs, times)]
  profile = []
  if args.profile:                # where the demo step's time goes, by kind of operation
    run, batch, compiled = runs[0]
    profile = device_time(run, 2 if args.smoke else 10, batch / results[0][1], top=16,
                          kinds=cpu_kinds(compiled.as_text()))
  return results, profile


def _kind(op):
  """The kind of work an XLA operation or kernel name stands for (device_time's rows)."""
  op = op.lower()
  for kind, words in (('memory copies', ('memcpy', 'memset')),
                      ('max-pool backward (select-and-scatter)', ('select-and-scatter',
                                                                  'select_and_scatter')),
                      ('convolutions (cuDNN)', ('conv', 'xmma', 'fprop', 'dgrad', 'wgrad')),
                      ('matrix products', ('gemm', 'dot', 'cublas', 'matmul', 'nvjet')),
                      ('Pallas / custom calls', ('pallas', 'custom-call', 'custom_call')),
                      ('transposes and copies', ('transpose', 'copy')),
                      ('reduction fusions (BatchNorm statistics, gradients)', ('reduce',)),
                      ('elementwise fusions', ('fusion',))):
    if any(w in op for w in words):
      return kind
  return 'other'


# Spans of a CPU trace that are the runtime's, not XLA's operations: the program's, its
# executor's, their waits (a collective's own span holds its wait for the other devices).
_RUNTIME_SPANS = ('ThreadpoolListener', 'end:', 'SlinkyThreadPool', 'ThunkExecutor', 'Wait',
                  'Rendezvous', 'InvokeRendezvous', 'Handle ', 'Allocate')


def _leaves(events):
  """The events of one trace line that hold no other: a while loop's span holds its body's
  operations, which are counted instead."""
  leaves, stack = [], []                         # stack: [end, event, holds another]
  for e in sorted(events, key=lambda e: (e.start_ns, -e.duration_ns)):
    while stack and stack[-1][0] <= e.start_ns:
      _, done, holds = stack.pop()
      if not holds:
        leaves.append(done)
    if stack:
      stack[-1][2] = True
    stack.append([e.end_ns, e, False])
  return leaves + [e for _, e, holds in stack if not holds]


_COLLECTIVES = {'all-reduce', 'all-reduce-start', 'all-gather', 'all-gather-start',
                'reduce-scatter', 'all-to-all', 'collective-permute'}


def cpu_kinds(hlo):
  """The kind of work of each operation of a compiled CPU program, by name, from its optimized
  HLO text (`compiled.as_text()`): what a fusion's computation holds (a convolution, a dot, a
  transpose, a collective) and the name the operation had in the program (its op_name: the
  NCA kernel and the bank update run in a shard_map; the network's backward pass is the
  transpose of its jvp). The weight gradients' convolutions and the layout transposes before
  them carry no op_name."""
  ops, lines, comp = {}, {}, None
  for line in hlo.splitlines():
    if line.endswith('{') and not line.startswith(' '):
      comp = line.split()[1 if line.startswith('ENTRY') else 0].lstrip('%')
      continue
    m = re.match(r'\s*(?:ROOT )?%(\S+) = (?:\((?:[^()]|\([^()]*\))*\)|\S+) ([\w-]+)\(', line)
    if m:
      ops.setdefault(comp, set()).add(m[2])
      lines[m[1]] = (m[2], line)
  kinds = {}
  for name, (opcode, line) in lines.items():
    called = re.search(r'calls=%([\w.-]+)', line)
    held = {opcode} | ops.get(called[1] if called else None, set())
    named = re.search(r'op_name="([^"]*)"', line)
    op_name = named[1] if named else ''
    if held & _COLLECTIVES:
      kind = 'collectives (BatchNorm statistics, gradients; their waits)'
    elif 'shard_map' in op_name:
      kind = 'NCA kernel and bank update: ' + ('matrix products' if 'dot' in held else 'the rest')
    elif 'convolution' in held:
      backward = 'transpose(' in op_name or not op_name
      kind = 'network: convolutions, ' + ('backward' if backward else 'forward')
    elif 'transpose' in held or opcode == 'copy':
      kind = 'layout transposes and copies'
    elif 'ResNet' in op_name:
      kind = 'network: BatchNorm, ReLU and other elementwise'
    else:
      kind = 'optimizer and the rest'
    kinds[name] = kind
  return kinds


def device_time(run, steps, step_time, top=12, kinds=None):
  """Where a step's time goes: a profiler trace of `steps` steps, each kernel's time summed by
  the XLA operation it runs (the trace's `hlo_op`, else the kernel's name) and by kind
  (`kinds`, a name's kind, where given: `cpu_kinds`; else from the name); on a CPU, XLA's
  operations on its threads, a device's share (all its threads' time over the devices; the
  rest of a step is in no operation's span: waits, the runtime's own work, and any work the
  trace does not place in one). Returns the report's lines: per step, the device's busy time
  against `step_time` (the untraced step), then the kinds and the `top` operations."""
  import glob
  import tempfile
  import jax
  run(1)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      run(steps)
    path = glob.glob(os.path.join(d, '**', '*.xplane.pb'), recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
  times = {}
  devices = [p for p in data.planes if p.name.startswith('/device:')]
  named = 0                     # kernels the trace names an XLA operation for
  for plane in devices:         # the GPU's streams (not the summary lines, which repeat them)
    lines = ([l for l in plane.lines if 'stream' in l.name.lower()]
             or [l for l in plane.lines if l.name == 'XLA Ops'])
    for line in lines:
      for e in line.events:
        op = dict(e.stats).get('hlo_op')
        named += bool(op)
        op = str(op or e.name)
        times[op] = times.get(op, 0.0) + e.duration_ns / 1e9 / steps
  share = 1
  if not times:                 # a CPU: XLA's threads (its client's and its pool's)
    share = len(jax.local_devices())
    for plane in data.planes:
      for line in plane.lines if plane.name == '/host:CPU' else ():
        if line.name.startswith('tf_XLA'):
          for e in _leaves(e for e in line.events
                           if not e.name.startswith(_RUNTIME_SPANS) and '::' not in e.name):
            times[e.name] = times.get(e.name, 0.0) + e.duration_ns / 1e9 / steps / share
  busy = sum(times.values())
  kind_of = lambda op: (kinds or {}).get(op) or _kind(op)
  by_kind = {}
  for op, t in times.items():
    by_kind[kind_of(op)] = by_kind.get(kind_of(op), 0.0) + t
  where = (f'device {devices[0].name}, {named} of its kernels named by XLA operation'
           if devices else f"the CPU's XLA threads, a device's share of {share}")
  out = [f'where the step goes ({where}; a trace of {steps} steps): busy {1000 * busy:.1f} ms '
         f'of the {1000 * step_time:.1f} ms step ({100 * busy / step_time:.0f}%)']
  for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
    out.append(f'  {kind:60s} {1000 * t:8.2f} ms {100 * t / busy:5.1f}%')
  out.append(f'  the {top} longest operations:')
  for op, t in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
    out.append(f'    {op[:40]:40s} {kind_of(op)[:48]:48s} {1000 * t:8.2f} ms')
  return out


def timed(fn, steps, repeats):
  fn(2)                                           # compile and warm up
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    fn(steps)
    best = min(best, (time.perf_counter() - t) / steps)
  return best


def torch_step(args, n_bank):
  """The original's training step, in PyTorch, on the CPU."""
  import torch
  import torch.nn as nn
  import torch.nn.functional as F
  torch.set_num_threads(os.cpu_count())
  T, momentum = 0.05, 0.5

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.shortcut = nn.Sequential()
      if stride != 1 or cin != cout:
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

  class ResNet18(nn.Module):                   # the original's models/resnet_cifar.py
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      layers, cin = [], 64
      for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
      self.layers = nn.Sequential(*layers)
      self.linear = nn.Linear(512, 128)

    def forward(self, x):
      out = self.layers(F.relu(self.bn1(self.conv1(x))))
      out = F.avg_pool2d(out, 4).flatten(1)
      return F.normalize(self.linear(out), dim=1)

  stdv = 1 / np.sqrt(128 / 3)
  memory = torch.rand(n_bank, 128).mul_(2 * stdv).add_(-stdv)
  labels = torch.from_numpy(np.arange(n_bank) % 10).long()

  class LinearAverageOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
      ctx.save_for_backward(x, y)
      return torch.mm(x, memory.t()) / T

    @staticmethod
    def backward(ctx, grad_out):
      x, y = ctx.saved_tensors
      grad_in = torch.mm(grad_out, memory) / T
      pos = memory.index_select(0, y).mul_(momentum).add_(x.detach() * (1 - momentum))
      memory.index_copy_(0, y, pos.div(pos.pow(2).sum(1, keepdim=True).sqrt()))
      return grad_in, None

  def nca_cross_entropy(x, indexes):
    b = x.size(0)
    exp = torch.exp(x)
    exp.data.scatter_(1, indexes.view(-1, 1), 0)     # self-exclusion, as the original does it
    same = labels.view(1, -1).expand(b, -1).eq(labels.index_select(0, indexes).view(-1, 1))
    p = torch.mul(exp, same.float()).sum(dim=1)
    z = exp.sum(dim=1)
    prob = torch.div(p, z)
    return -torch.log(torch.masked_select(prob, prob.ne(0))).sum() / b

  model = ResNet18().train()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                        nesterov=True)
  rng = np.random.default_rng(0)
  batches = [(torch.from_numpy(rng.normal(size=(args.batch, 3, 32, 32)).astype(np.float32)),
              torch.from_numpy(rng.choice(n_bank, args.batch, replace=False)).long())
             for _ in range(4)]

  def run(steps):
    for i in range(steps):
      x, idx = batches[i % len(batches)]
      features = model(x)
      loss = nca_cross_entropy(LinearAverageOp.apply(features, idx), idx)
      opt.zero_grad()
      loss.backward()
      opt.step()

  return run


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--accelerator', action='store_true')
  p.add_argument('--batch', type=int, default=None)
  p.add_argument('--steps', type=int, default=None)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--peak_tflops', type=float, default=None)
  p.add_argument('--skip_torch', action='store_true')
  p.add_argument('--chunk', type=int, default=0, help='NCA kernel chunk (0: its default)')
  p.add_argument('--levers', action='store_true', help='then the whole step again with each '
                 'lever, each printed as it finishes: the other NCA kernel, twice the batch '
                 'with BatchNorm statistics in the compute dtype and the Pallas kernel, the '
                 'network in float16')
  p.add_argument('--profile', action='store_true', help='where the whole step\'s time goes: '
                 'a profiler trace of it, by kind of operation')
  p.add_argument('--whole_only', action='store_true', help='the whole step alone (say in a '
                 'process of its own with other XLA_FLAGS)')
  p.add_argument('--nca_kernel', default='auto', help="the step's NCA kernel: auto (as "
                 "training: Pallas on GPUs with bfloat16 products), xla or pallas")
  p.add_argument('--bn_statistics', default='float32', choices=('float32', 'compute'),
                 help="the step's BatchNorm statistics: in float32 or the compute dtype")
  p.add_argument('--network_dtype', default=None, help="the step's network in another dtype "
                 "than the recipe's (float16)")
  p.add_argument('--demo', action='store_true', help="make demo's step and its levers")
  p.add_argument('--smoke', action='store_true',
                 help='tiny sizes (tiny ResNet, batch 8, bank of 1,000), to check that it runs')
  args = p.parse_args(argv)
  if args.demo and 'device_count' not in os.environ.get('XLA_FLAGS', ''):   # as the Makefile
    os.environ['XLA_FLAGS'] = (f'--xla_force_host_platform_device_count={os.cpu_count()} '
                               f'--xla_cpu_multi_thread_eigen=false '
                               f'{os.environ.get("XLA_FLAGS", "")}')
  import jax
  if args.demo:
    if args.smoke:
      args.repeats = 1
      print('smoke run: tiny sizes, to check that the benchmark runs; its figures mean nothing')
    from snca_jax import distributed
    print(f"make demo's step (configs/fashion_mnist.py:demo), {len(jax.devices())} x "
          f"{jax.devices()[0].device_kind} ({distributed.processor()}), "
          f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}; median of {args.repeats} rounds in turns")
    results, profile = demo(args)
    base = results[0][1]
    for label, rate in results:
      print(f'{label:40s} {rate:9.1f} images/s {rate / base:6.2f}x')
    nca = 1 / base - 1 / results[1][1]           # the NCA kernel's time scales with the bank
    print(f'the NCA kernel against the bank: about {100 * nca * base / 0.9:.0f}% of the step '
          f'(from the step with a tenth of the bank)')
    print('\n'.join(profile))
    return
  device = jax.devices()[0]
  if args.accelerator:
    args.batch, args.steps = args.batch or 256, args.steps or 20
    name, size, dtype, n_bank = 'resnet50', 224, 'bfloat16', 1_281_167
  else:
    args.batch, args.steps = args.batch or 128, args.steps or 5
    name, size, dtype, n_bank = 'cifar_resnet18', 32, 'float32', 50_000
  if args.smoke:
    args.batch, args.steps, args.repeats = 8, 1, 1
    name, size, n_bank = 'tiny_resnet', 32, 1_000
  if args.smoke:
    print('smoke run: tiny sizes, to check that the benchmark runs; its figures mean nothing')
  from snca_jax import distributed
  settings = ''.join([f', network in {args.network_dtype}'] * bool(args.network_dtype)
                     + [f', NCA kernel {args.nca_kernel}'] * (args.nca_kernel != 'auto')
                     + [', BatchNorm statistics in the compute dtype']
                     * (args.bn_statistics != 'float32'))
  print(f'{name}, batch {args.batch} of {size}x{size}, {dtype}{settings}, bank of {n_bank:,} rows; '
        f'{len(jax.devices())} x {device.device_kind} ({distributed.processor()}); best of '
        f'{args.repeats} runs of {args.steps} steps')
  run_full, run_resnet, flops = ours(args, name, size, dtype, n_bank,
                                     bn_float32=args.bn_statistics == 'float32',
                                     count_flops=not args.whole_only,
                                     nca_kernel=args.nca_kernel,
                                     network_dtype=args.network_dtype)
  t_full = timed(run_full, args.steps, args.repeats)
  if args.whole_only:
    print(f'ours: whole step {1000 * t_full:9.1f} ms {args.batch / t_full:9.1f} images/s')
    for line in device_time(run_full, args.steps, t_full) if args.profile else ():
      print(line)
    return
  t_resnet = timed(run_resnet, args.steps, args.repeats)
  rows = [('ours: whole step', t_full), ('ours: ResNet forward+backward only', t_resnet)]
  if not args.accelerator and not args.skip_torch:
    rows.append(('torch, the original\'s step', timed(torch_step(args, n_bank), args.steps,
                                                        args.repeats)))
  for label, t in rows:
    print(f'{label:40s} {1000 * t:9.1f} ms {args.batch / t:9.1f} images/s')
  print(f'outside the ResNet (NCA, bank update, optimizer): '
        f'{100 * max(t_full - t_resnet, 0) / t_full:.1f}% of the step')
  if len(rows) == 3:
    print(f'ours / torch: {rows[2][1] / t_full:.2f}x the images per second')
  if args.accelerator:
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items()
                                     if k in device.device_kind), float('nan'))
    achieved = flops / t_full / 1e12
    print(f'XLA counts {flops / 1e9:.0f} GFLOP a step: {achieved:.0f} TFLOP/s, '
          f'{100 * achieved / peak:.1f}% of the {peak:.0f} TFLOP/s bfloat16 peak (MFU)')
  if args.profile:
    for line in device_time(run_full, args.steps, t_full):
      print(line)
  if args.levers:
    levers(args, name, size, dtype, n_bank, args.batch / t_full)


def levers(args, name, size, dtype, n_bank, base):
  """The whole step again with each lever, one run each (device time is short), each printed
  as it finishes: (label, batch, BatchNorm statistics in float32, NCA kernel, network dtype).
  XLA flags are no lever here, as they need a process of their own (`XLA_FLAGS=...
  train_step.py --accelerator --whole_only`; BENCHMARKS.md has the one tried)."""
  print(f'levers (whole step, one run of {args.steps} steps each; '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}):')
  import ml_collections
  from snca_jax import mesh as mesh_lib
  from snca_jax import step as step_lib
  twice = 2 * args.batch
  kernel = step_lib.nca_kernel(ml_collections.ConfigDict(
      {'nca_kernel': args.nca_kernel, 'nca_matmul_dtype': dtype}), mesh_lib.make_mesh())
  other = 'xla' if kernel == 'pallas' else 'pallas'
  levers = [(f'the NCA kernel {other} (the step: {kernel})', args.batch, True, other, None),
            (f'batch {twice}, BatchNorm statistics in {dtype}, Pallas NCA', twice, False,
             'pallas', None),
            ('the network in float16', args.batch, True, args.nca_kernel, 'float16')]
  if args.smoke:          # the combined lever takes most settings (the suite's time)
    levers = levers[1:]
  for label, batch, bn_float32, lever_kernel, network_dtype in levers:
    try:
      run, _, _ = ours(args, name, size, dtype, n_bank, batch, bn_float32, count_flops=False,
                       nca_kernel=lever_kernel, network_dtype=network_dtype)
    except Exception as e:                         # a lever this backend cannot build
      print(f'{label:40s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}')
      continue
    t = timed(run, args.steps, 1)
    print(f'{label:40s} {1000 * t:9.1f} ms {batch / t:9.1f} images/s {batch / t / base:6.2f}x')


if __name__ == '__main__':
  main()
