"""The optimizer is torch.optim.SGD(nesterov=True, weight_decay=wd), with accumulation."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from snca_jax import optim


def config(**kw):
  c = ml_collections.ConfigDict(dict(
      learning_rate=0.1, lr_schedule='step', lr_step_epochs=1, lr_decay=0.1, num_epochs=3,
      momentum=0.9, nesterov=True, weight_decay=0.01, grad_accum_steps=1))
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
