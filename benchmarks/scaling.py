"""What a device holds and what a training step communicates, as N grows (8 simulated devices).

    python benchmarks/scaling.py

For N = 50,000 and N = 1,281,167 it builds the real train state (tiny ResNet, 128-d bank
sharded by rows over 8 CPU devices), compiles the real `train_step` (streaming NCA kernel and
sharded bank update), and reports:
  - bank bytes held per device (max / min over devices);
  - bytes moved by the step's collectives, summed over the compiled HLO's all-reduce,
    all-gather, reduce-scatter, all-to-all and collective-permute results;
  - the compiled step's temporary memory per device (XLA's memory analysis).
The bank per device grows with N; the communication must not.
"""

import os
import re
import sys

import jax

jax.config.update('jax_num_cpu_devices', 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import fashion_mnist  # noqa: E402
from snca_jax import mesh as mesh_lib  # noqa: E402
from snca_jax import models  # noqa: E402
from snca_jax import nca  # noqa: E402
from snca_jax import optim  # noqa: E402
from snca_jax import state as state_lib  # noqa: E402
from snca_jax import step as step_lib  # noqa: E402

_BYTES = {'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2, 'pred': 1, 's8': 1, 'u8': 1,
          'f64': 8, 's64': 8, 'u64': 8}
_COLLECTIVE = re.compile(
    r'=\s*(\(?[^=]*?\)?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)'
    r'(-start)?\(')
_SHAPE = re.compile(r'(\w+)\[([\d,]*)\]')


def collective_bytes(hlo_text: str) -> int:
  total = 0
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    for dtype, dims in _SHAPE.findall(m.group(1)):
      if dtype in _BYTES:
        total += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(',') if d] or [1]))
  return total


def measure(n: int, config):
  mesh = mesh_lib.make_mesh()
  model = models.model_from_config(config)
  steps = n // config.batch_size
  tx = optim.make_optimizer(config, steps)
  labels = np.arange(n, dtype=np.int32) % 1000
  state = state_lib.create_train_state(model, tx, key=jax.random.key(0), bank_labels=labels,
                                       image_shape=(32, 32, 3), low_dim=config.low_dim,
                                       mesh=mesh)
  shardings = jax.tree.map(lambda a: a.sharding, state)
  step = step_lib.make_train_step(model, tx, config, steps_per_epoch=steps,
                                  shardings=shardings, mesh=mesh)
  batch = {'image': jax.ShapeDtypeStruct((config.batch_size, 32, 32, 3), jnp.uint8),
           'index': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32),
           'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
  compiled = step.lower(state, batch).compile()
  shard_bytes = [s.data.nbytes for s in state.bank.addressable_shards]
  mem = compiled.memory_analysis()
  return (max(shard_bytes), min(shard_bytes), collective_bytes(compiled.as_text()),
          getattr(mem, 'temp_size_in_bytes', float('nan')))


def main():
  smoke = '--smoke' in sys.argv[1:]   # N = 1,000 and 5,000, batch 16: to check that it runs
  config = fashion_mnist.get_config()
  config.model, config.low_dim, config.batch_size = 'tiny_resnet', 128, 16 if smoke else 256
  if smoke:
    print('smoke run: tiny sizes, to check that the benchmark runs; its figures mean nothing')
  config.data.num_classes = 1000
  print(f'{len(jax.devices())} devices, batch {config.batch_size}, D {config.low_dim}, '
        f'NCA chunk {config.nca_chunk_size or nca.default_chunk_size(config.batch_size)}')
  print(f"{'N':>10s}{'bank MB/dev max':>17s}{'min':>8s}{'step comm. KB':>15s}"
        f"{'step temp MB/dev':>18s}")
  for n in (1_000, 5_000) if smoke else (50_000, 1_281_167):
    hi, lo, comm, temp = measure(n, config)
    print(f'{n:>10,}{hi / 2**20:17.2f}{lo / 2**20:8.2f}{comm / 2**10:15.1f}{temp / 2**20:18.1f}')


if __name__ == '__main__':
  main()
