"""Quiet failures: Orbax logs every failure of its background threads with a traceback (absl
ERROR lines) before it raises the same error in the caller; the tasks it abandons in a failed
save are logged by asyncio ('Task exception was never retrieved'); and TensorStore, finishing
the reads of a restore that failed after Orbax closed its event loop, reports a `RuntimeError:
Event loop is closed` from its own threads for each (unraisable exceptions: dozens of
tracebacks after the one line). Unless the program is verbose (absl verbosity INFO,
`--verbose`), all of these are dropped: the caller's one-line error is the whole story.

A failed save is one CheckpointError (`write_error`) that says what went wrong and what to do.
"""

import errno
import gc
import logging
import os
import re
import sys
import threading

import orbax.checkpoint as ocp
from absl import logging as absl_logging

from snca_jax.errors import CheckpointError


def _verbose() -> bool:
  return absl_logging.get_verbosity() >= absl_logging.INFO


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


def _is_abandoned_tensorstore_future(e, tb) -> bool:
  """A TensorStore read that Orbax wrapped in an asyncio task and abandoned when a sibling read
  failed the restore: the task's traceback holds asyncio's `_wrap_awaitable` alone (the future
  raises from C), and the error is TensorStore's, its status code first ('DATA_LOSS: ...')."""
  codes = []
  while tb is not None:
    codes.append(tb.tb_frame.f_code)
    tb = tb.tb_next
  return (bool(codes) and codes[-1].co_name == '_wrap_awaitable'
          and all(c.co_filename.endswith(os.path.join('asyncio', 'tasks.py')) for c in codes)
          and re.match(r'[A-Z][A-Z_]+: ', str(e)) is not None)


def _orbax_leftover(e, tb) -> bool:
  """What Orbax leaves of an operation that failed (and raised in its caller): TensorStore's
  callbacks into its closed event loops, the exceptions of its abandoned tasks (asyncio:
  'Task exception was never retrieved'), its coroutines finalized at exit."""
  return e is not None and (_is_closed_loop_callback(e, tb) or _through_orbax(tb)
                            or _is_abandoned_tensorstore_future(e, tb))


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


def quiet_orbax_leftovers():
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
