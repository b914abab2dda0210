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


def class_index(config, bank_labels, mesh):
  """The NCA kernel's class index (`nca.class_index`) for this run, or None. `nca_class_index`
  'auto' makes one where it pays: the NCA loss and no class holding more than
  1/`nca.CLASS_INDEX_MIN_CLASSES` of the bank's rows (ImageNet, CIFAR-100; not Fashion-MNIST or
  CIFAR-10, whose ten classes make each example's class a tenth of the bank). Either kernel
  takes it (the Pallas one then folds the other-class rows alone)."""
  if config.nca_class_index == 'off' or schema.is_softmax(config):
    return None
  if config.nca_class_index == 'auto' and not nca.class_index_pays(bank_labels):
    return None
  return nca.class_index(bank_labels, mesh)


def nca_kernel(config, mesh) -> str:
  """The run's NCA kernel: `nca_kernel`, where it is 'auto' the Pallas kernel on GPUs with
  bfloat16 products and XLA's elsewhere. On an H200 (benchmarks/nca_step.py, BENCHMARKS.md) the
  Pallas kernel took 2.3 and 3.2 ms a step in two runs against XLA's 4.0 and 4.6, with the same
  loss and gradient to bfloat16's rounding; in float32 it is slower than XLA's (three TF32
  products for each), and on a CPU Pallas only interprets it."""
  if config.nca_kernel != 'auto':
    return config.nca_kernel
  gpu = mesh.devices.flat[0].platform == 'gpu'
  return 'pallas' if gpu and config.nca_matmul_dtype == 'bfloat16' else 'xla'


def make_loss_and_grads(model, config, *, steps_per_epoch: int, mesh):
  """`loss_and_grads(state, batch, class_index=None) -> (bank, batch_stats, grads, metrics)`:
  the bank after the step, the new BatchNorm statistics, the gradient of the loss (against the
  bank before the step) with respect to the parameters, before the optimizer sees it (for a
  float16 network, of the loss times its scale: optim.loss_scaled), and the metrics {'loss',
  'memory_momentum'} (and 'loss_scale'). The part of `train_step` that reads the batch; tests
  compare it across meshes and processes."""
  memory_momentum = optim.memory_momentum_schedule(config, steps_per_epoch)
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  kernel = nca_kernel(config, mesh)
  softmax = schema.is_softmax(config)

  def loss_and_grads(state: state_lib.TrainState, batch, class_index=None):
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
          matmul_dtype=models.DTYPES[config.nca_matmul_dtype], kernel=kernel,
          class_index=class_index)
      return loss, (bank, updates['batch_stats'])

    scale = optim.loss_scale(state.opt_state)       # float16 networks (optim.loss_scaled)

    def objective(params):     # what is differentiated: the loss, times the scale if any
      loss, aux = loss_fn(params)
      return (loss if scale is None else loss * scale), (loss, aux)

    (_, (loss, (bank, batch_stats))), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    metrics = {'loss': loss, 'memory_momentum': momentum}
    if scale is not None:
      metrics['loss_scale'] = scale
    return bank, batch_stats, grads, metrics

  return loss_and_grads


def make_train_step(model, tx, config, *, steps_per_epoch: int, shardings, mesh,
                    class_index=None):
  """The jitted step, with the state donated and every sharding stated: `train_step(state,
  batch) -> (state, metrics)`. `class_index` (`class_index` above, made from the state's
  labels) goes to the NCA kernel."""
  loss_and_grads = make_loss_and_grads(model, config, steps_per_epoch=steps_per_epoch,
                                       mesh=mesh)

  def train_step(state: state_lib.TrainState, batch, class_index):
    bank, batch_stats, grads, metrics = loss_and_grads(state, batch, class_index)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, bank=bank)
    return new_state, metrics

  rows = mesh_lib.row_sharding(mesh)
  batch_shardings = {k: rows for k in BATCH_FIELDS}
  index_shardings = jax.tree.map(lambda _: rows, class_index)
  step = jax.jit(train_step, in_shardings=(shardings, batch_shardings, index_shardings),
                 out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
  return _Bound(step, class_index)


class _Bound:
  """A jitted `f(state, batch, class_index)` (or its lowered or compiled form) with the index
  bound: called, lowered and compiled as `(state, batch)`. The index is an argument, not a
  constant folded into the program (XLA would embed its N' entries)."""

  def __init__(self, f, class_index):
    self._f, self._index = f, class_index

  def __call__(self, state, batch):
    return self._f(state, batch, self._index)

  def lower(self, state, batch):
    return _Bound(self._f.lower(state, batch, self._index), self._index)

  def compile(self):
    return _Bound(self._f.compile(), self._index)

  def __getattr__(self, name):          # as_text, cost_analysis, memory_analysis, ...
    return getattr(self._f, name)


def device_batch(batch, mesh):
  """This process's share of a global batch -> global arrays sharded over 'data'."""
  return distributed.put_process_local(batch, mesh_lib.row_sharding(mesh), BATCH_FIELDS)
