"""End to end: real training steps on a small fake Fashion-MNIST, checkpoints, resume, eval."""

import collections
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from snca_jax import evaluate
from snca_jax import mesh as mesh_lib
from snca_jax import models
from snca_jax import optim
from snca_jax import state as state_lib
from snca_jax import step as step_lib
from snca_jax import train
from snca_jax.data import pipeline
from snca_jax.data import sources
from snca_jax.data import transforms

from conftest import assert_accuracy_matches, subprocess_env, weighted_knn_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(config, **overrides):
  c = config.copy_and_resolve_references()
  c.model, c.low_dim = 'tiny_resnet', 16
  c.batch_size, c.num_epochs, c.lr_step_epochs = 16, 2, 1
  c.lr_schedule = 'step'     # a schedule that does not depend on num_epochs
  c.knn.batch_size, c.log_every_steps = 16, 2
  c.memory_momentum_steps = ((1, 0.8),)
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def tiny_step(config):
  """(mesh, source, state, jitted step) of `config` on the fake data, on all 8 devices."""
  mesh = mesh_lib.make_mesh()
  source = sources.open_source(config.data, 'train')
  model = models.model_from_config(config)
  tx = optim.make_optimizer(config, steps_per_epoch=6)
  state = state_lib.create_train_state(
      model, tx, key=jax.random.key(0), bank_labels=sources.read_labels(source),
      image_shape=(28, 28, 1), low_dim=16, mesh=mesh)
  step = step_lib.make_train_step(model, tx, config, steps_per_epoch=6, mesh=mesh,
                                  shardings=jax.tree.map(lambda a: a.sharding, state))
  return mesh, source, state, step


def test_one_step_changes_params_and_only_the_batch_rows_of_the_bank(fake_data_config):
  config = tiny(fake_data_config)
  mesh, source, state, step = tiny_step(config)
  assert state.bank.sharding.spec == jax.sharding.PartitionSpec('data')
  assert len(state.bank.sharding.device_set) == 8
  batch = next(pipeline.train_batches(source, global_batch_size=16, seed=0, epoch=0,
                                      transform=transforms.from_config(config.data, 'crop_flip')))
  old_params = jax.tree.map(np.asarray, state.params)
  old_bank = np.asarray(state.bank)
  new, metrics = step(state, step_lib.device_batch(batch, mesh))
  assert int(new.step) == 1 and np.isfinite(float(metrics['loss']))
  assert float(metrics['memory_momentum']) == 0.5
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), old_params,
                         new.params)
  assert all(jax.tree.leaves(changed))
  bank = np.asarray(new.bank)
  rows = batch['index']
  assert not np.any(np.all(bank[rows] == old_bank[rows], axis=1))
  np.testing.assert_allclose(np.linalg.norm(bank[rows], axis=1), 1.0, rtol=1e-5)
  others = np.setdiff1d(np.arange(len(bank)), rows)
  assert np.array_equal(bank[others], old_bank[others])
  assert new.bank.sharding == state.bank.sharding


