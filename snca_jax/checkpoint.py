"""Orbax checkpoints of the whole train state, with the config that made it.

Layout: `<workdir>/checkpoints/<step>/{state,config,checksums.json}`. `state` is the TrainState
pytree, the bank saved as the sharded array it is; `config` is the run's config as JSON, so a
checkpoint is enough to rebuild the model (`eval_knn.py --checkpoint PATH`). Orbax writes each
step to a temporary directory and renames it when complete, so an interrupted save never
replaces the previous checkpoint.

`checksums.json`: the size and SHA-256 of every file of the step, written by process 0 once
Orbax has finished the step (in a thread, while training goes on), to a temporary file that is
renamed. Every restore checks them first (in parallel, in 4 MiB chunks: ~1 GB/s and more), so a
checkpoint damaged on disk ends in one CheckpointError naming the file, not in figures computed
from a garbage bank. A step without the file (written before it existed, or killed in the
instant between Orbax's rename and the file's) restores unchecked. Orbax 0.12.8 checksums only
the shard index of zarr3 arrays, not the data, so it cannot do this itself.

Quiet failures: Orbax logs every failure of its background threads with a traceback (absl
ERROR lines) before it raises the same error in the caller; the tasks it abandons in a failed
save are logged by asyncio ('Task exception was never retrieved'); and TensorStore, finishing
the reads of a restore that failed after Orbax closed its event loop, reports a `RuntimeError:
Event loop is closed` from its own threads for each (unraisable exceptions: dozens of
tracebacks after the one line). Unless the program is verbose (absl verbosity INFO,
`--verbose`), all of these are dropped: the caller's one-line error is the whole story.
"""

import concurrent.futures
import errno
import gc
import hashlib
import json
import logging
import os
import sys
import threading

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from snca_jax.errors import CheckpointError, SncaError

ITEMS = ('state', 'config')
CHECKSUMS = 'checksums.json'
RESUME_ADVICE = 'move it away to resume from an earlier one, or use a new --workdir'
_CHUNK = 1 << 22


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def _verbose() -> bool:
  return absl_logging.get_verbosity() >= absl_logging.INFO


# ---------------------------------------------------------------------------------------------
# Checksums.

class ChecksumError(CheckpointError):
  """A file of a checkpoint that is not as it was written. `advice(what_to_do)` is the same
  message with another remedy (evaluation says: evaluate an earlier step)."""

  def __init__(self, step_dir: str, path: str, problem: str, what_to_do: str = RESUME_ADVICE):
    self.step_dir, self.path, self.problem = step_dir, path, problem
    super().__init__(f'checkpoint {step_dir} is damaged and cannot be read: {path} {problem}: '
                     f'{what_to_do}')

  def advice(self, what_to_do: str) -> 'ChecksumError':
    return ChecksumError(self.step_dir, self.path, self.problem, what_to_do)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  buf = bytearray(_CHUNK)
  view = memoryview(buf)
  with open(path, 'rb', buffering=0) as f:
    while n := f.readinto(buf):
      h.update(view[:n])          # hashlib lets go of the GIL: files hash in parallel
  return h.hexdigest()


def _digests(root: str, names) -> list:
  names = list(names)
  workers = max(1, min(8, os.cpu_count() or 1, len(names)))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda name: _sha256(os.path.join(root, name)), names))


def _files(step_dir: str) -> list:
  out = []
  for root, dirs, files in os.walk(step_dir):
    dirs.sort()
    for f in sorted(files):
      if root == step_dir and (f == CHECKSUMS or f.startswith('.' + CHECKSUMS)):
        continue
      out.append(os.path.relpath(os.path.join(root, f), step_dir))
  return out


