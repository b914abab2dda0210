"""The train state: one pytree, where each of its arrays lives, and how a fresh one is made.

    step         ()      batches seen (the data position and every schedule derive from it)
    params              replicated
    batch_stats         replicated
    opt_state           replicated
    bank         (N', D) sharded by rows over 'data'; N' = N rounded up to the device count
    bank_labels  (N',)   sharded likewise; bank.PAD_LABEL (-1) marks the padding rows

Where the state comes from:
  - `create_train_state`: fresh. The init is evaluated abstractly (`jax.eval_shape`), every
    array's sharding is stated once (`state_shardings`), and the init runs jitted with those
    `out_shardings`, so the bank is born sharded and no device ever holds all of it.
  - `from_arrays`: host arrays (what the converter has, or a converted checkpoint resumed under
    another optimizer), padded (`bank.pad`) and placed as above.
  - a checkpoint: `checkpoint.restore_train_state`, onto any mesh, into `abstract_train_state`.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from snca_jax import bank as bank_lib
from snca_jax import distributed
from snca_jax import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  bank: jax.Array
  bank_labels: jax.Array


def state_shardings(abstract_state: TrainState, mesh) -> TrainState:
  rep = mesh_lib.replicated(mesh)
  return TrainState(
      step=rep,
      params=jax.tree.map(lambda _: rep, abstract_state.params),
      batch_stats=jax.tree.map(lambda _: rep, abstract_state.batch_stats),
      opt_state=jax.tree.map(lambda _: rep, abstract_state.opt_state),
      bank=mesh_lib.row_sharding(mesh),
      bank_labels=mesh_lib.row_sharding(mesh),
  )


def _init_fn(model, tx: optax.GradientTransformation, image_shape, low_dim: int):
  def init(key, bank_labels):        # bank_labels: padded for the mesh (bank_lib.pad)
    model_key, bank_key = jax.random.split(key)
    variables = model.init(model_key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables['params']
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get('batch_stats', {}),
        opt_state=tx.init(params),
        bank=bank_lib.init(bank_key, bank_labels.shape[0], low_dim),
        bank_labels=bank_labels,
    )
  return init


def _abstract(init, num_examples: int, mesh):
  abstract = jax.eval_shape(init, jax.random.key(0), jax.ShapeDtypeStruct(
      (bank_lib.num_rows(num_examples, mesh),), jnp.int32))
  return abstract, state_shardings(abstract, mesh)


def abstract_train_state(model, tx, *, image_shape, low_dim, num_examples, mesh) -> TrainState:
  """The state's shapes, dtypes and shardings (jax.ShapeDtypeStruct leaves), without
  computing anything: what a checkpoint restores into."""
  init = _init_fn(model, tx, image_shape, low_dim)
  abstract, shardings = _abstract(init, num_examples, mesh)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def create_train_state(model, tx, *, key, bank_labels, image_shape, low_dim, mesh) -> TrainState:
  """A fresh state: model init, optimizer init, bank uniform in [-s, s] (docs/METHOD.md), the
  labels of the training set beside it, every array placed as `state_shardings` says."""
  bank_labels = np.asarray(bank_labels, np.int32)
  init = _init_fn(model, tx, image_shape, low_dim)
  _, shardings = _abstract(init, len(bank_labels), mesh)
  rows = bank_lib.num_rows(len(bank_labels), mesh)
  return jax.jit(init, out_shardings=shardings)(
      key, bank_lib.pad_rows(bank_labels, rows, bank_lib.PAD_LABEL))


def _host(tree):
  return jax.tree.map(distributed.to_host, tree)


def from_arrays(*, params, batch_stats, bank, bank_labels, tx, mesh,
                step: int = 0) -> TrainState:
  """A state built from host (or global) arrays, identical on every process, placed as
  `state_shardings` says: the bank padded for `mesh`, a fresh optimizer state for `tx`."""
  rep = mesh_lib.replicated(mesh)
  bank, bank_labels = bank_lib.pad(*_host((bank, bank_labels)),
                                   bank_lib.num_rows(len(bank), mesh))
  put = lambda tree, sharding: jax.tree.map(
      lambda x: distributed.put_global(x, sharding), _host(tree))
  params = put(params, rep)
  return TrainState(
      step=put(np.int32(step), rep), params=params, batch_stats=put(batch_stats, rep),
      opt_state=jax.jit(tx.init, out_shardings=rep)(params),
      bank=put(bank, mesh_lib.row_sharding(mesh)),
      bank_labels=put(bank_labels, mesh_lib.row_sharding(mesh)))
