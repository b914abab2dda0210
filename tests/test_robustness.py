"""Nothing lost: signals, SIGKILL, bad input (one clear line, non-zero exit, files untouched)."""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from snca_jax import checkpoint
from snca_jax import stop as stop_lib
from snca_jax import train
from snca_jax.errors import CheckpointError, DataError, TrainingError

from conftest import final_state, make_fake_fashion_mnist, run_until, subprocess_env
from test_checkpoint import flip_middle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(devices=1):
  e = subprocess_env(devices)
  return e


def train_cmd(workdir, data, *extra):
  return [sys.executable, 'train.py', '--config', 'configs/fashion_mnist.py', '--workdir',
          str(workdir), f'--config.data.idx_dir={data.idx_dir}',
          f'--config.data.data_dir={data.data_dir}', '--config.model=tiny_resnet',
          '--config.low_dim=16', '--config.batch_size=8', '--config.num_epochs=3',
          '--config.knn.batch_size=16', '--config.log_every_steps=1',
          '--config.checkpoint_max_to_keep=10', *extra]


def run(cmd, devices=1):
  return subprocess.run(cmd, cwd=ROOT, env=env(devices), capture_output=True, text=True,
                        timeout=600)


def interrupted_run(workdir, data, sig, lines_before_signal):
  """Starts training, sends `sig` once metrics.jsonl has that many lines, returns the result."""
  return run_until(train_cmd(workdir, data), os.path.join(workdir, 'metrics.jsonl'),
                   lines_before_signal, sig, env())