def write_checksums(step_dir: str):
  """`<step_dir>/checksums.json`: size and SHA-256 of every file under `step_dir`."""
  names = _files(step_dir)
  sizes = [os.path.getsize(os.path.join(step_dir, n)) for n in names]
  files = {n: {'size': s, 'sha256': d} for n, s, d in zip(names, sizes, _digests(step_dir, names))}
  tmp = os.path.join(step_dir, f'.{CHECKSUMS}.{os.getpid()}.tmp')
  try:
    with open(tmp, 'w') as f:
      json.dump({'algorithm': 'sha256', 'files': files}, f, indent=0, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, CHECKSUMS))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def verify(step_dir: str) -> bool:
  """Checks the files of `step_dir` against its checksums.json (sizes first, then SHA-256);
  raises ChecksumError naming the first that does not match. False where the step has no
  checksums (a checkpoint written before them): nothing to check."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      files = json.load(f)['files']
    expected = {str(n): (int(e['size']), str(e['sha256'])) for n, e in files.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ChecksumError(step_dir, path, f'cannot be read ({type(e).__name__})') from e
  names = sorted(expected)
  for name in names:
    full = os.path.join(step_dir, name)
    if not os.path.isfile(full):
      raise ChecksumError(step_dir, full, f'is missing (listed in {CHECKSUMS})')
    size = os.path.getsize(full)
    if size != expected[name][0]:
      raise ChecksumError(step_dir, full, f'has {size} bytes where {expected[name][0]} were '
                                          f'written ({CHECKSUMS})')
  for name, digest in zip(names, _digests(step_dir, names)):
    if digest != expected[name][1]:
      raise ChecksumError(step_dir, os.path.join(step_dir, name),
                          f'does not match its SHA-256 in {CHECKSUMS}')
  return True


# ---------------------------------------------------------------------------------------------
# Quiet failures (see the module's docstring).

_ORBAX = os.path.dirname(os.path.abspath(ocp.__file__)) + os.sep


def _through_orbax(tb) -> bool:
  """Whether a traceback passes through Orbax's code (walked by hand: no imports, which fail
  while the interpreter shuts down)."""
  while tb is not None:
    if tb.tb_frame.f_code.co_filename.startswith(_ORBAX):
      return True
    tb = tb.tb_next
  return False


def _is_closed_loop_callback(e, tb) -> bool:
  """TensorStore waking an asyncio loop that Orbax closed when a restore failed."""
  if not (isinstance(e, RuntimeError) and str(e) == 'Event loop is closed'):
    return False
  while tb is not None:
    code = tb.tb_frame.f_code
    if code.co_name == 'call_soon_threadsafe' and code.co_filename.endswith(
        os.path.join('asyncio', 'base_events.py')):
      return True
    tb = tb.tb_next
  return False


def _orbax_leftover(e, tb) -> bool:
  """What Orbax leaves of an operation that failed (and raised in its caller): TensorStore's
  callbacks into its closed event loops, the exceptions of its abandoned tasks (asyncio:
  'Task exception was never retrieved'), its coroutines finalized at exit."""
  return e is not None and (_is_closed_loop_callback(e, tb) or _through_orbax(tb))


class _QuietOrbaxErrors(logging.Filter):
  """Unless verbose, drops ERROR records with a traceback logged by Orbax (absl), or by asyncio
  about Orbax's abandoned tasks: the error is raised in the caller too, in one line."""

  def filter(self, record):
    if record.levelno < logging.ERROR or not record.exc_info or _verbose():
      return True
    if record.pathname.startswith(_ORBAX):
      return False
    _, e, tb = record.exc_info
    return not _orbax_leftover(e, tb)


_QUIET_FILTER = _QuietOrbaxErrors()
for _name in ('absl', 'asyncio'):
  if not any(isinstance(f, _QuietOrbaxErrors) for f in logging.getLogger(_name).filters):
    logging.getLogger(_name).addFilter(_QUIET_FILTER)

_HOOK_LOCK = threading.Lock()


def _quiet_orbax_leftovers():
  """Installs (once) a sys.unraisablehook that drops Orbax's leftovers unless verbose."""
  with _HOOK_LOCK:
    previous = sys.unraisablehook
    if getattr(previous, '_snca_quiet', False):
      return

    def hook(unraisable):
      try:
        if _orbax_leftover(unraisable.exc_value, unraisable.exc_traceback) and not _verbose():
          return
      except Exception:  # noqa: BLE001 (never fail a report: pass it on)
        pass
      previous(unraisable)

    hook._snca_quiet = True
    sys.unraisablehook = hook


# ---------------------------------------------------------------------------------------------
# Writing errors.

_ADVICE = {errno.ENOSPC: 'free space or choose another --workdir',
           errno.EDQUOT: 'free space or choose another --workdir',
           errno.EACCES: 'make it writable or choose another --workdir',
           errno.EROFS: 'make it writable or choose another --workdir'}


def _reason(e: BaseException):
  """(what went wrong, errno or None) of `e` or the errors it came from; TensorStore says
  its OS error in its message only."""
  seen = e
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno:
      return os.strerror(seen.errno), seen.errno
    seen = seen.__cause__ or seen.__context__
  text = str(e)
  for code in _ADVICE:
    if os.strerror(code) in text:
      return os.strerror(code), code
  return f'{type(e).__name__}: {" ".join(text.split())[:200]}', None


def write_error(step_dir: str, e: BaseException) -> CheckpointError:
  """The one line of a failed save. Orbax's abandoned coroutines and tasks are finalized now,
  while the interpreter lives (at its exit they fail on imports, and say so)."""
  gc.collect()
  reason, code = _reason(e)
  return CheckpointError(f'could not write the checkpoint {step_dir} ({reason}): '
                         f'{_ADVICE.get(code, "check the disk, or choose another --workdir")}')


# ---------------------------------------------------------------------------------------------
# The manager.

class Manager(ocp.CheckpointManager):
  """An Orbax CheckpointManager that writes checksums.json into each step it has saved once
  the step is complete, verifies them before anything of a step is read, and turns a failed
  save into one CheckpointError."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    _quiet_orbax_leftovers()
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


def manager(directory: str, *, max_to_keep: int = 2, read_only: bool = False,
            barrier_prefix: str | None = None) -> Manager:
  """An Orbax manager of `directory`. Two managers saving in one multi-process run need their
  own `barrier_prefix`es: Orbax names its cross-process barriers by step alone."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=barrier_prefix))
  handlers = {'state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()}
  return Manager(directory, options=options, item_handlers=handlers)


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