def test_a_step_through_the_class_index_equals_the_dense_one(fake_data_config):
  """`nca_class_index='on'` (what 'auto' picks with many classes; the fake data has ten):
  the same step as without the index, up to the order of float32 sums."""
  mesh = mesh_lib.make_mesh()
  source = sources.open_source(fake_data_config.data, 'train')
  batch = next(pipeline.train_batches(source, global_batch_size=16, seed=0, epoch=0,
                                      transform=transforms.from_config(fake_data_config.data,
                                                                       'crop_flip')))
  out = {}
  for setting in ('auto', 'on'):
    config = tiny(fake_data_config, nca_class_index=setting)
    model = models.model_from_config(config)
    tx = optim.make_optimizer(config, steps_per_epoch=6)
    state = state_lib.create_train_state(
        model, tx, key=jax.random.key(0), bank_labels=sources.read_labels(source),
        image_shape=(28, 28, 1), low_dim=16, mesh=mesh)
    index = step_lib.class_index(config, state.bank_labels, mesh)
    assert (index is None) == (setting == 'auto')       # ten classes: 'auto' goes without
    step = step_lib.make_train_step(model, tx, config, steps_per_epoch=6, mesh=mesh,
                                    shardings=jax.tree.map(lambda a: a.sharding, state),
                                    class_index=index)
    out[setting] = step(state, step_lib.device_batch(batch, mesh))
  (dense, m_dense), (indexed, m_indexed) = out['auto'], out['on']
  np.testing.assert_allclose(float(m_indexed['loss']), float(m_dense['loss']), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(indexed)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_resume_gives_the_same_state_as_an_uninterrupted_run(fake_data_config, tmp_path):
  config = tiny(fake_data_config)
  straight = train.train_and_evaluate(config, str(tmp_path / 'a'))
  train.train_and_evaluate(tiny(fake_data_config, num_epochs=1), str(tmp_path / 'b'))
  resumed = train.train_and_evaluate(config, str(tmp_path / 'b'))
  assert int(straight.step) == int(resumed.step) == 12
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert sorted(os.listdir(tmp_path / 'b' / 'checkpoints')) == ['12', '6']
  lines = [json.loads(l) for l in open(tmp_path / 'b' / 'metrics.jsonl')]
  assert [l['val/nn_top1'] for l in lines if 'val/nn_top1' in l]
  assert all(np.isfinite(l['train/loss']) for l in lines if 'train/loss' in l)
  assert os.listdir(tmp_path / 'b' / 'tensorboard')
  result = evaluate.evaluate_checkpoint(str(tmp_path / 'b'), export_dir=str(tmp_path / 'x'))
  assert result['step'] == 12 and result['num_queries'] == 40 and result['k'] == 30
  x = {f[:-4]: np.load(tmp_path / 'x' / f) for f in os.listdir(tmp_path / 'x')}
  np.testing.assert_array_equal(x['database'], np.asarray(resumed.bank)[:96])
  assert_accuracy_matches(result, weighted_knn_reference(
      x['queries'], x['query_labels'], x['database'], x['database_labels'], k=30,
      sigma=0.05), 40)
  # The fake classes are learnable (each its own brightness): 12 steps of a tiny network lift
  # kNN well above chance, 10% top-1 and 50% top-5.
  assert result['top1'] >= 0.2 and result['top5'] >= 0.65, result


def _run(args, **kw):
  env = subprocess_env()
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600, **kw)


def test_command_line_train_then_eval(fake_data_config, tmp_path):
  workdir = str(tmp_path / 'w')
  flags = [f'--config.data.idx_dir={fake_data_config.data.idx_dir}',
           f'--config.data.data_dir={fake_data_config.data.data_dir}',
           '--config.model=tiny_resnet', '--config.low_dim=16', '--config.batch_size=16',
           '--config.num_epochs=1', '--config.knn.batch_size=16']
  r = _run(['train.py', '--config', 'configs/fashion_mnist.py', '--workdir', workdir, *flags])
  assert r.returncode == 0, r.stderr[-3000:]
  assert '1-NN top-1' in r.stdout
  out = str(tmp_path / 'result.json')
  r = _run(['eval_knn.py', '--workdir', workdir, '--recompute', '--k', '5', '--output', out])
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.load(open(out))
  assert result['k'] == 5 and result['database'] == 'recomputed' and result['step'] == 6
  printed = re.search(r'K=5, .* on 40 images, checkpoint step 6: top-1 ([\d.]+)%  top-5 '
                      r'([\d.]+)%', r.stdout)
  assert printed, r.stdout
  assert [float(v) for v in printed.groups()] == [round(100 * result['top1'], 2),
                                                  round(100 * result['top5'], 2)]


