"""The optimizer is torch.optim.SGD(nesterov=True, weight_decay=wd), with accumulation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from snca_jax import optim


def config(**kw):
  c = ml_collections.ConfigDict(dict(
      learning_rate=0.1, lr_schedule='step', lr_step_epochs=1, lr_decay=0.1, num_epochs=3,
      momentum=0.9, nesterov=True, weight_decay=0.01, grad_accum_steps=1, dtype='float32'))
  c.update(kw)
  return c


def torch_sgd(p, grads, lrs, momentum=0.9, wd=0.01):
  """torch.optim.SGD's update rule (nesterov, coupled weight decay), written out."""
  buf = None
  for g, lr in zip(grads, lrs):
    d = g + wd * p
    buf = d if buf is None else momentum * buf + d
    p = p - lr * (d + momentum * buf)
  return p


def test_matches_torch_sgd_with_step_schedule():
  rng = np.random.default_rng(0)
  p0 = rng.normal(size=5)
  grads = [rng.normal(size=5) for _ in range(6)]
  tx = optim.make_optimizer(config(), steps_per_epoch=2)   # lr 0.1, 0.1, 0.01, 0.01, 0.001...
  p, state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
  for g in grads:
    u, state = tx.update(jnp.asarray(g), state, p)
    p = optax.apply_updates(p, u)
  want = torch_sgd(p0, grads, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
  np.testing.assert_allclose(np.asarray(p), want, rtol=1e-5)


def test_accumulation_averages_pairs_of_batches():
  rng = np.random.default_rng(1)
  p0 = rng.normal(size=4)
  grads = [rng.normal(size=4) for _ in range(4)]
  tx = optim.make_optimizer(config(grad_accum_steps=2), steps_per_epoch=4)
  p, state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
  trajectory = []
  for g in grads:
    u, state = tx.update(jnp.asarray(g), state, p)
    p = optax.apply_updates(p, u)
    trajectory.append(np.asarray(p))
  np.testing.assert_allclose(trajectory[0], p0, rtol=1e-6)   # no update after 1 of 2 batches
  want = torch_sgd(p0, [(grads[0] + grads[1]) / 2, (grads[2] + grads[3]) / 2], [0.1, 0.1])
  np.testing.assert_allclose(trajectory[3], want, rtol=1e-5)


def test_cosine_schedule_and_bad_name():
  c = config(lr_schedule='cosine', num_epochs=2)
  assert optim.learning_rate_at(c, 10, 0) == pytest.approx(0.1)
  assert optim.learning_rate_at(c, 10, 10) == pytest.approx(0.05)
  with pytest.raises(ValueError, match='lr_schedule'):
    optim.make_optimizer(config(lr_schedule='linear'), 10)


def test_loss_scaling_unscales_skips_non_finite_updates_and_adapts_the_scale():
  """optim.loss_scaled (float16 networks): the gradients of the scaled loss give the update of
  the true gradients; a non-finite one gives none, keeps the momentum and halves the scale; the
  scale doubles after `growth` finite updates in a row and never falls below 1."""
  inner = optim.make_optimizer(config(), steps_per_epoch=10)
  tx = optim.loss_scaled(inner, initial=1024.0, growth=3)
  p = {'w': jnp.array([1.0, -2.0, 0.5])}
  g = {'w': jnp.array([0.25, 0.5, -1.0])}
  state, ref_state = tx.init(p), inner.init(p)
  assert optim.loss_scale(state) == 1024.0 and optim.loss_scale(ref_state) is None
  updates, state = tx.update(jax.tree.map(lambda x: x * 1024.0, g), state, p)
  want, ref_state = inner.update(g, ref_state, p)
  np.testing.assert_array_equal(updates['w'], want['w'])       # powers of 2: exact
  kept = state.inner
  updates, state = tx.update({'w': jnp.array([jnp.inf, 0.0, 0.0])}, state, p)
  assert not np.any(updates['w']) and optim.loss_scale(state) == 512.0
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), state.inner, kept))
  for _ in range(3):
    updates, state = tx.update(jax.tree.map(lambda x: x * 512.0, g), state, p)
  assert optim.loss_scale(state) == 1024.0 and int(state.good) == 0
  state = state._replace(scale=jnp.float32(1.0))
  _, state = tx.update({'w': jnp.array([jnp.nan, 0.0, 0.0])}, state, p)
  assert optim.loss_scale(state) == 1.0


def test_float16_networks_train_with_loss_scaling_others_without():
  c = config(dtype='float16')
  assert isinstance(optim.make_optimizer(c, 10).init({'w': jnp.zeros(2)}), optim.LossScaleState)
  c = config(dtype='bfloat16')
  assert optim.loss_scale(optim.make_optimizer(c, 10).init({'w': jnp.zeros(2)})) is None
