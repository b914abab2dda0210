"""What careless or hostile users found: values accepted without a word or failing late with
a traceback, a stale progress bar after the one-line error, SIGINT while compiling."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tqdm

from snca_jax import evaluate
from snca_jax import train
from snca_jax.data import sources
from snca_jax.errors import ConfigError, DataError, TrainingError

from conftest import subprocess_env
from test_train import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env():
  e = subprocess_env(1)
  return e


def cli_flags(data):
  return [f'--config.data.idx_dir={data.idx_dir}', f'--config.data.data_dir={data.data_dir}',
          '--config.model=tiny_resnet', '--config.low_dim=16', '--config.batch_size=8',
          '--config.num_epochs=1', '--config.knn.batch_size=16']


def last_line(stderr):
  lines = [l for l in stderr.splitlines() if l.strip()]
  return lines[-1] if lines else ''


@pytest.fixture(scope='session')
def trained(fake_data_config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('trained'))
  train.train_and_evaluate(tiny(fake_data_config, num_epochs=1), workdir)
  return workdir


# --- 1. Values that cannot work: one line, before any work.

def test_train_classes_the_dataset_lacks(fake_data_config, tmp_path):
  config = tiny(fake_data_config)
  config.data.num_classes = 0              # so the config alone cannot tell
  config.data.train_classes = (0, 11)
  with pytest.raises(DataError, match=r'names classes \[11\] that fashion_mnist does not have '
                                      r'\(its 10 classes are 0..9\)'):
    train.train_and_evaluate(config, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


@pytest.mark.parametrize('label_map', [(0, 1, 0, 1, 0, 2, 0, 2, 3),            # 9 of 10
                                       (0, 1, 0, 1, 0, 2, 0, 2, 3, 2, 3)])     # 11 of 10
def test_label_map_of_another_length_than_the_classes(label_map, fake_data_config, tmp_path):
  config = tiny(fake_data_config)
  config.data.num_classes, config.data.label_map = 0, label_map
  with pytest.raises(DataError, match=f'data.label_map has {len(label_map)} entries but '
                                      f'fashion_mnist has 10 classes'):
    train.train_and_evaluate(config, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_short_label_map_of_a_dataset_that_declares_no_class_count(fake_data_config,
                                                                    monkeypatch):
  """Where the dataset does not say how many classes it has, its labels do: a DataError as
  the view is opened, never an IndexError at the first record."""
  monkeypatch.setattr(sources, '_fine_classes', lambda source: None)
  data = fake_data_config.data.copy_and_resolve_references()
  data.label_map = (0, 1, 0, 1, 0, 2, 0, 2, 3)
  with pytest.raises(DataError, match='has label 9, beyond the 9 entries of data.label_map'):
    sources.open_source(data, 'train')
  view = sources.View(sources.open_source(data, 'train', 'fine'), label_map=(0, 1))
  with pytest.raises(DataError, match='beyond the 2 entries'):
    view.__getitems__(range(len(view)))


def test_eval_arguments_fail_before_any_work(tmp_path):
  """An empty workdir: any check that came after the checkpoint's would say 'holds no
  checkpoint' instead."""
  afile = tmp_path / 'afile'
  afile.write_text('not a folder')
  for kwargs, fragments in (
      ({'neighbours': -1}, ['--neighbours=-1 cannot work', '0 (none) to 200']),
      ({'neighbours': 1_000_000}, ['--neighbours=1000000 cannot work']),
      ({'export_dir': str(afile)}, [f'--export={afile} is a file, not a folder']),
      ({'export_dir': str(afile / 'x')}, [f'cannot be made inside the file {afile}']),
      ({'neighbours': 3, 'neighbours_dir': str(afile)}, ['--neighbours_dir=']),
      ({'k': 0, 'sigma': float('nan')}, ['--k=0 cannot work', '--sigma=nan cannot work'])):
    with pytest.raises(ConfigError) as e:
      evaluate.evaluate_checkpoint(str(tmp_path), **kwargs)
    assert '\n' not in str(e.value) and all(f in str(e.value) for f in fragments), str(e.value)
  assert afile.read_text() == 'not a folder'


