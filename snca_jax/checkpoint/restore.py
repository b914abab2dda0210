"""Reading a checkpoint back: its config (upgraded to today's schema) and run facts, and its
state onto any mesh, whatever device or process count wrote it.

A bank padded for another device count is cut and re-padded for this mesh (`bank.pad`, on the
devices). Anything that goes wrong while reading is one CheckpointError that names the step and
says what to do (`reading`); a damaged file is named by its checksum first.
"""

import contextlib
import os

import jax
import orbax.checkpoint as ocp

from snca_jax import bank as bank_lib
from snca_jax import mesh as mesh_lib
from snca_jax import schema
from snca_jax.checkpoint.checksums import RESUME_ADVICE, ChecksumError
from snca_jax.errors import CheckpointError

ROW_FIELDS = ('bank', 'bank_labels')      # the fields split by rows over 'data'


@contextlib.contextmanager
def reading(where: str, advice: str = RESUME_ADVICE):
  """Any failure to read the checkpoint at `where` becomes one CheckpointError ending in
  `advice` (a damaged file: the ChecksumError naming it, with that advice)."""
  try:
    yield
  except ChecksumError as e:
    raise e.advice(advice) from e
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 (whatever Orbax, TensorStore or the disk raises)
    raise CheckpointError(f'checkpoint {where} cannot be read ({type(e).__name__}: '
                          f'{" ".join(str(e).split())[:200]}): {advice}') from e


def restore_config(mngr, step: int) -> dict:
  """The config dict stored with `step`, as written (with its run facts)."""
  return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


def read_config(mngr, step: int):
  """(config in today's schema, run facts) of the checkpoint at `step` (`schema.upgrade`)."""
  return schema.upgrade(restore_config(mngr, step))


def saved_rows(mngr, step: int) -> int:
  """The length of the bank the checkpoint at `step` holds (padded for its device count)."""
  return mngr.item_metadata(step)['state'].tree['bank'].shape[0]


def restore_state(mngr, step: int, abstract_state):
  """The state at `step`, placed as the shardings of `abstract_state` say (any mesh)."""
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return out['state']


def restore_as_saved(mngr, step: int, mesh) -> dict:
  """The state at `step` as a dict of the arrays it holds, whatever config, mesh or process
  count wrote it: the bank split by rows where they divide evenly over `mesh`, everything else
  replicated. For evaluation, conversion and inspection; training restores `restore_train_state`.
  Both check the step's checksums first (`Manager`): a damaged file raises ChecksumError before
  anything is read."""
  tree = mngr.item_metadata(step)['state'].tree
  devices = mesh.shape[mesh_lib.DATA]

  def target(path, meta):
    split = path[0].key in ROW_FIELDS and meta.shape[0] % devices == 0
    sharding = mesh_lib.row_sharding(mesh) if split else mesh_lib.replicated(mesh)
    return jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding)

  return restore_state(mngr, step, jax.tree_util.tree_map_with_path(target, tree))


def check_resumable(mngr, step: int, *, config, num_examples: int) -> dict:
  """Raises CheckpointError unless the run of `config` on a training set of `num_examples` can
  resume from the checkpoint at `step`: the same network, embedding size and training set.
  Returns the checkpoint's run facts."""
  where = os.path.join(str(mngr.directory), str(step))
  with reading(where):
    saved, facts = read_config(mngr, step)
    rows = saved_rows(mngr, step)
  for key in ('model', 'low_dim'):
    if saved[key] != config[key]:
      raise CheckpointError(
          f'checkpoint {where} has {key}={saved[key]!r} but the config has '
          f'{key}={config[key]!r}: use the same config to resume, or a new --workdir')
  # The training set's size, where the checkpoint says it (older ones say only the padded
  # length of their bank, which is at least that size).
  saved_examples = facts.get('num_examples', rows)
  if saved_examples < num_examples or ('num_examples' in facts and
                                       saved_examples != num_examples):
    raise CheckpointError(
        f'checkpoint {where} has a bank of {saved_examples} rows but the training set has '
        f'{num_examples} examples: resume with the same dataset, or use a new --workdir')
  return facts


def restore_train_state(mngr, step: int, abstract, *, num_examples: int):
  """The train state at `step` onto the mesh of `abstract` (a tree of ShapeDtypeStructs with
  shardings): a bank padded for another device count is restored at its own length (split by
  rows where they divide evenly over this mesh, else replicated), then cut and re-padded."""
  where = os.path.join(str(mngr.directory), str(step))
  with reading(where):
    rows = saved_rows(mngr, step)
    if rows == abstract.bank.shape[0]:
      return restore_state(mngr, step, abstract)
    mesh = abstract.bank.sharding.mesh
    fits = rows % mesh.size == 0
    as_saved = lambda a: jax.ShapeDtypeStruct(
        (rows, *a.shape[1:]), a.dtype,
        sharding=mesh_lib.row_sharding(mesh) if fits else mesh_lib.replicated(mesh))
    state = restore_state(mngr, step, abstract.replace(
        bank=as_saved(abstract.bank), bank_labels=as_saved(abstract.bank_labels)))
    repad = jax.jit(lambda b, l: bank_lib.pad(b[:num_examples], l[:num_examples],
                                              abstract.bank.shape[0]),
                    out_shardings=(mesh_lib.row_sharding(mesh),) * 2)
    bank, labels = repad(state.bank, state.bank_labels)
    return state.replace(bank=bank, bank_labels=labels)
