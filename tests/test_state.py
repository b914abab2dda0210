"""The train state's life: building from host arrays, and restoring a checkpoint
written on any device count onto any other, with a row count that no device count divides."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from snca_jax import bank as bank_lib
from snca_jax import checkpoint
from snca_jax import evaluate
from snca_jax import mesh as mesh_lib
from snca_jax import models
from snca_jax import optim
from snca_jax import state as state_lib
from snca_jax.errors import CheckpointError

from conftest import final_state, make_fake_fashion_mnist, subprocess_env, use_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 101                                    # prime: no device count above 1 divides it


def _setup(devices, fake_data_config):
  config = fake_data_config.copy_and_resolve_references()
  config.model, config.low_dim, config.batch_size = 'tiny_resnet', 16, 24
  mesh = mesh_lib.make_mesh(jax.devices()[:devices])
  model = models.model_from_config(config)
  tx = optim.make_optimizer(config, N // 24)
  abstract = state_lib.abstract_train_state(model, tx, image_shape=(28, 28, 1), low_dim=16,
                                            num_examples=N, mesh=mesh)
  return config, mesh, model, tx, abstract


@pytest.mark.parametrize('written_on,restored_on', [(8, 1), (8, 3), (3, 8), (1, 8), (5, 7)])
def test_restore_onto_another_device_count(written_on, restored_on, fake_data_config,
                                           tmp_path):
  config, mesh, model, tx, _ = _setup(written_on, fake_data_config)
  labels = np.arange(N) % 10
  state = state_lib.create_train_state(model, tx, key=jax.random.key(1), bank_labels=labels,
                                       image_shape=(28, 28, 1), low_dim=16, mesh=mesh)
  assert state.bank.shape[0] == bank_lib.num_rows(N, mesh)
  mngr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mngr, 4, state, config, {'num_examples': N})
  mngr.wait_until_finished()
  config, mesh2, _, tx, abstract = _setup(restored_on, fake_data_config)
  checkpoint.check_resumable(mngr, 4, config=config, num_examples=N)
  restored = checkpoint.restore_train_state(mngr, 4, abstract, num_examples=N)
  rows = bank_lib.num_rows(N, mesh2)
  assert restored.bank.shape == (rows, 16) and restored.bank.sharding == abstract.bank.sharding
  np.testing.assert_array_equal(np.asarray(restored.bank)[:N], np.asarray(state.bank)[:N])
  np.testing.assert_array_equal(np.asarray(restored.bank_labels),
                                np.r_[labels, [-1] * (rows - N)])
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(CheckpointError, match=f'bank of {N} rows but the training set has 99'):
    checkpoint.check_resumable(mngr, 4, config=config, num_examples=99)


def test_from_arrays(fake_data_config):
  config, mesh, model, tx, abstract = _setup(8, fake_data_config)
  params = jax.tree.map(np.asarray, model.init(jax.random.key(0), np.zeros((1, 28, 28, 1)))[
      'params'])
  bank = np.random.default_rng(0).normal(size=(N, 16)).astype(np.float32)
  state = state_lib.from_arrays(params=params, batch_stats={}, bank=bank,
                                bank_labels=np.arange(N) % 10, tx=tx, mesh=mesh, step=7)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(abstract.opt_state)
  assert state.bank.shape == abstract.bank.shape and state.bank.sharding == abstract.bank.sharding
  assert int(state.step) == 7 and int(np.asarray(state.bank_labels)[-1]) == -1
  np.testing.assert_array_equal(np.asarray(state.bank)[:N], bank)


def _run(args, devices):
  env = subprocess_env(devices)
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


def test_train_and_eval_across_device_counts(tmp_path, monkeypatch):
  """Training on 8 devices (101 rows padded to 104), resumed on 3 (102), then on 1 (101);
  eval_knn.py on 3 devices and the evaluator on 8 give one answer. (Training in this process,
  on the first n of its devices: a run on n devices, without starting a process each.)"""
  from configs import fashion_mnist
  from snca_jax import train
  data = make_fake_fashion_mnist(str(tmp_path / 'idx'), n_train=N, n_test=13)
  workdir = str(tmp_path / 'w')
  config = fashion_mnist.get_config()
  config.data.idx_dir, config.data.data_dir = data, str(tmp_path / 'tfds')
  config.model, config.low_dim, config.batch_size = 'tiny_resnet', 16, 24
  config.knn.batch_size, config.lr_schedule = 24, 'step'
  for epochs, devices in ((1, 8), (2, 3), (3, 1)):
    use_devices(monkeypatch, devices)
    config.num_epochs = epochs
    state = train.train_and_evaluate(config, workdir)
    assert state.bank.shape[0] == -(-N // devices) * devices
    assert len(state.bank.devices()) == devices
    assert final_state(workdir)[0] == 4 * epochs
  use_devices(monkeypatch, len(jax.devices()))
  r = _run(['eval_knn.py', '--workdir', workdir, '--k', '5'], 3)
  assert r.returncode == 0, r.stderr[-3000:]
  on_8 = evaluate.evaluate_checkpoint(workdir, k=5)          # this process: 8 devices
  assert on_8['num_queries'] == 13
  assert (f"top-1 {100 * on_8['top1']:.2f}%  top-5 {100 * on_8['top5']:.2f}%" in
          r.stdout.strip().splitlines()[-1]), (r.stdout, on_8)
