"""Embedding a dataset with a trained state, and kNN accuracy (SPEC.md, "kNN evaluation")."""

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
from snca_jax.data import pipeline
from snca_jax.errors import CheckpointError


def transform(config, kind: str) -> pipeline.Transform:
  d = config.data
  return pipeline.Transform(kind, d.image_size, d.channels, d.get('reduced_decode', True))


@functools.lru_cache(maxsize=None)
def _embed_fn(model, mesh, mean, std):
  def embed(variables, images):
    return model.apply(variables, pipeline.normalize(images, mean, std), train=False)
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
    images = jax.make_array_from_process_local_data(rows, batch['image'])
    out['features'].append(distributed.to_host(fn(variables, images)))
    for key in ('label', 'index', 'mask'):   # every process's share, for every process
      out[key].append(distributed.gather_host(batch[key]))
  out = {k: np.concatenate(v) for k, v in out.items()}
  mask = out['mask']
  return out['features'][mask], out['label'][mask], out['index'][mask]


def knn_accuracy(queries, query_labels, bank, bank_labels, *, k, sigma, num_classes, mesh,
                 ks=(1, 5), batch_size=1024):
  """{top-k accuracy} of weighted kNN classification of `queries` against the bank."""
  scores = knn.knn_classify(queries, bank, bank_labels, k=k, sigma=sigma,
                            num_classes=num_classes, mesh=mesh, batch_size=batch_size)
  return knn.top_k_accuracy(scores, query_labels, ks=ks)


def evaluate_checkpoint(path: str, *, k=None, sigma=None, recompute=False, batch_size=None,
                        data_overrides=None):
  """Weighted kNN top-1 / top-5 of the evaluation split for the checkpoint at `path` (a
  workdir, its checkpoints directory, or one step's directory; the latest step by default).

  The database is the checkpoint's bank, or with `recompute` the training set re-embedded with
  the evaluation transform. k and sigma default to the run's config (sigma: its temperature).
  """
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
    state = checkpoint.restore_as_saved(mngr, step, mesh)
  except Exception as e:
    raise CheckpointError(f'checkpoint {where} cannot be read ({type(e).__name__}: '
                          f'{str(e)[:200]}): evaluate an earlier step with --checkpoint') from e
  for key, value in (data_overrides or {}).items():
    if value:
      config.data[key] = value
  k = k or config.knn.k
  sigma = sigma or config.knn.sigma or config.temperature
  batch_size = batch_size or config.knn.batch_size
  model = models.model_from_config(config)
  params = {'params': state['params'], 'batch_stats': state['batch_stats']}
  eval_transform = transform(config, config.data.eval_augment)
  queries, labels, _ = embed_dataset(params, model,
                                     pipeline.open_source(config.data, config.data.eval_split),
                                     data_config=config.data, transform=eval_transform,
                                     mesh=mesh, batch_size=batch_size)
  if recompute:
    bank, bank_labels, _ = embed_dataset(
        params, model, pipeline.open_source(config.data, config.data.train_split),
        data_config=config.data, transform=eval_transform, mesh=mesh, batch_size=batch_size)
  else:
    bank, bank_labels = state['bank'], state['bank_labels']
  acc = knn_accuracy(queries, labels, bank, bank_labels, k=k, sigma=sigma,
                     num_classes=config.data.num_classes, mesh=mesh, batch_size=batch_size)
  return {'step': int(step), 'k': int(k), 'sigma': float(sigma),
          'database': 'recomputed' if recompute else 'bank', 'num_queries': int(len(queries)),
          'top1': acc[1], 'top5': acc[5]}
