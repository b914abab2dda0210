"""The optimizer and the two schedules of the original's recipes (docs/METHOD.md).

- SGD with Nesterov momentum and coupled weight decay, as torch.optim.SGD: the decay is added to
  the gradient before the momentum, and applies to every parameter.
- Learning rate: `lr * lr_decay ** (epoch // lr_step_epochs)` (the original's), evaluated per
  optimizer update; or, with `lr_schedule = 'cosine'`, a cosine decay from `lr` to 0 over the run.
- Gradient accumulation (the original's `--iter-size`): `optax.MultiSteps` averages the gradients
  of `grad_accum_steps` consecutive batches before one update. Batch statistics and the memory
  bank are updated on every batch, as in the original.
- Memory momentum: piecewise constant in the epoch, e.g. 0.5, 0.8 from epoch 80, 0.9 from 120.
"""

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


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """`steps_per_epoch` counts batches; each optimizer update takes `grad_accum_steps` of them."""
  accum = config.grad_accum_steps
  schedule = learning_rate_schedule(config, max(steps_per_epoch // accum, 1))
  tx = optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
  )
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum)
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
