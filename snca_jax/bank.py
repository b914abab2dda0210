"""The memory bank's rules (docs/METHOD.md, "Memory bank"): its rows, padding, labels,
initialisation, momentum update and placement.

    bank         (N', D)  one row per training example, indexed by the example's dense index
    bank_labels  (N',)    the training labels; PAD_LABEL (-1) marks padding rows

N' is N rounded up to a multiple of the devices (`mesh.padded_rows`), so that the rows split
evenly over the mesh's data axis. Padding rows are zero and labelled PAD_LABEL: they never
count as neighbours (kNN), take part in neither P nor Z (NCA), and are never written.

The bank is state, not a parameter: no gradient flows into it and the optimizer never sees it.
Training writes it inside the NCA kernel (`nca.nca_step`, in place); `update` here is the
plain reference of that write.
"""

import jax
import jax.numpy as jnp
import numpy as np

from snca_jax import distributed
from snca_jax import mesh as mesh_lib
from snca_jax.models import l2_normalize

PAD_LABEL = -1


def num_rows(num_examples: int, mesh) -> int:
  """The bank's length on `mesh`: the examples, rounded up to a multiple of the devices."""
  return mesh_lib.padded_rows(num_examples, mesh)


def pad_rows(x, rows: int, fill=0):
  """`x` cut or padded with `fill` to `rows` rows. Host arrays stay host arrays; jax arrays
  (also inside jit) stay on the devices."""
  xp = jnp if isinstance(x, jax.Array) else np
  n = min(rows, x.shape[0])
  return xp.pad(x[:n], ((0, rows - n),) + ((0, 0),) * (x.ndim - 1), constant_values=fill)


def pad(bank, bank_labels, rows: int):
  """The bank and its (int32) labels cut or padded to `rows` rows: padding rows are zero and
  labelled PAD_LABEL."""
  labels = bank_labels.astype(jnp.int32) if isinstance(bank_labels, jax.Array) else np.asarray(
      bank_labels, np.int32)
  return pad_rows(bank, rows), pad_rows(labels, rows, PAD_LABEL)


def init(key, rows: int, dim: int, dtype=jnp.float32):
  """Uniform in [-s, s] with s = 1 / sqrt(dim / 3), not normalised (as the original)."""
  stdv = 1.0 / (dim / 3.0) ** 0.5
  return jax.random.uniform(key, (rows, dim), dtype, minval=-stdv, maxval=stdv)


def update(bank, indices, features, momentum):
  """bank[i] <- normalize(momentum * bank[i] + (1 - momentum) * f_i) for every batch row."""
  features = jax.lax.stop_gradient(features).astype(bank.dtype)
  rows = bank[indices]
  new = l2_normalize(momentum * rows + (1.0 - momentum) * features)
  return bank.at[indices].set(new, unique_indices=False)


def place(bank, bank_labels, mesh):
  """The bank and its labels split by rows over `mesh`: global arrays are resharded where they
  live, host arrays placed; rows that do not split evenly are padded with rows that never
  count (through the host, the only case that copies the bank there)."""
  rows = num_rows(bank.shape[0], mesh)
  if rows != bank.shape[0]:
    bank, bank_labels = pad(distributed.to_host(bank), distributed.to_host(bank_labels), rows)

  def put(x):
    if isinstance(x, jax.Array):
      return jax.device_put(x, mesh_lib.row_sharding(mesh))
    return distributed.put_global(x, mesh_lib.row_sharding(mesh))

  return put(bank), put(bank_labels)


def scan_chunks(fold, init, arrays, chunk: int, total: int | None = None):
  """Folds `fold(carry, rows, fresh, *chunks) -> carry` over the rows of `arrays` (each split
  along its leading axis, of the same length), `chunk` rows at a time, inside a `lax.scan`:
  peak memory grows with the chunk, not with the bank. `rows` (chunk,) are the chunk's row
  indices; where `chunk` does not divide the rows, the last chunk overlaps the one before it
  (so the bank needs no padding per chunk), and `fresh` (chunk,) is False on the rows that were
  already folded. The NCA kernel and the kNN search both walk a device's bank this way.
  `total` folds only the leading rows (default: all), without copying them out."""
  total = arrays[0].shape[0] if total is None else total
  chunk = min(chunk, total)

  def body(carry, c):
    start = jnp.minimum(c * chunk, total - chunk)
    rows = start + jnp.arange(chunk)
    chunks = [jax.lax.dynamic_slice_in_dim(a, start, chunk, axis=0) for a in arrays]
    return fold(carry, rows, rows >= c * chunk, *chunks), None

  carry, _ = jax.lax.scan(body, init, jnp.arange(-(-total // chunk)))
  return carry


def database_size(bank_labels) -> int:
  """Images in a bank or any database: its rows but the padding ones, counted where the labels
  live (a sharded bank's stay on the devices)."""
  if isinstance(bank_labels, jax.Array):
    return int(jnp.sum(bank_labels >= 0))
  return int(np.sum(np.asarray(bank_labels) >= 0))