@pytest.fixture(scope='session')
def uninterrupted(fake_data_config, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('straight')
  r = run(train_cmd(workdir, fake_data_config.data))
  assert r.returncode == 0, r.stderr[-3000:]
  return final_state(workdir)


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_resume_is_exact(sig, fake_data_config, uninterrupted, tmp_path):
  lines = random.Random(sig).randint(2, 25)        # 12 steps an epoch, 36 in all
  code, out, err = interrupted_run(tmp_path, fake_data_config.data, sig, lines)
  assert code == 0, err[-3000:]
  assert f'stopped by {sig.name}' in out, out[-2000:]
  stopped_at = int(out.split(' at step ')[1].split(';')[0])
  assert stopped_at < 36 and str(stopped_at) in os.listdir(tmp_path / 'checkpoints')
  r = run(train_cmd(tmp_path, fake_data_config.data))
  assert r.returncode == 0, r.stderr[-3000:]
  step, state = final_state(tmp_path)
  want_step, want = uninterrupted
  assert step == want_step == 36
  for k in want:
    np.testing.assert_array_equal(state[k], want[k], err_msg=k)


def test_sigkill_then_resume_is_exact(fake_data_config, uninterrupted, tmp_path):
  code, _, _ = interrupted_run(tmp_path, fake_data_config.data, signal.SIGKILL,
                               random.Random(0).randint(14, 30))
  assert code == -signal.SIGKILL
  assert os.listdir(tmp_path / 'checkpoints')          # at least the first epoch's
  r = run(train_cmd(tmp_path, fake_data_config.data))
  assert r.returncode == 0, r.stderr[-3000:]
  step, state = final_state(tmp_path)
  assert step == 36
  for k in uninterrupted[1]:
    np.testing.assert_array_equal(state[k], uninterrupted[1][k], err_msg=k)


def tree_digest(path):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for f in sorted(files):
      full = os.path.join(root, f)
      h.update(full.encode())
      h.update(open(full, 'rb').read())
  return h.hexdigest()


@pytest.fixture(scope='session')
def trained_workdir(fake_data_config, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('trained')
  r = run(train_cmd(workdir, fake_data_config.data, '--config.num_epochs=1'))
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


def assert_one_line_error(r, *fragments):
  assert r.returncode != 0
  lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
  assert 'Traceback' not in r.stderr, r.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[-1], lines[-1]


@pytest.mark.parametrize('extra,fragments', [
    (['--config.model=resnet9'], ["model='resnet9': one of"]),
    (['--config.model=small_resnet'], ["model='tiny_resnet'", "model='small_resnet'"]),
    (['--config.batch_size=6'], ['batch_size 6', 'divisible by the 4 devices']),
    (['--config.low_dim=32'], ['low_dim=16', 'low_dim=32']),
])
def test_bad_config_or_mismatched_checkpoint(extra, fragments, trained_workdir, fake_data_config):
  before = tree_digest(trained_workdir)
  r = run(train_cmd(trained_workdir, fake_data_config.data, '--config.num_epochs=2', *extra),
          devices=4)
  assert_one_line_error(r, *fragments)
  assert tree_digest(trained_workdir) == before


def test_checkpoint_of_another_dataset_size(trained_workdir, fake_data_config, tmp_path):
  other = make_fake_fashion_mnist(str(tmp_path / 'idx'), n_train=80, n_test=16)
  before = tree_digest(trained_workdir)
  r = run(train_cmd(trained_workdir, fake_data_config.data, '--config.num_epochs=2',
                    f'--config.data.idx_dir={other}',
                    f'--config.data.data_dir={tmp_path / "tfds"}'))
  assert_one_line_error(r, 'bank of 96 rows', '80 examples')
  assert tree_digest(trained_workdir) == before


def test_misspelt_config_key_and_missing_config_file(trained_workdir, fake_data_config):
  before = tree_digest(trained_workdir)
  r = run(train_cmd(trained_workdir, fake_data_config.data, '--config.learning_rat=0.1'))
  assert r.returncode != 0 and 'learning_rat' in r.stderr and 'Traceback' not in r.stderr
  r = run([sys.executable, 'train.py', '--config', 'configs/nope.py', '--workdir',
           str(trained_workdir)])
  assert r.returncode != 0 and 'nope.py' in r.stderr and 'Traceback' not in r.stderr
  assert tree_digest(trained_workdir) == before


def test_missing_dataset(tmp_path, fake_data_config):
  r = run(train_cmd(tmp_path / 'w', fake_data_config.data,
                    f'--config.data.idx_dir={tmp_path / "none"}',
                    f'--config.data.data_dir={tmp_path / "tfds"}', '--config.data.download=false'))
  assert_one_line_error(r, 'Fashion-MNIST not found', 'dataset-fashion-mnist')


def test_missing_dataset_and_no_network_fails_in_seconds(tmp_path, fake_data_config):
  """With the IDX files missing and the download host out of reach (as on this machine), the
  run says so at once instead of retrying the download for minutes."""
  from snca_jax.data import fashion_mnist, fetch
  if fetch.reachable(fashion_mnist.URL):
    pytest.skip('the download host is reachable from here')
  t0 = time.time()
  r = run(train_cmd(tmp_path / 'w', fake_data_config.data,
                    f'--config.data.idx_dir={tmp_path / "none"}',
                    f'--config.data.data_dir={tmp_path / "tfds"}'))
  assert_one_line_error(r, 'Fashion-MNIST not found', 'cannot be reached')
  assert time.time() - t0 < 60


@pytest.mark.parametrize('extra,fragments', [
    (['--config.temperature=0'], ['temperature=0.0: a finite number > 0']),
    (['--config.temperature=-1', '--config.knn.k=0', '--config.data.train_augment=imagenett',
      '--config.memory_momentum=1.5', '--config.learning_rate=inf',
      '--config.lr_schedule=cosinus', '--config.data.channels=2', '--config.data.name=folder'],
     ['temperature=-1.0', 'knn.k=0', "data.train_augment='imagenett'", 'memory_momentum=1.5',
      'learning_rate=inf: a finite number >= 0', "lr_schedule='cosinus': one of cosine, step",
      'data.channels=2: one of 1, 3', 'data.mean=(0.286,): 2 finite number(s)',
      "data.root='': the image folder"]),
])
def test_bad_values_fail_at_once_in_one_line(extra, fragments, trained_workdir,
                                             fake_data_config):
  before = tree_digest(trained_workdir)
  t0 = time.time()
  r = run(train_cmd(trained_workdir, fake_data_config.data, '--config.num_epochs=2', *extra))
  assert_one_line_error(r, 'bad config: ', *fragments)
  assert time.time() - t0 < 30 and tree_digest(trained_workdir) == before


def test_unwritable_workdir(tmp_path, fake_data_config):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  r = run(train_cmd(blocker / 'w', fake_data_config.data))
  assert_one_line_error(r, 'not writable', '--workdir')


def test_corrupted_checkpoint(trained_workdir, fake_data_config, tmp_path):
  workdir = tmp_path / 'w'
  shutil.copytree(trained_workdir, workdir)
  step_dir = workdir / 'checkpoints' / os.listdir(workdir / 'checkpoints')[0]
  for root, _, files in os.walk(step_dir / 'state'):
    for f in files:
      path = os.path.join(root, f)
      if os.path.getsize(path) > 64:
        with open(path, 'r+b') as fh:       # truncate every data file
          fh.truncate(os.path.getsize(path) // 3)
  before = tree_digest(workdir)
  r = run(train_cmd(workdir, fake_data_config.data, '--config.num_epochs=2'))
  assert_one_line_error(r, 'cannot be read', str(step_dir))
  assert tree_digest(workdir) == before
  r = run([sys.executable, 'eval_knn.py', '--workdir', str(workdir)])
  assert_one_line_error(r, 'cannot be read')


def test_labels_outside_num_classes(tmp_path, fake_data_config):
  config = fake_data_config.copy_and_resolve_references()
  config.data.num_classes = 5            # the fake data has labels 0..9
  config.model, config.batch_size = 'tiny_resnet', 16
  with pytest.raises(DataError, match=r'label [5-9] outside \[0, 5\)'):
    train.train_and_evaluate(config, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints' / '6')


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(trained_workdir,
                                                                 fake_data_config, tmp_path):
  workdir = tmp_path / 'w'
  shutil.copytree(trained_workdir, workdir)
  before = tree_digest(workdir / 'checkpoints')
  config = fake_data_config.copy_and_resolve_references()
  config.model, config.low_dim, config.batch_size, config.num_epochs = 'tiny_resnet', 16, 8, 2
  config.knn.batch_size, config.log_every_steps = 16, 1
  config.checkpoint_max_to_keep = 10
  config.learning_rate = 1e30               # finite, so the config is valid; the loss is not
  with pytest.raises(TrainingError, match=r'at step 1[2-9]'):
    train.train_and_evaluate(config, str(workdir))
  assert tree_digest(workdir / 'checkpoints') == before


def test_eval_flags_that_cannot_work(trained_workdir):
  """Every bad flag named in the one line, before any work (one process for all three)."""
  before = tree_digest(trained_workdir)
  r = run([sys.executable, 'eval_knn.py', '--workdir', str(trained_workdir), '--k', '0',
           '--sigma', '-0.1', '--batch_size', '0'])
  assert_one_line_error(r, '--k=0', '--sigma=-0.1', '--batch_size=0')
  assert tree_digest(trained_workdir) == before


def test_eval_of_an_empty_workdir(tmp_path):
  r = run([sys.executable, 'eval_knn.py', '--workdir', str(tmp_path)])
  assert_one_line_error(r, 'eval_knn.py: ', 'holds no checkpoint')


# Checkpoints damaged on disk, a full disk, a stop at the end of an epoch.

def small_config(fake_data_config, **overrides):
  """train_cmd's config, for in-process runs (8 devices)."""
  config = fake_data_config.copy_and_resolve_references()
  config.model, config.low_dim, config.batch_size, config.num_epochs = 'tiny_resnet', 16, 8, 3
  config.knn.batch_size, config.log_every_steps = 16, 1
  config.checkpoint_max_to_keep = 10
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def largest_data_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, 'state'))
           for f in fs]
  return max(files, key=os.path.getsize)


def evaluations(workdir, name='val/nn_top1'):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r[name]) for r in map(json.loads, f) if name in r]


