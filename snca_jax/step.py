"""The training step: a pure, jitted `train_step(state, batch) -> (state, metrics)`.

Each step normalises the batch's uint8 images on the device, embeds them, takes the NCA loss
against the bank as it was before the step, updates the network (SGD, Nesterov, weight decay;
accumulated over `grad_accum_steps` batches), and writes the batch's fresh embeddings into its
bank rows with the memory momentum (docs/METHOD.md), the loss and the bank update in one pass
of the NCA kernel. The state is donated: the bank is updated in place. With
`loss='softmax'` (the paper's baseline) the loss is the cross-entropy of a linear classifier
on the embedding layer, and the bank is left as it is.

This module needs no data pipeline, so that benchmarks can build the step alone.
"""

import jax
import optax

from snca_jax import distributed
from snca_jax import mesh as mesh_lib
from snca_jax import models
from snca_jax import nca
from snca_jax import optim
from snca_jax import schema
from snca_jax import state as state_lib

BATCH_FIELDS = ('image', 'index', 'label')


def make_loss_and_grads(model, config, *, steps_per_epoch: int, mesh):
  """`loss_and_grads(state, batch) -> (bank, batch_stats, grads, metrics)`: the bank after the
  step, the new BatchNorm statistics, the gradient of the loss (against the bank before the
  step) with respect to the parameters, before the optimizer sees it, and the metrics
  {'loss', 'memory_momentum'}. The part of `train_step` that reads the batch; tests compare it
  across meshes and processes."""
  memory_momentum = optim.memory_momentum_schedule(config, steps_per_epoch)
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  softmax = schema.is_softmax(config)

  def loss_and_grads(state: state_lib.TrainState, batch):
    momentum = memory_momentum(state.step)
    images = models.normalize_images(batch['image'], mean, std)   # uint8 -> float, on device

    def loss_fn(params):
      features, updates = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
          mutable=['batch_stats', 'intermediates'])
      if softmax:          # the baseline: cross-entropy of the classifier; the bank stays
        logits = updates['intermediates']['logits'][0]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
        return loss, (state.bank, updates['batch_stats'])
      # The loss against the bank before this step, and the bank after it, in one pass.
      loss, bank = nca.nca_step(
          features, batch['index'], state.bank, state.bank_labels, momentum,
          temperature=config.temperature, margin=config.margin, mesh=mesh,
          chunk_size=config.nca_chunk_size or None,
          matmul_dtype=models.DTYPES[config.nca_matmul_dtype], kernel=config.nca_kernel)
      return loss, (bank, updates['batch_stats'])

    (loss, (bank, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    return bank, batch_stats, grads, {'loss': loss, 'memory_momentum': momentum}

  return loss_and_grads


def make_train_step(model, tx, config, *, steps_per_epoch: int, shardings, mesh):
  """The jitted step, with the state donated and every sharding stated."""
  loss_and_grads = make_loss_and_grads(model, config, steps_per_epoch=steps_per_epoch,
                                       mesh=mesh)

  def train_step(state: state_lib.TrainState, batch):
    bank, batch_stats, grads, metrics = loss_and_grads(state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, bank=bank)
    return new_state, metrics

  rows = mesh_lib.row_sharding(mesh)
  batch_shardings = {k: rows for k in BATCH_FIELDS}
  return jax.jit(train_step, in_shardings=(shardings, batch_shardings),
                 out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)


def device_batch(batch, mesh):
  """This process's share of a global batch -> global arrays sharded over 'data'."""
  return distributed.put_process_local(batch, mesh_lib.row_sharding(mesh), BATCH_FIELDS)
