"""The train state: one pytree, and every step of its life, from creation to restore.

    step         ()      batches seen (the data position and every schedule derive from it)
    params              replicated
    batch_stats         replicated
    opt_state           replicated
    bank         (N', D) sharded by rows over 'data'; N' = N rounded up to the device count
    bank_labels  (N',)   sharded likewise; PAD_LABEL (-1) marks the padding rows

Where the state comes from:
  - `create_train_state`: fresh. The init is evaluated abstractly (`jax.eval_shape`), every
    array's sharding is stated once (`state_shardings`), and the init runs jitted with those
    `out_shardings`, so the bank is born sharded and no device ever holds all of it.
  - `restore`: a checkpoint written on any number of devices and processes, onto this mesh:
    a bank padded for another device count is re-padded for this one; a checkpoint without an
    optimizer state of its own (a converted one) starts a fresh one for this run's optimizer.
  - `from_arrays`: host arrays (what the converter has), padded and placed as above.
The bank's padding rule lives here alone: `num_rows` and `pad_bank`.
"""

import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from snca_jax import checkpoint
from snca_jax import distributed
from snca_jax import mesh as mesh_lib
from snca_jax import nca
from snca_jax.errors import CheckpointError

PAD_LABEL = nca.PAD_LABEL
ROW_FIELDS = ('bank', 'bank_labels')      # the fields split by rows over 'data'


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  bank: jax.Array
  bank_labels: jax.Array


def num_rows(num_examples: int, mesh) -> int:
  """The bank's length on `mesh`: the examples, rounded up to a multiple of the devices."""
  return mesh_lib.padded_rows(num_examples, mesh)


def pad_bank(bank, bank_labels, rows: int):
  """Host arrays of the bank and its labels, cut or padded to `rows` rows: padding rows are
  zero and labelled PAD_LABEL, so they never count as neighbours."""
  bank, bank_labels = np.asarray(bank), np.asarray(bank_labels, np.int32)
  n = min(rows, len(bank))
  return (np.pad(bank[:n], ((0, rows - n), (0, 0))),
          np.pad(bank_labels[:n], (0, rows - n), constant_values=PAD_LABEL))


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
    labels = jnp.full((num_bank_rows,), PAD_LABEL, jnp.int32).at[:n].set(bank_labels)
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
  init = _init_fn(model, tx, image_shape, low_dim, num_rows(num_examples, mesh))
  abstract, shardings = _abstract(init, num_examples, mesh)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def create_train_state(model, tx, *, key, bank_labels, image_shape, low_dim, mesh) -> TrainState:
  """A fresh state: model init, optimizer init, bank uniform in [-s, s] (docs/METHOD.md), the
  labels of the training set beside it, every array placed as `state_shardings` says."""
  bank_labels = np.asarray(bank_labels, np.int32)
  init = _init_fn(model, tx, image_shape, low_dim, num_rows(len(bank_labels), mesh))
  _, shardings = _abstract(init, len(bank_labels), mesh)
  return jax.jit(init, out_shardings=shardings)(key, bank_labels)


def _host(tree):
  return jax.tree.map(distributed.to_host, tree)


def from_arrays(*, params, batch_stats, bank, bank_labels, tx, mesh,
                step: int = 0) -> TrainState:
  """A state built from host (or global) arrays, identical on every process, placed as
  `state_shardings` says: the bank padded for `mesh`, a fresh optimizer state for `tx`."""
  rep = mesh_lib.replicated(mesh)
  bank, bank_labels = pad_bank(*_host((bank, bank_labels)), num_rows(len(bank), mesh))
  put = lambda tree, sharding: jax.tree.map(
      lambda x: distributed.put_global(x, sharding), _host(tree))
  params = put(params, rep)
  return TrainState(
      step=put(np.int32(step), rep), params=params, batch_stats=put(batch_stats, rep),
      opt_state=jax.jit(tx.init, out_shardings=rep)(params),
      bank=put(bank, mesh_lib.rows(mesh)), bank_labels=put(bank_labels, mesh_lib.rows(mesh)))


