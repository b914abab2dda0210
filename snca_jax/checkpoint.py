"""Orbax checkpoints of the whole train state, with the config that made it.

Layout: `<workdir>/checkpoints/<step>/{state,config}`. `state` is the TrainState pytree, the
bank saved as the sharded array it is; `config` is the run's config as JSON, so a checkpoint is
enough to rebuild the model (`eval_knn.py --checkpoint PATH`). Orbax writes each step to a
temporary directory and renames it when complete, so an interrupted save never replaces the
previous checkpoint.
"""

import os

import jax
import orbax.checkpoint as ocp

from snca_jax import mesh as mesh_lib

ITEMS = ('state', 'config')


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def manager(directory: str, *, max_to_keep: int = 2, read_only: bool = False):
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         read_only=read_only)
  handlers = {'state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(mngr, step: int, state, config_dict: dict):
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          config=ocp.args.JsonSave(config_dict)))


def restore_state(mngr, step: int, abstract_state):
  """The state at `step`, placed as the shardings of `abstract_state` say (any mesh)."""
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return out['state']


def restore_as_saved(mngr, step: int, mesh) -> dict:
  """The state at `step` as a dict of the arrays it holds, whatever config, mesh or process
  count wrote it: the bank sharded by rows where they split evenly over `mesh`, everything else
  replicated. For evaluation and inspection; training restores into its own abstract state."""
  tree = mngr.item_metadata(step)['state'].tree
  devices = mesh.shape[mesh_lib.DATA]

  def target(path, meta):
    split = path[0].key in ('bank', 'bank_labels') and meta.shape[0] % devices == 0
    sharding = mesh_lib.rows(mesh) if split else mesh_lib.replicated(mesh)
    return jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding)

  return restore_state(mngr, step, jax.tree_util.tree_map_with_path(target, tree))


def restore_config(mngr, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


def locate(path: str):
  """A workdir, a checkpoints directory or one step's directory -> (checkpoints dir, step).

  The step is None where `path` names no single step (the latest is meant).
  """
  path = os.path.abspath(path)
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(path):
    return os.path.dirname(path), int(base)
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return os.path.join(path, 'checkpoints'), None
  return path, None
