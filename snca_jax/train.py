"""Training: the loop around the jitted `train_step(state, batch) -> (state, metrics)` of
`step.py`.

Batches are read and transformed on the host, placed on the devices one step ahead, and fed to
the step, whose metrics are read one step late so that the host never waits for the device
within an epoch. After each epoch the loop measures kNN accuracy of the validation set against
the bank (docs/METHOD.md) and checkpoints the whole state; a rerun of the same command resumes
from the latest checkpoint at the exact batch where it stopped. A stop (SIGTERM) at an epoch's
last step saves before that epoch's evaluation, which the rerun then does first, once.
"""

import itertools
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from snca_jax import checkpoint
from snca_jax import evaluators
from snca_jax import mesh as mesh_lib
from snca_jax import metrics as metrics_lib
from snca_jax import models
from snca_jax import optim
from snca_jax import schema
from snca_jax import state as state_lib
from snca_jax import step as step_lib
from snca_jax import stop as stop_lib
from snca_jax import validate
from snca_jax.data import pipeline
from snca_jax.data import sources
from snca_jax.data import transforms
from snca_jax.errors import CheckpointError, ConfigError, DataError, TrainingError
from snca_jax.lookahead import look_ahead

log = logging.getLogger('snca_jax')


def prefetch_to_device(batches, mesh, size: int = 2):
  """Host batches -> device batches, `size - 1` placed ahead of the one being consumed, so that
  the host-to-device copy of the next batch overlaps the current step."""
  return look_ahead((step_lib.device_batch(batch, mesh) for batch in batches), size)


def check_labels(labels, num_classes: int, what: str):
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)][0]
    raise DataError(
        f'{what} has label {int(bad)} outside [0, {num_classes}): set '
        f'--config.data.num_classes to the number of classes of the dataset')


def _check_config(config, mesh):
  n = mesh.shape[mesh_lib.DATA]
  if config.batch_size % n != 0:
    raise ConfigError(f'batch_size {config.batch_size} is not divisible by the {n} devices: '
                     f'choose a multiple of {n}')


