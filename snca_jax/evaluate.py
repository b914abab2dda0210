"""Embedding a dataset with a trained state, and kNN accuracy (docs/METHOD.md, "kNN evaluation")."""

import functools
import os

import jax
import ml_collections
import numpy as np

from snca_jax import checkpoint
from snca_jax import distributed
from snca_jax import knn
from snca_jax import mesh as mesh_lib
from snca_jax import models
from snca_jax import state as state_lib
from snca_jax import step
from snca_jax.data import pipeline
from snca_jax.errors import CheckpointError, ConfigError


def transform(config, kind: str) -> pipeline.Transform:
  d = config.data
  return pipeline.Transform(kind, d.image_size, d.channels, d.get('reduced_decode', True))


@functools.lru_cache(maxsize=None)
def _embed_fn(model, mesh, mean, std):
  def embed(variables, images):
    step.TRACES['embed'] += 1                 # Python runs this only while tracing
    return model.apply(variables, models.normalize_images(images, mean, std), train=False)
  return jax.jit(embed, in_shardings=(mesh_lib.replicated(mesh), mesh_lib.rows(mesh)),
                 out_shardings=mesh_lib.rows(mesh))


def embed_dataset(variables, model, source, *, data_config, transform, mesh, batch_size: int):
  """(features (M, D), labels (M,), positions (M,)) of every record of `source`, in order,
  embedded by the evaluation-mode network with `variables` ({'params', 'batch_stats'}).
  `batch_size` is global; images are read and transformed by the training pipeline's threads
  and worker processes (`data_config.num_threads`, `worker_count`)."""
  fn = _embed_fn(model, mesh, tuple(data_config.mean), tuple(data_config.std))
  rows = mesh_lib.rows(mesh)
  batch_size = mesh_lib.padded_rows(batch_size, mesh)      # a multiple of the device count
  out = {'features': [], 'label': [], 'index': [], 'mask': []}
  for batch in pipeline.eval_batches(source, global_batch_size=batch_size, transform=transform,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count(),
                                     num_threads=data_config.num_threads,
                                     worker_count=data_config.worker_count):
    # Every field becomes a global array the same way, so that features, labels, positions and
    # masks come back in one order, the mesh's, whatever order its devices take the processes.
    glob = {k: jax.make_array_from_process_local_data(rows, batch[k])
            for k in ('image', 'label', 'index', 'mask')}
    out['features'].append(distributed.to_host(fn(variables, glob.pop('image'))))
    for key, value in glob.items():
      out[key].append(distributed.to_host(value))
  out = {k: np.concatenate(v) for k, v in out.items()}
  mask = out['mask']
  order = np.argsort(out['index'][mask], kind='stable')    # record order, whatever the mesh's
  return out['features'][mask][order], out['label'][mask][order], out['index'][mask][order]


def knn_accuracy(queries, query_labels, bank, bank_labels, *, k, sigma, num_classes, mesh,
                 ks=(1, 5), batch_size=1024):
  """{top-k accuracy} of weighted kNN classification of `queries` against the bank."""
  scores = knn.knn_classify(queries, bank, bank_labels, k=k, sigma=sigma,
                            num_classes=num_classes, mesh=mesh, batch_size=batch_size)
  return knn.top_k_accuracy(scores, query_labels, ks=ks)


class KnnEvaluator:
  """Weighted kNN of a run's evaluation split (docs/METHOD.md): built once from the config,
  `run(variables, bank, bank_labels)` embeds the split with the evaluation transform and
  returns {'top1': .., 'top5': ..} against that database. The per-epoch monitor (k=1, the
  original's 1-NN; or the config's k) and eval_knn.py are both this.

  `embed(variables, split)` gives (features, labels, record positions) of any split, in
  order: what `--recompute` searches instead of the bank.
  """

  def __init__(self, config, mesh, *, k=None, sigma=None, batch_size=None, ks=(1, 5)):
    self.config, self.mesh, self.ks = config, mesh, ks
    self.k = int(k or config.knn.k)
    self.sigma = float(sigma or config.knn.sigma or config.temperature)
    self.batch_size = int(batch_size or config.knn.batch_size)
    self.model = models.model_from_config(config)
    self.transform = transform(config, config.data.eval_augment)
    self._sources = {}

  def source(self, split):
    if split not in self._sources:
      self._sources[split] = pipeline.open_source(self.config.data, split)
    return self._sources[split]

  def embed(self, variables, split):
    return embed_dataset(variables, self.model, self.source(split),
                         data_config=self.config.data, transform=self.transform,
                         mesh=self.mesh, batch_size=self.batch_size)

  def run(self, variables, bank, bank_labels) -> dict:
    queries, labels, _ = self.embed(variables, self.config.data.eval_split)
    acc = knn_accuracy(queries, labels, bank, bank_labels, k=self.k, sigma=self.sigma,
                       num_classes=self.config.data.num_classes, mesh=self.mesh,
                       ks=self.ks, batch_size=self.batch_size)
    return {f'top{k}': v for k, v in acc.items()} | {'num_queries': len(queries)}


def evaluate_checkpoint(path: str, *, k=None, sigma=None, recompute=False, batch_size=None,
                        data_overrides=None):
  """Weighted kNN top-1 / top-5 of the evaluation split for the checkpoint at `path` (a
  workdir, its checkpoints directory, or one step's directory; the latest step by default).

  The database is the checkpoint's bank, or with `recompute` the training set re-embedded with
  the evaluation transform. k and sigma default to the run's config (sigma: its temperature).
  """
  for name, value, ok in (('k', k, lambda v: v >= 1), ('sigma', sigma, lambda v: v > 0),
                          ('batch_size', batch_size, lambda v: v >= 1)):
    if value is not None and not ok(value):
      raise ConfigError(f'--{name}={value} cannot work: give a k and batch size of at least 1 '
                        f'and a sigma above 0')
  ckpt_dir, step = checkpoint.locate(path)
  if not os.path.isdir(ckpt_dir):
    raise CheckpointError(f'no checkpoint at {path}: pass the --workdir of a training run, '
                          f'or --checkpoint with a checkpoint directory')
  mngr = checkpoint.manager(ckpt_dir, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'{ckpt_dir} holds no checkpoint: train first (python train.py '
                          f'--workdir ...) or point --checkpoint at a step directory')
  where = os.path.join(ckpt_dir, str(step))
  mesh = mesh_lib.make_mesh()
  try:
    config = ml_collections.ConfigDict(checkpoint.restore_config(mngr, step))
    state = state_lib.restore_as_saved(mngr, step, mesh)
  except Exception as e:
    raise CheckpointError(f'checkpoint {where} cannot be read ({type(e).__name__}: '
                          f'{str(e)[:200]}): evaluate an earlier step with --checkpoint') from e
  for key, value in (data_overrides or {}).items():
    if value:
      config.data[key] = value
  evaluator = KnnEvaluator(config, mesh, k=k, sigma=sigma, batch_size=batch_size)
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  if recompute:
    bank, bank_labels, _ = evaluator.embed(variables, config.data.train_split)
  else:
    bank, bank_labels = state['bank'], state['bank_labels']
  result = evaluator.run(variables, bank, bank_labels)
  return {'step': int(step), 'k': evaluator.k, 'sigma': evaluator.sigma,
          'database': 'recomputed' if recompute else 'bank', **result}