def test_flipped_bytes_in_a_checkpoint(trained_workdir, fake_data_config, tmp_path):
  """Flipped bytes in the middle of the bank's data file: the checksums say which file, for
  training and for evaluation, and nothing is touched."""
  workdir = tmp_path / 'w'
  shutil.copytree(trained_workdir, workdir)
  step_dir = str(workdir / 'checkpoints' / os.listdir(workdir / 'checkpoints')[0])
  victim = largest_data_file(step_dir)
  flip_middle(victim)
  before = tree_digest(workdir)
  with pytest.raises(CheckpointError, match='move it away to resume from an earlier one') as e:
    train.train_and_evaluate(small_config(fake_data_config, num_epochs=2), str(workdir))
  assert f'{victim} does not match its SHA-256' in str(e.value)
  assert tree_digest(workdir) == before
  r = run([sys.executable, 'eval_knn.py', '--workdir', str(workdir)])
  assert_one_line_error(r, 'eval_knn.py: checkpoint ', victim, 'does not match',
                        'evaluate an earlier step')
  assert r.stderr.strip().count('\n') == 0 and not r.stdout
  assert tree_digest(workdir) == before


def test_a_damaged_checkpoint_without_checksums_fails_in_one_line(trained_workdir, tmp_path,
                                                                 monkeypatch):
  """A checkpoint written before checksums, damaged where Orbax's restore fails with reads in
  flight: TensorStore finishes them after Orbax closed the restore's event loop and reported
  each from its threads (`RuntimeError: Event loop is closed`, as unraisable exceptions: the
  tracebacks after eval_knn.py's line). None reach the hook now (20 restores in-process, where
  one in a few had none); and eval_knn.py, lingering at its exit so that all arrive, writes
  the one line."""
  import gc
  from snca_jax import evaluate
  workdir = tmp_path / 'w'
  shutil.copytree(trained_workdir, workdir)
  for root, _, files in os.walk(workdir):
    if checkpoint.CHECKSUMS in files:
      os.remove(os.path.join(root, checkpoint.CHECKSUMS))
  step_dir = workdir / 'checkpoints' / os.listdir(workdir / 'checkpoints')[0]
  flip_middle(str(step_dir / 'state' / 'manifest.ocdbt'), n=8)
  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', reported.append)
  for _ in range(20):
    with pytest.raises(CheckpointError, match='cannot be read'):
      evaluate.evaluate_checkpoint(str(workdir))
  time.sleep(1)
  gc.collect()
  assert not reported, [str(u.exc_value) for u in reported][:3]
  monkeypatch.undo()
  linger = ('import atexit, runpy, sys, time; atexit.register(time.sleep, 2); '
            f'sys.argv = ["eval_knn.py", "--workdir", {str(workdir)!r}]; '
            'runpy.run_path("eval_knn.py", run_name="__main__")')
  r = run([sys.executable, '-c', linger])
  assert_one_line_error(r, 'eval_knn.py: checkpoint ', 'cannot be read',
                        'evaluate an earlier step')
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]