def _check_workdir(workdir: str):
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise CheckpointError(f'workdir {workdir} is not writable ({e.strerror}): choose another '
                          f'--workdir') from e


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains `config` into `workdir` (resuming from its latest checkpoint); returns the state.

  The stop handler is in place before any long work: a signal while the data is read or
  prepared raises `Interrupted` at once (nothing half-written is left); one while the state or
  the step is being compiled stops the run cleanly, before its first step or after it, instead
  of a KeyboardInterrupt unwinding through XLA (a segmentation fault)."""
  validate.check_config(config)          # a second, before anything else
  stop = stop_lib.StopRequest(check_every=config.stop_check_steps)
  try:
    return _train_and_evaluate(config, workdir, stop)
  finally:
    stop.close()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        stop: stop_lib.StopRequest):
  _check_workdir(workdir)
  mesh = mesh_lib.make_mesh()
  _check_config(config, mesh)
  pid, pcount = jax.process_index(), jax.process_count()
  with stop.interruptible():
    train_source = sources.open_source(config.data, config.data.train_split)
    sources.open_source(config.data, config.data.eval_split)    # present before any step
  config = _with_num_classes(config, train_source)
  num_examples = len(train_source)
  steps_per_epoch = num_examples // config.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f'batch_size {config.batch_size} exceeds the {num_examples} training '
                      f'examples')
  total_steps = steps_per_epoch * config.num_epochs

  model = models.model_from_config(config, num_devices=mesh.size)
  tx = optim.make_optimizer(config, steps_per_epoch)
  abstract = state_lib.abstract_train_state(
      model, tx, image_shape=sources.image_shape(config.data), low_dim=models.embedding_dim(config),
      num_examples=num_examples, mesh=mesh)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  mngr = checkpoint.manager(checkpoint.checkpoint_dir(workdir),
                            max_to_keep=config.checkpoint_max_to_keep)
  latest = mngr.latest_step()
  if latest is not None:
    state = _resume(mngr, latest, abstract, config=config, num_examples=num_examples, tx=tx,
                    steps_per_epoch=steps_per_epoch)
    log.info('resumed from %s at step %d', checkpoint.checkpoint_dir(workdir), latest)
  else:
    bank_labels = sources.read_labels(train_source)
    check_labels(bank_labels, config.data.num_classes, f'{config.data.name} train split')
    state = state_lib.create_train_state(
        model, tx, key=jax.random.key(config.seed), bank_labels=bank_labels,
        image_shape=sources.image_shape(config.data), low_dim=models.embedding_dim(config),
        mesh=mesh)

  train_step = step_lib.make_train_step(
      model, tx, config, steps_per_epoch=steps_per_epoch, shardings=shardings, mesh=mesh,
      class_index=step_lib.class_index(config, state.bank_labels, mesh))
  if stop.stopped_before_first_step('resume' if latest is not None else 'train'):
    return state                      # a signal while the state was built or restored
  writer = metrics_lib.MetricWriter(workdir)
  facts = {'num_examples': num_examples}
  train_transform = transforms.from_config(config.data, config.data.train_augment)
  # The per-epoch monitor against the bank: the original's 1-NN (main.py), or weighted kNN with
  # the config's k (cifar.py); the best epoch's state is kept beside the latest.
  one_nn = config.monitor == '1nn'
  softmax = schema.is_softmax(config)
  settings = evaluators.KnnSettings.from_config(config, k=1 if one_nn else None)
  monitor = evaluators.KnnEvaluator(config, settings, ks=(1,) if one_nn else (1, 5))
  embedder = evaluators.Embedder(config, mesh)
  monitor_name = 'val/nn_top1' if one_nn else f'val/knn{settings.k}_top1'
  best = checkpoint.BestCheckpoint(workdir) if config.keep_best else None
  step = int(state.step)

  def evaluate_epoch(state, step: int, save: bool) -> float:
    """The monitor after the epoch that ends at `step`: its metric and line, the checkpoint
    (`save`; its config records that the epoch was evaluated), the offer to best/."""
    epoch = step // steps_per_epoch
    embeddings = embedder.of({'params': state.params, 'batch_stats': state.batch_stats})
    if softmax:      # no bank: the training set embedded again is the database
      train = embeddings.get(config.data.train_split)
      database = evaluators.Database(train.features, train.labels)
    else:
      database = evaluators.Database(state.bank, state.bank_labels)
    result = monitor.run(embeddings, database)
    acc = result['top1']
    writer.write(step, {monitor_name: acc, 'epoch': epoch})
    evaluated = dict(facts, epoch_evaluated=True)
    if save:
      checkpoint.save(mngr, step, state, config, evaluated)
    improved = best is not None and best.offer(step, state, acc, config, evaluated)
    if pid == 0:
      what = '1-NN' if one_nn else f'weighted {settings.k}-NN'
      print(f'epoch {epoch}/{config.num_epochs}: {what} top-1 {100 * acc:.2f}% '
            f'({result["num_queries"]} {config.data.eval_split} images against the '
            f'{"training set" if softmax else "bank"})'
            f'{"; best so far, kept in " + os.path.join(workdir, "best") if improved else ""}',
            flush=True)
    return acc

  owed = latest is not None and _evaluation_owed(mngr, latest, step, steps_per_epoch, workdir)
  try:
    if owed:     # stopped at the end of an epoch before its evaluation: that comes first
      acc = evaluate_epoch(state, step, save=False)
      if best is not None:
        best.close()               # best/ written before the evaluation counts as done
      if pid == 0:
        _record_evaluation(workdir, step, monitor_name, acc)
    # One iterator for the rest of the run: its readers start once, and read ahead into the
    # next epoch while this one is evaluated.
    batches = pipeline.run_batches(
        train_source, num_epochs=config.num_epochs, start_step=step,
        global_batch_size=config.batch_size, seed=config.seed, transform=train_transform,
        process_index=pid, process_count=pcount, num_threads=config.data.num_threads,
        worker_count=config.data.worker_count) if step < total_steps else iter(())
    while step < total_steps:
      epoch, start = divmod(step, steps_per_epoch)
      epoch_batches = itertools.islice(batches, steps_per_epoch - start)
      bar = tqdm.tqdm(total=steps_per_epoch, initial=start, disable=pid != 0,
                      desc=f'epoch {epoch + 1}/{config.num_epochs}', unit='batch',
                      dynamic_ncols=True)
      try:      # closed on every path: no stale bar after an error's line
        pending, t0, n0 = None, time.time(), step
        for batch in prefetch_to_device(epoch_batches, mesh):
          state, metrics = train_step(state, batch)
          if pending is not None:   # read the previous step's metrics: the device is busy
            _report(pending, bar, writer, config, steps_per_epoch, t0, n0)
          pending = (step, metrics)
          step += 1
          if stop.requested(step):
            break
        if pending is not None:     # the last step's loss is checked before any save
          _report(pending, bar, writer, config, steps_per_epoch, t0, n0)
      finally:
        bar.close()
      if stop.requested(step):     # the epoch's evaluation, if it ended, is owed (resume)
        checkpoint.save(mngr, step, state, config, dict(facts, epoch_evaluated=False))
        mngr.wait_until_finished()
        if pid == 0:
          print(f'train.py: stopped by {signal.Signals(stop.signum).name} at step {step}; '
                f'checkpoint written to {checkpoint.checkpoint_dir(workdir)}; run the same '
                f'command to resume', flush=True)
        return state
      evaluate_epoch(state, step, save=True)
  finally:               # the stop handler is closed by train_and_evaluate
    _finish(mngr, best, writer)
  return state


def _with_num_classes(config, train_source):
  """The run's config with `data.num_classes` resolved: 0 means as many as the dataset
  declares. A copy: the caller's config is left as it was given."""
  if config.data.num_classes:
    return config
  num_classes = sources.num_classes(train_source) or 0
  if not num_classes:
    raise ConfigError(f'{config.data.name} does not say how many classes it has: set '
                      f'--config.data.num_classes')
  config = config.copy_and_resolve_references()
  config.data.num_classes = num_classes
  return config