def restore_as_saved(mngr, step: int, mesh) -> dict:
  """The state at `step` as a dict of the arrays it holds, whatever config, mesh or process
  count wrote it: the bank split by rows where they divide evenly over `mesh`, everything else
  replicated. For evaluation, conversion and inspection; training restores with `restore`.
  Both check the step's checksums first (`checkpoint.Manager`): a damaged file raises
  `checkpoint.ChecksumError` before anything is read."""
  tree = mngr.item_metadata(step)['state'].tree
  devices = mesh.shape[mesh_lib.DATA]

  def target(path, meta):
    split = path[0].key in ROW_FIELDS and meta.shape[0] % devices == 0
    sharding = mesh_lib.rows(mesh) if split else mesh_lib.replicated(mesh)
    return jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding)

  return checkpoint.restore_state(mngr, step, jax.tree_util.tree_map_with_path(target, tree))


def restore(mngr, step: int, abstract: TrainState, *, config, num_examples: int, tx,
            steps_per_epoch: int) -> TrainState:
  """The checkpoint at `step` onto the mesh of `abstract`, checked against `config` and the
  training set's size; any device or process count may have written it."""
  where = os.path.join(str(mngr.directory), str(step))
  try:
    saved = checkpoint.restore_config(mngr, step)
    saved_rows = mngr.item_metadata(step)['state'].tree['bank'].shape[0]
  except CheckpointError:          # damaged (checksums.json): its own message
    raise
  except Exception as e:
    raise CheckpointError(f'checkpoint {where} cannot be read ({type(e).__name__}): move it '
                          f'away to resume from an earlier one, or use a new --workdir') from e
  for key in ('model', 'low_dim'):
    if saved.get(key) != config[key]:
      raise CheckpointError(
          f'checkpoint {where} has {key}={saved.get(key)!r} but the config has '
          f'{key}={config[key]!r}: use the same config to resume, or a new --workdir')
  # The training set's size, where the checkpoint says it (older ones say only the padded
  # length of their bank, which is at least that size).
  saved_examples = saved.get('num_examples', saved_rows)
  if saved_examples < num_examples or ('num_examples' in saved and
                                       saved_examples != num_examples):
    raise CheckpointError(
        f'checkpoint {where} has a bank of {saved_examples} rows but the training set has '
        f'{num_examples} examples: resume with the same dataset, or use a new --workdir')
  mesh = abstract.bank.sharding.mesh
  try:
    if 'converted' in saved:        # no optimizer state of this run's: start a fresh one
      arrays = restore_as_saved(mngr, step, mesh)
      return from_arrays(
          params=arrays['params'], batch_stats=arrays['batch_stats'],
          bank=arrays['bank'][:num_examples], bank_labels=arrays['bank_labels'][:num_examples],
          tx=tx, mesh=mesh, step=int(saved['converted']['epoch']) * steps_per_epoch)
    if saved_rows == abstract.bank.shape[0]:
      return checkpoint.restore_state(mngr, step, abstract)
    return _restore_repadded(mngr, step, abstract, saved_rows, num_examples)
  except CheckpointError:
    raise
  except Exception as e:
    raise CheckpointError(f'checkpoint {where} cannot be read ({type(e).__name__}: '
                          f'{str(e)[:200]}): move it away to resume from an earlier one, or '
                          f'use a new --workdir') from e


def _restore_repadded(mngr, step, abstract, saved_rows, num_examples):
  """A bank padded for another device count: restored at its own length (split by rows where
  they divide evenly over this mesh, else replicated), then cut and re-padded for this mesh."""
  mesh = abstract.bank.sharding.mesh
  fits = saved_rows % mesh.size == 0
  as_saved = lambda a: jax.ShapeDtypeStruct(
      (saved_rows, *a.shape[1:]), a.dtype,
      sharding=mesh_lib.rows(mesh) if fits else mesh_lib.replicated(mesh))
  state = checkpoint.restore_state(mngr, step, abstract.replace(
      bank=as_saved(abstract.bank), bank_labels=as_saved(abstract.bank_labels)))
  pad = abstract.bank.shape[0] - num_examples

  @functools.partial(jax.jit, out_shardings=(mesh_lib.rows(mesh),) * 2)
  def repad(bank, labels):
    return (jnp.pad(bank[:num_examples], ((0, pad), (0, 0))),
            jnp.pad(labels[:num_examples], (0, pad), constant_values=PAD_LABEL))

  bank, labels = repad(state.bank, state.bank_labels)
  return state.replace(bank=bank, bank_labels=labels)