def no_space(*args, **kwargs):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_during_a_save(trained_workdir, fake_data_config, tmp_path, monkeypatch,
                                 caplog):
  """The disk fills while Orbax writes epoch 2 in its threads: one CheckpointError, none of
  Orbax's tracebacks, epoch 1's checkpoints as they were, and restorable."""
  from orbax.checkpoint._src.serialization import serialization as ocp_serialization
  workdir = tmp_path / 'w'
  shutil.copytree(trained_workdir, workdir)
  kept = ('checkpoints/12', 'best/12')
  before = {d: tree_digest(workdir / d) for d in kept}
  monkeypatch.setattr(ocp_serialization, 'async_serialize_from_host', no_space)
  with pytest.raises(CheckpointError) as e:
    train.train_and_evaluate(small_config(fake_data_config, num_epochs=2), str(workdir))
  monkeypatch.undo()
  assert str(e.value) == (f'could not write the checkpoint {workdir}/checkpoints/24 (No space '
                          f'left on device): free space or choose another --workdir')
  assert not [rec for rec in caplog.records if rec.exc_info], caplog.text[-3000:]
  assert {d: tree_digest(workdir / d) for d in kept} == before
  assert sorted(os.listdir(workdir / 'best')) == ['12']      # Orbax's unfinished 24 aside
  step, state = final_state(workdir)           # checked against its checksums
  assert step == 12 and checkpoint.verify(str(workdir / 'checkpoints' / '12'))
  assert np.isfinite(state["['bank']"]).all()


def test_stop_at_an_epochs_last_step_evaluates_it_on_resume(fake_data_config, tmp_path,
                                                            monkeypatch, capsys):
  """SIGTERM during the last step of the last epoch: the checkpoint is written before the
  evaluation; the rerun finds the run complete, owes that evaluation and does it (metric, line,
  best/), once; another rerun does nothing."""
  workdir = str(tmp_path / 'w')
  config = small_config(fake_data_config, num_epochs=1)        # 12 steps

  def requested(self, step):
    if step == 12:
      self.signum = signal.SIGTERM
    return self.signum is not None

  monkeypatch.setattr(stop_lib.StopRequest, 'requested', requested)
  train.train_and_evaluate(config, workdir)
  monkeypatch.undo()
  assert 'stopped by SIGTERM at step 12' in capsys.readouterr().out
  assert evaluations(workdir) == [] and not os.listdir(os.path.join(workdir, 'best'))
  train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert out.count('epoch 1/1: 1-NN top-1') == 1 and 'best so far' in out, out
  (step, value), = evaluations(workdir)
  assert step == 12 and 0 <= value <= 1
  assert os.listdir(os.path.join(workdir, 'best')) == ['12']
  train.train_and_evaluate(config, workdir)
  assert 'epoch 1/1' not in capsys.readouterr().out
  assert evaluations(workdir) == [(12, value)]


def test_a_completed_run_rerun_evaluates_nothing(trained_workdir, fake_data_config, tmp_path,
                                                 capsys):
  workdir = tmp_path / 'w'
  shutil.copytree(trained_workdir, workdir)
  before = evaluations(workdir)
  assert len(before) == 1
  train.train_and_evaluate(small_config(fake_data_config, num_epochs=1), str(workdir))
  assert 'epoch 1/1' not in capsys.readouterr().out
  assert evaluations(workdir) == before
