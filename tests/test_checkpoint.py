"""Checkpoint integrity: checksums written once a save is complete and verified before any
restore; a failed save in one line, the previous checkpoint kept; Orbax's and TensorStore's
background reports of a failure kept off stderr."""

import errno
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.serialization import serialization as ocp_serialization

from snca_jax import checkpoint
from snca_jax.errors import CheckpointError


def small_state(seed=0):
  rng = np.random.default_rng(seed)
  return {'w': jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
          'bank': jnp.asarray(rng.normal(size=(512, 16)), jnp.float32), 'step': jnp.int32(seed)}


def abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def saved(directory, *steps):
  mngr = checkpoint.manager(str(directory), max_to_keep=10)
  for step in steps:
    checkpoint.save(mngr, step, small_state(step), {'step': step})
  mngr.wait_until_finished()
  return mngr


def largest_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
           if f != checkpoint.CHECKSUMS]
  return max(files, key=os.path.getsize)


def flip_middle(path, n=16):
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.seek(size // 2)
    data = f.read(n)
    f.seek(size // 2)
    f.write(bytes(b ^ 0xff for b in data))


def test_every_file_of_a_step_has_its_checksum(tmp_path):
  saved(tmp_path, 1, 2)
  for step in (1, 2):
    step_dir = tmp_path / str(step)
    listed = json.loads((step_dir / checkpoint.CHECKSUMS).read_text())['files']
    on_disk = {os.path.relpath(os.path.join(r, f), step_dir)
               for r, _, fs in os.walk(step_dir) for f in fs} - {checkpoint.CHECKSUMS}
    assert set(listed) == on_disk and len(on_disk) > 5
    assert checkpoint.verify(str(step_dir))
  assert not [f for f in os.listdir(tmp_path / '1') if f.endswith('.tmp')]


def test_checksums_hold_after_a_resumed_manager_saves_again(tmp_path):
  saved(tmp_path, 1)
  mngr = checkpoint.manager(str(tmp_path), max_to_keep=10)     # as a resumed run opens it
  checkpoint.restore_state(mngr, 1, abstract(small_state(1)))
  checkpoint.save(mngr, 2, small_state(2), {'step': 2})
  mngr.wait_until_finished()
  assert checkpoint.verify(str(tmp_path / '1')) and checkpoint.verify(str(tmp_path / '2'))


@pytest.mark.parametrize('damage,problem', [
    ('flip', 'does not match its SHA-256'),
    ('truncate', 'bytes where'),
    ('remove', 'is missing'),
])
def test_a_damaged_file_is_named_before_anything_is_read(tmp_path, damage, problem):
  mngr = saved(tmp_path, 1)
  victim = largest_file(tmp_path / '1')
  if damage == 'flip':
    flip_middle(victim)
  elif damage == 'truncate':
    with open(victim, 'r+b') as f:
      f.truncate(os.path.getsize(victim) - 1)
  else:
    os.remove(victim)
  before = {p: open(p, 'rb').read() for p in map(str, (tmp_path / '1').rglob('*'))
            if os.path.isfile(p)}
  reader = checkpoint.manager(str(tmp_path), read_only=True)
  for read in (lambda m: checkpoint.restore_state(m, 1, abstract(small_state(1))),
               lambda m: checkpoint.restore_config(m, 1),
               lambda m: m.item_metadata(1)):
    with pytest.raises(checkpoint.ChecksumError) as e:
      read(reader)
    message = str(e.value)
    assert problem in message and victim in message and '\n' not in message
    assert 'move it away to resume from an earlier one' in message
  assert 'evaluate an earlier step' in str(e.value.advice('evaluate an earlier step'))
  after = {p: open(p, 'rb').read() for p in map(str, (tmp_path / '1').rglob('*'))
           if os.path.isfile(p)}
  assert after == before                                 # nothing repaired, nothing written
  del mngr


def test_a_checkpoint_without_checksums_still_restores(tmp_path):
  saved(tmp_path, 3)
  os.remove(tmp_path / '3' / checkpoint.CHECKSUMS)        # as written before checksums
  reader = checkpoint.manager(str(tmp_path), read_only=True)
  assert not checkpoint.verify(str(tmp_path / '3'))
  state = checkpoint.restore_state(reader, 3, abstract(small_state(3)))
  np.testing.assert_array_equal(state['bank'], small_state(3)['bank'])
  assert checkpoint.restore_config(reader, 3) == {'step': 3}


def test_replicated_arrays_are_written_whole_from_one_device(tmp_path, monkeypatch):
  """One process: no array is cut into a slice per replica (an eager operation each, which
  made the saves of the suite's 8-device states slow); the files restore the same, onto one
  device and onto the rows of 8."""
  from snca_jax import mesh as mesh_lib
  mesh = mesh_lib.make_mesh()
  state = small_state(4)
  state = {'w': jax.device_put(state['w'], mesh_lib.replicated(mesh)),
           'bank': jax.device_put(state['bank'], mesh_lib.row_sharding(mesh)),
           'step': jax.device_put(state['step'], mesh_lib.replicated(mesh))}
  slices = []
  slice_in_dim = jax.lax.slice_in_dim
  monkeypatch.setattr(jax.lax, 'slice_in_dim', lambda *a, **k: slices.append(1) or
                      slice_in_dim(*a, **k))
  mngr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mngr, 1, state, {'step': 1})
  mngr.wait_until_finished()
  assert len(mesh.devices.flat) == 8 and not slices
  for target in (mesh_lib.make_mesh(jax.devices()[:1]), mesh):
    like = {'w': mesh_lib.replicated(target), 'bank': mesh_lib.row_sharding(target),
            'step': mesh_lib.replicated(target)}
    restored = checkpoint.restore_state(
        checkpoint.manager(str(tmp_path), read_only=True), 1,
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=like[k]) for k, v in state.items()})
    for k in state:
      np.testing.assert_array_equal(restored[k], state[k])
      assert restored[k].sharding == like[k]


