"""Stopping a run cleanly: SIGTERM or SIGINT ends the current step, and the loop writes a
checkpoint and returns; every process of a multi-process run stops at the same step."""

import contextlib
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from snca_jax.errors import Interrupted


class StopRequest:
  """SIGTERM / SIGINT: the loop finishes its step, writes a checkpoint and returns.

  Every process must stop at the same step; with several processes they agree on it every
  `check_every` steps through one small all-gather.
  """

  def __init__(self, check_every: int):
    self.signum = None
    self.check_every = check_every
    self._previous = {}
    self._interruptible = False
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    if self._interruptible:
      raise Interrupted(f'stopped by {signal.Signals(signum).name} while the data was being '
                        f'prepared; nothing was written (a prepared split is written whole or '
                        f'not at all): run the same command to start again')

  @contextlib.contextmanager
  def interruptible(self):
    """Within it a signal stops at once: pure Python work that leaves nothing half-written
    (reading and preparing the data), which may take many minutes."""
    self._interruptible = True
    try:
      if self.signum is not None:
        self._handle(self.signum, None)
      yield
    finally:
      self._interruptible = False

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1 and step % self.check_every:
      return False
    return self.requested_now()

  def requested_now(self) -> bool:
    """Whether any process got a signal; with several processes, every one must ask at the
    same point."""
    if jax.process_count() > 1:
      flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
      self.signum = self.signum or int(np.max(flags)) or None
    return self.signum is not None

  def stopped_before_first_step(self, again: str) -> bool:
    """Whether a signal came before the first step (every process agrees); if so, says so."""
    if not self.requested_now():
      return False
    if jax.process_index() == 0:
      print(f'train.py: stopped by {signal.Signals(self.signum).name} before the first step; '
            f'no checkpoint was written; run the same command to {again}', flush=True)
    return True

  def close(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
