"""The optimizer and the two schedules of the original's recipes (docs/METHOD.md).

- SGD with Nesterov momentum and coupled weight decay, as torch.optim.SGD: the decay is added to
  the gradient before the momentum, and applies to every parameter.
- Learning rate: `lr * lr_decay ** (epoch // lr_step_epochs)` (the original's), evaluated per
  optimizer update; or, with `lr_schedule = 'cosine'`, a cosine decay from `lr` to 0 over the run.
- Gradient accumulation (the original's `--iter-size`): `optax.MultiSteps` averages the gradients
  of `grad_accum_steps` consecutive batches before one update. Batch statistics and the memory
  bank are updated on every batch, as in the original.
- Memory momentum: piecewise constant in the epoch, e.g. 0.5, 0.8 from epoch 80, 0.9 from 120.
- Dynamic loss scaling where the network computes in float16 (`dtype='float16'`), whose narrow
  range would flush small gradients to zero: the loss is multiplied by a scale before the
  backward pass and the gradients divided by it after (`loss_scaled`); an update whose
  gradients are not all finite is skipped and the scale halved, and the scale doubles after
  LOSS_SCALE_GROWTH updates without one.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from snca_jax.errors import ConfigError


def learning_rate_schedule(config, updates_per_epoch: int):
  if config.lr_schedule == 'cosine':
    return optax.cosine_decay_schedule(config.learning_rate,
                                       max(config.num_epochs * updates_per_epoch, 1))
  if config.lr_schedule != 'step':
    raise ConfigError(f"lr_schedule {config.lr_schedule!r} is not supported: use 'step' or "
                     f"'cosine'")
  boundaries = {}
  epoch = config.lr_step_epochs
  while epoch < config.num_epochs:
    boundaries[int(epoch * updates_per_epoch)] = config.lr_decay
    epoch += config.lr_step_epochs
  return optax.piecewise_constant_schedule(config.learning_rate, boundaries)


LOSS_SCALE_INITIAL = 2.0 ** 15
LOSS_SCALE_GROWTH = 2000


class LossScaleState(NamedTuple):
  inner: optax.OptState
  scale: jnp.ndarray            # float32: the loss's multiplier in the step now
  good: jnp.ndarray             # int32: finite updates since the scale last changed


def loss_scaled(inner: optax.GradientTransformation, initial: float = LOSS_SCALE_INITIAL,
                growth: int = LOSS_SCALE_GROWTH) -> optax.GradientTransformation:
  """`inner` taking the gradients of the loss times the state's scale (`loss_scale`): divided by
  it, then `inner`'s update where they are all finite; elsewhere no update, `inner`'s state
  kept, and the scale halved (not below 1). After `growth` finite updates in a row the scale
  doubles."""

  def init(params):
    return LossScaleState(inner.init(params), jnp.float32(initial), jnp.int32(0))

  def update(grads, state, params=None):
    grads = jax.tree.map(lambda g: g / state.scale.astype(g.dtype), grads)
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    updates, inner_state = inner.update(grads, state.inner, params)
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    inner_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), inner_state,
                               state.inner)
    good = jnp.where(finite, state.good + 1, 0)
    scale = jnp.where(finite, state.scale, jnp.maximum(state.scale / 2, 1.0))
    scale = jnp.where(good >= growth, scale * 2, scale)
    return updates, LossScaleState(inner_state, scale, jnp.where(good >= growth, 0, good))

  return optax.GradientTransformation(init, update)


def loss_scale(opt_state):
  """The scale the loss is multiplied by in this step (`loss_scaled`), or None without one."""
  return opt_state.scale if isinstance(opt_state, LossScaleState) else None


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """`steps_per_epoch` counts batches; each optimizer update takes `grad_accum_steps` of them.
  With a float16 network, `loss_scaled` around it all."""
  accum = config.grad_accum_steps
  schedule = learning_rate_schedule(config, max(steps_per_epoch // accum, 1))
  tx = optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
  )
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum)
  if config.dtype == 'float16':
    tx = loss_scaled(tx)
  return tx


def memory_momentum_schedule(config, steps_per_epoch: int):
  """step -> memory momentum; `config.memory_momentum` is the initial value and
  `config.memory_momentum_steps` a sequence of (epoch, value) changes."""
  changes = sorted(tuple(c) for c in config.memory_momentum_steps)
  boundaries = jnp.asarray([int(e * steps_per_epoch) for e, _ in changes], jnp.int32)
  values = jnp.asarray([config.memory_momentum] + [v for _, v in changes], jnp.float32)

  def schedule(step):
    return values[jnp.searchsorted(boundaries, step, side='right')]

  return schedule


def learning_rate_at(config, steps_per_epoch: int, step) -> float:
  """The learning rate in force at batch `step` (for logging)."""
  updates = int(step) // config.grad_accum_steps
  sched = learning_rate_schedule(config, max(steps_per_epoch // config.grad_accum_steps, 1))
  return float(np.asarray(sched(updates)))