def test_verification_is_fast(tmp_path):
  mngr = checkpoint.manager(str(tmp_path))
  big = {'bank': jnp.zeros((64 << 20) // 4, jnp.float32) + 1.5}      # 64 MiB
  checkpoint.save(mngr, 1, big, {})
  mngr.wait_until_finished()
  t0 = time.time()
  assert checkpoint.verify(str(tmp_path / '1'))
  assert time.time() - t0 < 5        # ~0.1 s at 1 GB/s; generous for a busy machine


def no_space(*args, **kwargs):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_ends_in_one_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                         caplog):
  mngr = saved(tmp_path, 1)
  before = {p: open(p, 'rb').read() for p in map(str, tmp_path.rglob('*')) if os.path.isfile(p)}
  monkeypatch.setattr(ocp_serialization, 'async_serialize_from_host', no_space)
  checkpoint.save(mngr, 2, small_state(2), {'step': 2})   # the write fails in Orbax's thread
  with pytest.raises(CheckpointError, match=(
      r'^could not write the checkpoint .*/2 \(No space left on device\): free space or '
      r'choose another --workdir$')):
    mngr.wait_until_finished()
  # Orbax's threads logged it with tracebacks; quiet (not verbose), none of that is shown.
  assert not [r for r in caplog.records if r.exc_info], caplog.text[-2000:]
  monkeypatch.undo()
  assert {p: open(p, 'rb').read() for p in before} == before
  reader = checkpoint.manager(str(tmp_path), read_only=True)
  assert reader.latest_step() == 1
  state = checkpoint.restore_state(reader, 1, abstract(small_state(1)))
  np.testing.assert_array_equal(state['w'], small_state(1)['w'])


def test_a_full_disk_in_the_blocking_part_of_a_save(tmp_path, monkeypatch):
  mngr = saved(tmp_path, 1)

  def fail(*args, **kwargs):
    raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": No space left on device')

  monkeypatch.setattr(mngr._checkpointer, 'save', fail)    # as TensorStore says it
  with pytest.raises(CheckpointError, match=r'/2 \(No space left on device\): free space'):
    checkpoint.save(mngr, 2, small_state(2), {'step': 2})


def test_orbax_leftovers_are_dropped_unless_verbose(monkeypatch):
  """TensorStore finishing the reads of a failed restore after Orbax closed its event loop
  (`RuntimeError: Event loop is closed` from call_soon_threadsafe), and exceptions raised in
  Orbax's code, reported as unraisable: dropped unless verbose; anything else passed on."""
  import asyncio
  from absl import logging as absl_logging
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as e:
    closed = e
  unraisable = lambda e: type('Unraisable', (), {
      'exc_type': type(e), 'exc_value': e, 'exc_traceback': e.__traceback__, 'err_msg': None,
      'object': None})()
  try:
    ocp_serialization.async_serialize_from_host(None, {}).send(None)   # fails in Orbax
  except AttributeError as e:
    in_orbax = e
  try:
    raise RuntimeError('Event loop is closed')       # not asyncio's, not Orbax's
  except RuntimeError as e:
    elsewhere = e
  assert checkpoint.quiet._orbax_leftover(closed, closed.__traceback__)
  assert checkpoint.quiet._orbax_leftover(in_orbax, in_orbax.__traceback__)
  assert not checkpoint.quiet._orbax_leftover(elsewhere, elsewhere.__traceback__)
  forwarded = []
  monkeypatch.setattr(sys, 'unraisablehook', forwarded.append)
  checkpoint.quiet.quiet_orbax_leftovers()
  checkpoint.quiet.quiet_orbax_leftovers()          # once only
  hook = sys.unraisablehook
  verbosity = absl_logging.get_verbosity()
  try:
    absl_logging.set_verbosity(absl_logging.ERROR)    # not --verbose: dropped
    hook(unraisable(closed))
    hook(unraisable(in_orbax))
    assert forwarded == []
    other = unraisable(elsewhere)
    hook(other)
    assert forwarded == [other]
    absl_logging.set_verbosity(absl_logging.INFO)     # --verbose: shown
    hook(unraisable(closed))
    assert len(forwarded) == 2
  finally:
    absl_logging.set_verbosity(verbosity)


def test_abandoned_tensorstore_reads_are_not_logged_unless_verbose():
  """A restore that fails one TensorStore read leaves its sibling reads, wrapped in asyncio
  tasks, unretrieved: asyncio logs each ('Task exception was never retrieved') with a traceback
  that holds only its `_wrap_awaitable` (the future raises from C). eval_knn.py once wrote one
  such traceback after its one line. Dropped unless verbose; the same error from Python code,
  or one without TensorStore's status code, is logged."""
  import asyncio
  import logging
  from absl import logging as absl_logging

  def task_error(message, from_c=True):
    async def main():
      failed = asyncio.get_running_loop().create_future()
      failed.set_exception(ValueError(message))
      if from_c:                   # an awaitable whose __await__ is C code, as TensorStore's
        awaitable = type('Read', (), {'__await__': staticmethod(failed.__await__)})()
      else:
        class awaitable:           # noqa: N801 (a Python __await__: its frame is in the traceback)
          def __await__(self):
            return (yield from failed)
        awaitable = awaitable()
      task = asyncio.ensure_future(awaitable)
      await asyncio.wait([task])
      return task.exception()
    e = asyncio.run(main())
    return logging.LogRecord('asyncio', logging.ERROR, asyncio.base_events.__file__, 1,
                             'Task exception was never retrieved', None,
                             (type(e), e, e.__traceback__))

  status = 'DATA_LOSS: Error decoding manifest: CRC-32C checksum verification failed'
  quiet = checkpoint.quiet._QUIET_FILTER
  assert quiet in logging.getLogger('asyncio').filters
  verbosity = absl_logging.get_verbosity()
  try:
    absl_logging.set_verbosity(absl_logging.ERROR)     # not --verbose
    assert not quiet.filter(task_error(status))
    assert quiet.filter(task_error('Error decoding manifest'))       # no status code
    assert quiet.filter(task_error(status, from_c=False))            # raised in Python code
    absl_logging.set_verbosity(absl_logging.INFO)      # --verbose: logged
    assert quiet.filter(task_error(status))
  finally:
    absl_logging.set_verbosity(verbosity)
