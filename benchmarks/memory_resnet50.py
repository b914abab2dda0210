"""Per-device memory of a ResNet-50 ImageNet training step with the bank sharded (XLA's account).

    python benchmarks/memory_resnet50.py [--devices 8] [--per_device_batch 32]

Builds the real train state for N = 1,281,167 (configs/imagenet_resnet50.py, 128-d bank
sharded by rows over --devices simulated CPU devices), compiles the real train step for a
global batch of devices x per_device_batch at 224x224, and prints what one device holds: its
share of the bank, the replicated parameters, batch statistics and optimizer state, and the
step's temporaries as XLA's buffer assignment counts them (`memory_analysis()`, CPU compiler;
a GPU or TPU compiler assigns buffers differently, so read it as an estimate there).
"""

import argparse
import os
import sys

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument('--devices', type=int, default=8)
p.add_argument('--per_device_batch', type=int, default=32)
p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
p.add_argument('--smoke', action='store_true', help='a tiny ResNet at 32x32 with a bank of '
               '1,000 rows on 2 devices, to check that it runs')
args = p.parse_args()
if args.smoke:
  args.devices, args.per_device_batch = 2, 2

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', args.devices)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import imagenet_resnet50  # noqa: E402
from snca_jax import mesh as mesh_lib  # noqa: E402
from snca_jax import models  # noqa: E402
from snca_jax import optim  # noqa: E402
from snca_jax import state as state_lib  # noqa: E402
from snca_jax import step as step_lib  # noqa: E402

MB = 2**20


def per_device_bytes(tree):
  return sum(max(s.data.nbytes for s in x.addressable_shards) for x in jax.tree.leaves(tree))


def main():
  config = imagenet_resnet50.get_config()
  config.dtype = args.dtype
  n, size = 1_281_167, 224
  if args.smoke:
    print('smoke run: tiny sizes, to check that the benchmark runs; its figures mean nothing')
    config.model, n, size = 'tiny_resnet', 1_000, 32
  config.batch_size = args.devices * args.per_device_batch
  config.grad_accum_steps = 1
  mesh = mesh_lib.make_mesh()
  model = models.model_from_config(config)
  steps = n // config.batch_size
  tx = optim.make_optimizer(config, steps)
  labels = np.arange(n, dtype=np.int32) % 1000
  state = state_lib.create_train_state(model, tx, key=jax.random.key(0), bank_labels=labels,
                                       image_shape=(size, size, 3), low_dim=128, mesh=mesh)
  shardings = jax.tree.map(lambda a: a.sharding, state)
  step = step_lib.make_train_step(model, tx, config, steps_per_epoch=steps,
                                  shardings=shardings, mesh=mesh)
  batch = {'image': jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.uint8),
           'index': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32),
           'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
  mem = step.lower(state, batch).compile().memory_analysis()
  bank = per_device_bytes((state.bank, state.bank_labels))
  params = per_device_bytes(state.params)
  rest = per_device_bytes((state.batch_stats, state.opt_state))
  images = args.per_device_batch * size * size * 3          # uint8, normalised on the device
  print(f'{config.model} at {size}x{size}, N={n:,}, {args.devices} devices, global batch '
        f'{config.batch_size} '
        f'({args.per_device_batch} per device), {args.dtype} compute; per device:')
  label = f'  bank + labels (1/{args.devices} of {n * 132 * 4 / MB:.0f} MB)'
  print(f'{label:41s}{bank / MB:10.1f} MB')
  print(f'  parameters                             {params / MB:10.1f} MB')
  print(f'  batch statistics + optimizer state     {rest / MB:10.1f} MB')
  print(f'  input images                           {images / MB:10.1f} MB')
  print(f'  step temporaries (XLA CPU)             {mem.temp_size_in_bytes / MB:10.1f} MB')
  total = bank + params + rest + images + mem.temp_size_in_bytes
  print(f'  total                                  {total / MB:10.1f} MB')


if __name__ == '__main__':
  main()
