"""Orbax checkpoints of the whole train state, with the config that made it.

Layout: `<workdir>/checkpoints/<step>/{state,config}`. `state` is the TrainState pytree, the
bank saved as the sharded array it is; `config` is the run's config as JSON, so a checkpoint is
enough to rebuild the model (`eval_knn.py --checkpoint PATH`). Orbax writes each step to a
temporary directory and renames it when complete, so an interrupted save never replaces the
previous checkpoint.
"""

import os

import orbax.checkpoint as ocp

ITEMS = ('state', 'config')


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def manager(directory: str, *, max_to_keep: int = 2, read_only: bool = False,
            barrier_prefix: str | None = None):
  """An Orbax manager of `directory`. Two managers saving in one multi-process run need their
  own `barrier_prefix`es: Orbax names its cross-process barriers by step alone."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=barrier_prefix))
  handlers = {'state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(mngr, step: int, state, config_dict: dict):
  """Writes `state` and the run's config (with `num_examples`, the training set's size, which
  the bank's padded length does not tell) as step `step`."""
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          config=ocp.args.JsonSave(config_dict)))


def restore_state(mngr, step: int, abstract_state):
  """The state at `step`, placed as the shardings of `abstract_state` say (any mesh)."""
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return out['state']


class BestCheckpoint:
  """`<workdir>/best/<step>`: the state of the epoch with the highest monitored accuracy so
  far (the original saves its best checkpoint beside the latest). Its config records the
  value (`monitor_value`), so that a resumed run keeps comparing against it."""

  def __init__(self, workdir: str):
    self.mngr = manager(os.path.join(os.path.abspath(workdir), 'best'), max_to_keep=1,
                        barrier_prefix='best')
    step = self.mngr.latest_step()
    self.value = (-float('inf') if step is None
                  else float(restore_config(self.mngr, step).get('monitor_value', -1.0)))

  def offer(self, step: int, state, value: float, config_dict: dict) -> bool:
    """Saves `state` if `value` beats the best so far; True if it did."""
    if value <= self.value:
      return False
    save(self.mngr, step, state, dict(config_dict, monitor_value=float(value)))
    self.value = value
    return True

  def close(self):
    self.mngr.wait_until_finished()


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
