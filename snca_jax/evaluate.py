"""Embedding a dataset with a trained state, and kNN accuracy (SPEC.md, "kNN evaluation")."""

import functools
import os

import jax
import ml_collections
import numpy as np

from snca_jax import checkpoint
from snca_jax import knn
from snca_jax import mesh as mesh_lib
from snca_jax import models
from snca_jax.data import pipeline


def transform(config, kind: str) -> pipeline.Transform:
  d = config.data
  return pipeline.Transform(kind, tuple(d.mean), tuple(d.std), d.image_size)


@functools.lru_cache(maxsize=None)
def _embed_fn(model, mesh):
  def embed(variables, images):
    return model.apply(variables, images, train=False)
  return jax.jit(embed, in_shardings=(mesh_lib.replicated(mesh), mesh_lib.rows(mesh)),
                 out_shardings=mesh_lib.rows(mesh))


def embed_dataset(variables, model, source, *, transform, mesh, batch_size: int):
  """(features (M, D), labels (M,), positions (M,)) of every record of `source`, in order,
  embedded by the evaluation-mode network with `variables` ({'params', 'batch_stats'}).
  `batch_size` is global."""
  fn = _embed_fn(model, mesh)
  feats, labels, positions = [], [], []
  for batch in pipeline.eval_batches(source, global_batch_size=batch_size, transform=transform,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    images = jax.make_array_from_process_local_data(mesh_lib.rows(mesh), batch['image'])
    f = np.asarray(fn(variables, images))
    mask = batch['mask']
    feats.append(f[mask])
    labels.append(batch['label'][mask])
    positions.append(batch['index'][mask])
  return np.concatenate(feats), np.concatenate(labels), np.concatenate(positions)


def knn_accuracy(queries, query_labels, bank, bank_labels, *, k, sigma, num_classes, mesh,
                 ks=(1, 5), batch_size=1024):
  """{top-k accuracy} of weighted kNN classification of `queries` against the bank."""
  scores = knn.knn_classify(queries, bank, bank_labels, k=k, sigma=sigma,
                            num_classes=num_classes, mesh=mesh, batch_size=batch_size)
  return knn.top_k_accuracy(scores, query_labels, ks=ks)


class EvalError(Exception):
  """Evaluation cannot run; the message says why."""


def _restore_for_eval(mngr, step: int, mesh):
  """The checkpointed state at `step` as a dict, whatever mesh wrote it: the bank sharded by
  rows where its rows split evenly over this mesh, replicated otherwise."""
  tree = mngr.item_metadata(step)['state'].tree
  n_dev = mesh.shape[mesh_lib.DATA]

  def target(path, meta):
    top = path[0].key
    split = top in ('bank', 'bank_labels') and meta.shape[0] % n_dev == 0
    sharding = mesh_lib.rows(mesh) if split else mesh_lib.replicated(mesh)
    return jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding)

  abstract = jax.tree_util.tree_map_with_path(target, tree)
  return checkpoint.restore_state(mngr, step, abstract)


def evaluate_checkpoint(path: str, *, k=None, sigma=None, recompute=False, batch_size=None,
                        data_overrides=None):
  """Weighted kNN top-1 / top-5 of the evaluation split for the checkpoint at `path` (a
  workdir, its checkpoints directory, or one step's directory; the latest step by default).

  The database is the checkpoint's bank, or with `recompute` the training set re-embedded with
  the evaluation transform. k and sigma default to the run's config (sigma: its temperature).
  """
  ckpt_dir, step = checkpoint.locate(path)
  if not os.path.isdir(ckpt_dir):
    raise EvalError(f'no checkpoint at {path}: pass the --workdir of a training run, or '
                    f'--checkpoint with a checkpoint directory')
  mngr = checkpoint.manager(ckpt_dir, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise EvalError(f'{ckpt_dir} holds no checkpoint: train first (python train.py --workdir '
                    f'...) or point --checkpoint at a step directory')
  config = ml_collections.ConfigDict(checkpoint.restore_config(mngr, step))
  for key, value in (data_overrides or {}).items():
    if value:
      config.data[key] = value
  k = k or config.knn.k
  sigma = sigma or config.knn.sigma or config.temperature
  batch_size = batch_size or config.knn.batch_size
  mesh = mesh_lib.make_mesh()
  model = models.model_from_config(config)
  state = _restore_for_eval(mngr, step, mesh)
  params = {'params': state['params'], 'batch_stats': state['batch_stats']}
  eval_transform = transform(config, config.data.eval_augment)
  queries, labels, _ = embed_dataset(params, model,
                                     pipeline.open_source(config.data, config.data.eval_split),
                                     transform=eval_transform, mesh=mesh, batch_size=batch_size)
  if recompute:
    bank, bank_labels, _ = embed_dataset(
        params, model, pipeline.open_source(config.data, config.data.train_split),
        transform=eval_transform, mesh=mesh, batch_size=batch_size)
  else:
    bank, bank_labels = state['bank'], state['bank_labels']
  acc = knn_accuracy(queries, labels, bank, bank_labels, k=k, sigma=sigma,
                     num_classes=config.data.num_classes, mesh=mesh, batch_size=batch_size)
  return {'step': int(step), 'k': int(k), 'sigma': float(sigma),
          'database': 'recomputed' if recompute else 'bank', 'num_queries': int(len(queries)),
          'top1': acc[1], 'top5': acc[5]}
