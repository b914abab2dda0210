"""Metric files: TensorBoard event files and a plain JSON-lines log, written by process 0."""

import json
import os
import sys
import time

import jax


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without the `import torch` its writer module tries
  at import time (to accept torch tensors; scalars never need it): where torch is installed,
  that import cost every run 1.5 s. torch stays importable afterwards."""
  blocked = 'torch' not in sys.modules
  if blocked:
    sys.modules['torch'] = None            # `import torch` raises ImportError meanwhile
  try:
    from tensorboardX import SummaryWriter
  finally:
    if blocked:
      del sys.modules['torch']
  return SummaryWriter


class MetricWriter:
  """`write(step, {name: value})` appends to `<workdir>/metrics.jsonl` and to TensorBoard
  events in `<workdir>/tensorboard`. A no-op on every process but 0."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    self._tb = _summary_writer()(os.path.join(workdir, 'tensorboard'))  # only process 0
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def write(self, step: int, scalars: dict):
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({'step': int(step), 'time': time.time(), **scalars}) + '\n')
    self._jsonl.flush()

  def close(self):
    if self._active:
      self._tb.close()
      self._jsonl.close()