def _resume(mngr, step: int, abstract, *, config, num_examples: int, tx,
            steps_per_epoch: int) -> state_lib.TrainState:
  """The state of the checkpoint at `step`, checked against `config` and the training set's
  size, onto the mesh of `abstract`. A converted checkpoint (the original's weights and bank,
  without an optimizer state of this run's) starts a fresh optimizer state at its epoch."""
  facts = checkpoint.check_resumable(mngr, step, config=config, num_examples=num_examples)
  if 'converted' not in facts:
    return checkpoint.restore_train_state(mngr, step, abstract, num_examples=num_examples)
  with checkpoint.reading(os.path.join(str(mngr.directory), str(step))):
    arrays = checkpoint.restore_as_saved(mngr, step, abstract.bank.sharding.mesh)
    return state_lib.from_arrays(
        params=arrays['params'], batch_stats=arrays['batch_stats'],
        bank=arrays['bank'][:num_examples], bank_labels=arrays['bank_labels'][:num_examples],
        tx=tx, mesh=abstract.bank.sharding.mesh,
        step=int(facts['converted']['epoch']) * steps_per_epoch)


EVALUATED = 'evaluated.json'    # the last epoch evaluated after a stop at its end (resume)


def _evaluation_owed(mngr, latest: int, step: int, steps_per_epoch: int, workdir: str) -> bool:
  """Whether the checkpoint at `latest` (step `step`) ends an epoch whose evaluation was never
  done: a stop at the epoch's last step saves before it (`epoch_evaluated` False in the
  checkpoint's config) and leaves it to the next run, which records it in evaluated.json.
  Checkpoints of other versions or converted ones say nothing: not owed. Every process agrees."""
  owed = False
  if step > 0 and step % steps_per_epoch == 0:
    _, saved = checkpoint.read_config(mngr, latest)
    if saved.get('epoch_evaluated', True) is False:
      try:
        with open(os.path.join(workdir, EVALUATED)) as f:
          owed = int(json.load(f)['step']) != step
      except (OSError, ValueError, KeyError, TypeError):
        owed = True
  if jax.process_count() > 1:
    owed = bool(multihost_utils.broadcast_one_to_all(np.int32(owed)))
  return owed


def _record_evaluation(workdir: str, step: int, name: str, value: float):
  """evaluated.json, written to a temporary file and renamed: the owed evaluation is done."""
  path = os.path.join(workdir, EVALUATED)
  tmp = f'{path}.{os.getpid()}.tmp'
  try:
    with open(tmp, 'w') as f:
      json.dump({'step': int(step), name: float(value)}, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise CheckpointError(f'could not write {path} ({e.strerror}): free space or choose '
                          f'another --workdir') from e


def _finish(mngr, best, writer):
  """Waits for the saves in flight and closes the metric files, each whatever the others do;
  the first failure is raised in one line, unless an error is already on its way out (a
  failed save raises again at every wait, and a full disk fails the metric files' flush too:
  they would only hide it)."""
  failing = sys.exc_info()[1] is not None
  error = None
  for close in (mngr.wait_until_finished, best.close if best is not None else None,
                writer.close):
    try:
      if close is not None:
        close()
    except CheckpointError as e:
      error = error or e
    except OSError as e:
      error = error or CheckpointError(
          f'could not write the metrics of {os.path.dirname(str(mngr.directory))} ({e.strerror}): '
          f'free space or choose another --workdir')
  if error is not None and not failing:
    raise error


def _report(pending, bar, writer, config, steps_per_epoch, t0, n0):
  step, metrics = pending
  loss = float(metrics['loss'])
  if not math.isfinite(loss):
    raise TrainingError(f'the loss became {loss} at step {step}; the last good checkpoint is '
                        f'kept: lower the learning rate or raise the temperature')
  done = step + 1 - n0
  rate = done * config.batch_size / max(time.time() - t0, 1e-9)
  bar.set_postfix(loss=f'{loss:.4f}', img_s=f'{rate:.0f}', refresh=False)
  bar.update(1)
  if (step + 1) % config.log_every_steps == 0:
    writer.write(step + 1, {
        'train/loss': loss,
        'train/memory_momentum': float(metrics['memory_momentum']),
        'train/learning_rate': optim.learning_rate_at(config, steps_per_epoch, step),
        'train/images_per_second': rate,
        **({'train/loss_scale': float(metrics['loss_scale'])} if 'loss_scale' in metrics else {}),
    })