def test_knn_monitor_and_best_checkpoint(fake_data_config, tmp_path):
  """monitor='knn': weighted kNN (the config's k) against the bank after every epoch, as the
  original's cifar.py; the best epoch's state is kept in <workdir>/best, also across a resume."""
  from snca_jax import checkpoint
  def config(epochs):
    c = tiny(fake_data_config, num_epochs=epochs, monitor='knn')
    c.knn.k = 5
    return c

  workdir = str(tmp_path / 'w')
  train.train_and_evaluate(config(2), workdir)
  train.train_and_evaluate(config(3), workdir)           # resumed for the third epoch
  lines = map(json.loads, open(f'{workdir}/metrics.jsonl'))
  values = {l['step']: l['val/knn5_top1'] for l in lines if 'val/knn5_top1' in l}
  assert sorted(values) == [6, 12, 18]
  best = checkpoint.manager(os.path.join(workdir, 'best'), read_only=True)
  best_step = best.latest_step()
  assert best.all_steps() == [best_step]
  want = max(values.values())
  assert values[best_step] == want and min(s for s, v in values.items() if v == want) == best_step
  _, facts = checkpoint.read_config(best, best_step)
  assert facts['monitor_value'] == want
  state = checkpoint.restore_as_saved(best, best_step, mesh_lib.make_mesh())
  assert int(state['step']) == best_step


def test_no_retracing(fake_data_config, tmp_path):
  """Two epochs, their per-epoch evaluations and a final evaluation: the training step is
  traced once, and the embedding function at most once (it may be cached from another test).
  JAX reports every trace of a jitted function to its monitoring listeners, by name."""
  traces = collections.Counter()

  def count(event, duration, fun_name=None, **kwargs):
    del duration, kwargs
    if event == '/jax/core/compile/jaxpr_trace_duration':
      traces[fun_name] += 1

  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    train.train_and_evaluate(tiny(fake_data_config, num_epochs=2), str(tmp_path / 'w'))
    evaluate.evaluate_checkpoint(str(tmp_path / 'w'))
  finally:
    jax.monitoring.unregister_event_duration_listener(count)
  assert traces['train_step'] == 1, traces
  assert traces['embed'] <= 1, traces


def test_a_float16_network_steps_with_its_loss_scale_and_skips_overflowing_steps(
    fake_data_config):
  """dtype='float16': the step differentiates the loss times the scale (reported as a metric)
  and updates with the true gradient (as with a scale of 1, to float16's underflow); where that
  overflows float16 in the backward pass, the parameters stay and the scale halves, while the
  bank and the step count move on."""
  config = tiny(fake_data_config, dtype='float16')
  mesh, source, state, step = tiny_step(config)
  batches = pipeline.train_batches(source, global_batch_size=16, seed=0, epoch=0,
                                   transform=transforms.from_config(config.data, 'crop_flip'))
  assert float(optim.loss_scale(state.opt_state)) == optim.LOSS_SCALE_INITIAL
  # (At 2^15 this tiny network's first float16 backward overflows: the scale then halves until
  # it fits, as it would in training.) A scale that fits:
  batch = step_lib.device_batch(next(batches), mesh)
  with_scale = lambda s: state.replace(opt_state=state.opt_state._replace(scale=jnp.float32(s)))
  old = jax.tree.map(np.asarray, state.params)
  unscaled, _ = step(jax.tree.map(jnp.copy, with_scale(1.0)), batch)
  state, metrics = step(with_scale(8.0), batch)
  assert np.isfinite(float(metrics['loss'])) and float(metrics['loss_scale']) == 8.0
  assert float(optim.loss_scale(state.opt_state)) == 8.0
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)),
                                          old, state.params)))
  # The same update as with a scale of 1, up to what float16's subnormals lose there (under
  # 0.1% of each parameter's update here); not divided back, it would be 8 times it.
  for a, b, o in zip(*map(jax.tree.leaves, (state.params, unscaled.params, old))):
    got, want = np.asarray(a) - o, np.asarray(b) - o
    assert np.linalg.norm(got - want) <= 0.01 * np.linalg.norm(want)
  # A scale no float16 cotangent survives: the step is skipped.
  state = state.replace(opt_state=state.opt_state._replace(scale=jnp.float32(2.0 ** 127)))
  old, old_bank = jax.tree.map(np.asarray, state.params), np.asarray(state.bank)
  state, metrics = step(state, step_lib.device_batch(next(batches), mesh))
  assert np.isfinite(float(metrics['loss'])) and int(state.step) == 2
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)),
                                          old, state.params)))
  assert float(optim.loss_scale(state.opt_state)) == 2.0 ** 126
  assert not np.array_equal(old_bank, np.asarray(state.bank))