def test_k_beyond_the_database_is_reported_as_used(trained, tmp_path):
  """--k 1000 against a bank of 96 images: all 96 vote, and the result says K=96."""
  result = evaluate.evaluate_checkpoint(trained, k=1000, neighbours=5,
                                        export_dir=str(tmp_path / 'x'))
  assert (result['k'], result['k_requested'], result['database_size']) == (96, 1000, 96)
  assert result['neighbours/num_queries'] == 5
  same = evaluate.evaluate_checkpoint(trained, k=96)
  assert same['k'] == 96 and 'k_requested' not in same
  assert (same['top1'], same['top5']) == (result['top1'], result['top5'])
  assert np.load(tmp_path / 'x' / 'database.npy').shape == (96, 16)


def test_output_that_cannot_be_written_fails_first(tmp_path):
  r = subprocess.run([sys.executable, 'eval_knn.py', '--workdir', str(tmp_path), '--output',
                      str(tmp_path)], cwd=ROOT, env=env(), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert last_line(r.stderr) == (f'eval_knn.py: --output={tmp_path} is a folder: give the path '
                                 f'of a JSON file to write (its folder must exist)')


# --- 2. No progress bar left open to be drawn again after the error's line.

def test_progress_bars_are_closed_when_an_error_propagates(fake_data_config, tmp_path,
                                                           monkeypatch):
  bars = []

  class Recorded(tqdm.tqdm):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      bars.append(self)

  monkeypatch.setattr(train.tqdm, 'tqdm', Recorded)
  config = tiny(fake_data_config, learning_rate=1e30)    # finite; the loss is not
  with pytest.raises(TrainingError, match='the loss became'):
    train.train_and_evaluate(config, str(tmp_path / 'w'))
  assert bars and all(bar.disable for bar in bars)        # tqdm's close() disables


def test_the_error_line_is_the_last_thing_on_stderr(fake_data_config, tmp_path):
  r = subprocess.run([sys.executable, 'train.py', '--config', 'configs/fashion_mnist.py',
                      '--workdir', str(tmp_path / 'w'), *cli_flags(fake_data_config.data),
                      '--config.learning_rate=1e30'], cwd=ROOT, env=env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert last_line(r.stderr).startswith('train.py: the loss became'), r.stderr[-3000:]


# --- 3. SIGINT while compiling: a clean stop, never a segmentation fault.

def test_sigint_while_compiling_stops_cleanly(fake_data_config, tmp_path):
  """The workdir appears once the stop handler is in place; SIGINT a moment later lands while
  the data is opened or the state or step compiled. A clean stop before the first step or
  after one; never a traceback, a negative exit status or a segmentation fault."""
  workdir = tmp_path / 'w'
  p = subprocess.Popen([sys.executable, 'train.py', '--config', 'configs/fashion_mnist.py',
                        '--workdir', str(workdir), *cli_flags(fake_data_config.data)],
                       cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
  try:
    deadline = time.time() + 120
    while not workdir.exists() and p.poll() is None and time.time() < deadline:
      time.sleep(0.01)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 0, err[-3000:]
  assert 'Traceback' not in err and 'Segmentation fault' not in err, err[-3000:]
  if 'before the first step' in out:
    assert out.strip().splitlines()[-1] == ('train.py: stopped by SIGINT before the first '
                                            'step; no checkpoint was written; run the same '
                                            'command to train')
    ckpts = workdir / 'checkpoints'
    assert not ckpts.exists() or not os.listdir(ckpts)
  else:
    assert 'stopped by SIGINT at step' in out, out[-2000:]


def test_signal_before_the_first_step_returns_without_training(fake_data_config, tmp_path,
                                                               monkeypatch):
  """SIGINT while the state is built (a compilation): the run returns that state untrained,
  writing no checkpoint; the handlers are restored."""
  build = train.state_lib.create_train_state

  def build_then_signal(*args, **kwargs):
    state = build(*args, **kwargs)
    # Python's own handler would raise KeyboardInterrupt here (and end pytest's session).
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    os.kill(os.getpid(), signal.SIGINT)              # the handler only notes it
    return state

  monkeypatch.setattr(train.state_lib, 'create_train_state', build_then_signal)
  before = signal.getsignal(signal.SIGINT)
  state = train.train_and_evaluate(tiny(fake_data_config), str(tmp_path / 'w'))
  assert int(state.step) == 0 and signal.getsignal(signal.SIGINT) is before
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints' / '1')
  ckpts = tmp_path / 'w' / 'checkpoints'
  assert not ckpts.exists() or not os.listdir(ckpts)
