"""Two processes x 2 CPU devices (jax.distributed, gloo) train exactly as 1 process x 4."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from snca_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'multihost_worker.py')


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(n_proc, devices, workdir, out, data, *extra, timeout=300):
  """Runs the worker as n_proc processes; kills every one of them whatever happens."""
  port = free_port()
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  procs = []
  try:
    for pid in range(n_proc):
      cmd = [sys.executable, WORKER, '--devices', str(devices), '--num_processes', str(n_proc),
             '--process_id', str(pid), '--port', str(port), '--workdir', str(workdir),
             '--out', str(out), '--idx_dir', data.idx_dir, '--data_dir', data.data_dir, *extra]
      procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, log in zip(procs, logs):
      assert p.returncode == 0, log[-4000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return dict(np.load(out))


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [l['train/loss'] for l in map(json.loads, f) if 'train/loss' in l]


@pytest.fixture(scope='module')
def runs(fake_data_config, tmp_path_factory):
  pipeline.open_source(fake_data_config.data, 'train')       # prepare once, before the workers
  tmp = tmp_path_factory.mktemp('multihost')
  single = launch(1, 4, tmp / 'single', tmp / 'single.npz', fake_data_config.data)
  multi = launch(2, 2, tmp / 'multi', tmp / 'multi.npz', fake_data_config.data)
  return tmp, single, multi


def test_two_processes_equal_one(runs):
  tmp, single, multi = runs
  assert set(single) == set(multi) and int(multi['step']) == 12
  for key in single:
    np.testing.assert_allclose(multi[key], single[key], rtol=1e-5, atol=1e-5, err_msg=key)
  a, b = losses(tmp / 'single'), losses(tmp / 'multi')
  assert len(a) == len(b) == 12
  np.testing.assert_allclose(b, a, rtol=1e-5)
  assert os.listdir(tmp / 'multi' / 'checkpoints')


def test_two_process_checkpoint_restores_in_one_process(runs, fake_data_config):
  tmp, _, multi = runs
  shutil.copytree(tmp / 'multi', tmp / 'resume')
  evaluated = launch(1, 1, tmp / 'resume', tmp / 'eval.npz', fake_data_config.data,
                     '--eval_only')
  np.testing.assert_allclose(evaluated['knn_top1'], multi['knn_top1'], atol=1e-6)
  resumed = launch(1, 4, tmp / 'resume', tmp / 'resume.npz', fake_data_config.data,
                   '--epochs', '3')
  assert int(resumed['step']) == 18


def test_evaluation_on_a_mesh_that_interleaves_processes(runs, fake_data_config):
  """Features and labels come back in one order when the mesh's device order alternates
  between the processes (process 0, 1, 0, 1)."""
  tmp, _, _ = runs
  out = launch(2, 2, tmp / 'multi', tmp / 'interleaved.npz', fake_data_config.data,
               '--eval_only', '--interleaved_eval')
  assert bool(out['interleaved_same_order'])
  assert float(out['interleaved_feature_diff']) < 1e-5


def test_process_zero_prepares_an_image_folder_while_the_other_waits(fake_data_config,
                                                                     tmp_path):
  """Two processes start on an image folder nobody has prepared: it is prepared once (by
  process 0, on the filesystem both see), and both train on it."""
  from conftest import make_image_tree
  root = tmp_path / 'photos'
  make_image_tree(str(root), per_class={'train': 4, 'val': 2})
  out = launch(2, 1, tmp_path / 'w', tmp_path / 'out.npz', fake_data_config.data,
               '--epochs', '1', '--folder_root', str(root))
  assert int(out['step']) == 2                       # 16 images, batch 8
  assert sorted(os.listdir(root / 'snca_prepared')) == ['train', 'val']
  assert 0.0 <= float(out['knn_top1']) <= 1.0
