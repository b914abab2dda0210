"""The train state: one pytree, created directly where it lives on the mesh.

    step         ()      batches seen (the data position and every schedule derive from it)
    params              replicated
    batch_stats         replicated
    opt_state           replicated
    bank         (N', D) sharded by rows over 'data'; N' = N rounded up to the device count
    bank_labels  (N',)   sharded likewise; -1 marks the padding rows

`create_train_state` evaluates the init abstractly (`jax.eval_shape`), states every array's
sharding once (`state_shardings`), and runs the init jitted with those `out_shardings`, so the
bank is born sharded and no device ever holds all of it.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from snca_jax import mesh as mesh_lib
from snca_jax import nca


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
      bank=mesh_lib.rows(mesh),
      bank_labels=mesh_lib.rows(mesh),
  )


def _init_fn(model, tx: optax.GradientTransformation, image_shape, low_dim: int,
             num_bank_rows: int):
  def init(key, bank_labels):
    model_key, bank_key = jax.random.split(key)
    variables = model.init(model_key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables['params']
    n = bank_labels.shape[0]
    labels = jnp.full((num_bank_rows,), nca.PAD_LABEL, jnp.int32).at[:n].set(bank_labels)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get('batch_stats', {}),
        opt_state=tx.init(params),
        bank=nca.init_bank(bank_key, num_bank_rows, low_dim),
        bank_labels=labels,
    )
  return init


def _abstract(init, num_examples: int, mesh):
  abstract = jax.eval_shape(init, jax.random.key(0),
                            jax.ShapeDtypeStruct((num_examples,), jnp.int32))
  return abstract, state_shardings(abstract, mesh)


def abstract_train_state(model, tx, *, image_shape, low_dim, num_examples, mesh) -> TrainState:
  """The state's shapes, dtypes and shardings (jax.ShapeDtypeStruct leaves), without
  computing anything: what a checkpoint restores into."""
  init = _init_fn(model, tx, image_shape, low_dim, mesh_lib.padded_rows(num_examples, mesh))
  abstract, shardings = _abstract(init, num_examples, mesh)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def create_train_state(model, tx, *, key, bank_labels, image_shape, low_dim, mesh) -> TrainState:
  """A fresh state: model init, optimizer init, bank uniform in [-s, s] (SPEC.md), the labels of
  the training set beside it, every array placed as `state_shardings` says."""
  bank_labels = np.asarray(bank_labels, np.int32)
  init = _init_fn(model, tx, image_shape, low_dim,
                  mesh_lib.padded_rows(len(bank_labels), mesh))
  _, shardings = _abstract(init, len(bank_labels), mesh)
  return jax.jit(init, out_shardings=shardings)(key, bank_labels)
