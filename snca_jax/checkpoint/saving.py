"""Orbax checkpoints of the whole train state, with the config that made it.

Layout: `<workdir>/checkpoints/<step>/{state,config,checksums.json}`. `state` is the TrainState
pytree, the bank saved as the sharded array it is; `config` is the run's config as JSON, so a
checkpoint is enough to rebuild the model (`eval_knn.py --checkpoint PATH`). Orbax writes each
step to a temporary directory and renames it when complete, so an interrupted save never
replaces the previous checkpoint.

Each step's files are checked against their checksums before anything is read
(`checksums.py`); Orbax's leftover tracebacks are kept quiet (`quiet.py`).
"""

import os
import threading

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store

from snca_jax.checkpoint.checksums import verify, write_checksums
from snca_jax import schema
from snca_jax.checkpoint.quiet import quiet_orbax_leftovers, write_error
from snca_jax.checkpoint.restore import read_config
from snca_jax.errors import SncaError


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


class Manager(ocp.CheckpointManager):
  """An Orbax CheckpointManager that writes checksums.json into each step it has saved once
  the step is complete, verifies them before anything of a step is read, and turns a failed
  save into one CheckpointError."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    quiet_orbax_leftovers()
    self._verified = set()
    self._summing = None        # (step, thread, [exception]) of the checksums being written
    self._last_saved = None     # the step a failure of Orbax's threads is about

  def step_dir(self, step: int) -> str:
    return os.path.join(str(self.directory), str(step))

  def save(self, step, *args, **kwargs):
    self._verified.discard(step)
    try:
      saved = super().save(step, *args, **kwargs)      # waits (below) for the previous save
    except (SncaError, ocp.checkpoint_manager.StepAlreadyExistsError):
      raise
    except Exception as e:  # noqa: BLE001 (whatever Orbax or the disk raises)
      raise write_error(self.step_dir(step), e) from e
    if saved:
      self._last_saved = step
    if saved and jax.process_index() == 0:
      failure = []
      thread = threading.Thread(target=self._sum_when_done, args=(step, failure),
                                name=f'checksums_{step}', daemon=True)
      self._summing = (step, thread, failure)
      thread.start()
    return saved

  def _sum_when_done(self, step, failure):
    try:
      super().wait_until_finished()      # the step is complete and renamed, or failed
      step_dir = self.step_dir(step)
      if os.path.isdir(step_dir):
        write_checksums(step_dir)
    except BaseException as e:  # noqa: BLE001 (raised again in wait_until_finished)
      failure.append(e)

  def wait_until_finished(self):
    summing, self._summing = self._summing, None
    step = self._last_saved
    if summing is not None:
      step, thread, failure = summing
      thread.join()
    try:
      super().wait_until_finished()
    except SncaError:
      raise
    except Exception as e:  # noqa: BLE001
      raise write_error(self.step_dir(step) if step is not None else str(self.directory),
                        e) from e
    if summing is not None and failure:
      raise write_error(self.step_dir(step), failure[0]) from failure[0]

  def verify(self, step: int):
    """Raises ChecksumError where a file of `step` does not match its checksums.json."""
    if step is not None and step not in self._verified and verify(self.step_dir(step)):
      self._verified.add(step)

  def restore(self, step, *args, **kwargs):
    self.verify(self.latest_step() if step is None else step)
    return super().restore(step, *args, **kwargs)

  def metadata(self, step=None):
    self.verify(step)
    return super().metadata(step)


class _OneProcessHandler(ocp.StandardCheckpointHandler):
  """Orbax's StandardCheckpointHandler for a run of one process: each replicated array is
  written whole from one device. Orbax's default on CPUs and TPUs (replica-parallel writes)
  splits it into a slice per device, an eager operation each, so that the processes holding
  its replicas share the writing; with one process nothing is shared, and each save of the
  tests' 8-device states made about 1,800 such slices. The files are the same."""

  def __init__(self):
    super().__init__()
    registry = ocp.type_handlers.create_type_handler_registry(*(
        (ty, ocp.type_handlers.get_type_handler(ty))
        for ty in ocp.type_handlers.supported_types()))
    registry.add(jax.Array, ocp.type_handlers.ArrayHandler(
        use_replica_parallel=False, array_metadata_store=array_metadata_store.Store()),
        override=True, ignore_warnings=True)
    self._impl = ocp.PyTreeCheckpointHandler(  # StandardCheckpointHandler's, but the registry
        save_concurrent_gb=96, restore_concurrent_gb=96, type_handler_registry=registry)


def manager(directory: str, *, max_to_keep: int = 2, read_only: bool = False,
            barrier_prefix: str | None = None) -> Manager:
  """An Orbax manager of `directory`. Two managers saving in one multi-process run need their
  own `barrier_prefix`es: Orbax names its cross-process barriers by step alone."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=barrier_prefix))
  state = (_OneProcessHandler() if jax.process_count() == 1
           else ocp.StandardCheckpointHandler())
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
    registry.add('state', args, state)
  config = ocp.JsonCheckpointHandler()
  for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
    registry.add('config', args, config)
  return Manager(directory, options=options, handler_registry=registry)


def save(mngr, step: int, state, config, facts: dict | None = None):
  """Writes `state`, the run's config and its run facts (`schema.RUN_FACTS`: the training
  set's size, which the bank's padded length does not tell, and the like) as step `step`."""
  config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  facts = facts or {}
  unknown = set(facts) - set(schema.RUN_FACTS)
  if unknown:
    raise ValueError(f'run facts {sorted(unknown)}: schema.RUN_FACTS lists those a checkpoint '
                     f'stores')
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          config=ocp.args.JsonSave(dict(config, **facts))))


class BestCheckpoint:
  """`<workdir>/best/<step>`: the state of the epoch with the highest monitored accuracy so
  far (the original saves its best checkpoint beside the latest). Its config records the
  value (`monitor_value`), so that a resumed run keeps comparing against it."""

  def __init__(self, workdir: str):
    self.mngr = manager(os.path.join(os.path.abspath(workdir), 'best'), max_to_keep=1,
                        barrier_prefix='best')
    step = self.mngr.latest_step()
    self.value = (-float('inf') if step is None
                  else float(read_config(self.mngr, step)[1].get('monitor_value', -1.0)))

  def offer(self, step: int, state, value: float, config, facts: dict) -> bool:
    """Saves `state` if `value` beats the best so far; True if it did."""
    if value <= self.value:
      return False
    save(self.mngr, step, state, config, dict(facts, monitor_value=float(value)))
    self.value = value
    return True

  def close(self):
    self.mngr.wait_until_finished()


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
