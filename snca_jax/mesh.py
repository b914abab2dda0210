"""The device mesh and the shardings of the arrays that live on it.

One axis, 'data', spans every device of every process: batches are split along it, and so are
the memory bank's rows. Parameters and optimizer state are replicated. (A model axis would be a
second mesh axis; parameters would then be sharded over it.)
"""

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

DATA = 'data'


def make_mesh(devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (DATA,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def row_sharding(mesh) -> NamedSharding:
  """Split along the leading axis over 'data' (batches, bank rows)."""
  return NamedSharding(mesh, P(DATA))


def padded_rows(num_rows: int, mesh) -> int:
  """`num_rows` rounded up so that the rows split evenly over the mesh."""
  n = mesh.shape[DATA]
  return -(-num_rows // n) * n
