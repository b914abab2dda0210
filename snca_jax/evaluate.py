"""Evaluating a checkpoint: what `eval_knn.py` runs (docs/METHOD.md, "kNN evaluation").

`evaluate_checkpoint` restores a checkpoint of any run, embeds what its evaluators need once
(`evaluators.Embedder`), and returns one dict of results; `describe` turns that dict into the
lines eval_knn.py prints. Arguments that cannot work fail before any work, in one line.
"""

import math
import numbers
import os

import numpy as np

from snca_jax import checkpoint
from snca_jax import distributed
from snca_jax import evaluators
from snca_jax import mesh as mesh_lib
from snca_jax import schema
from snca_jax.errors import CheckpointError, ConfigError


def export_embeddings(out_dir, queries, query_labels, query_index, database, database_labels,
                      database_index):
  """Embeddings, labels and record positions of queries and database as .npy files."""
  problem = _folder_problem('--export', out_dir, 'the .npy files')
  if problem:
    raise ConfigError(problem)
  os.makedirs(out_dir, exist_ok=True)
  for name, value in (('queries', queries), ('query_labels', query_labels),
                      ('query_index', query_index), ('database', database),
                      ('database_labels', database_labels),
                      ('database_index', database_index)):
    np.save(os.path.join(out_dir, f'{name}.npy'), np.asarray(value))


# The neighbour pictures' grid grows by 114 pixels a query: 200 queries make a PNG of
# 972 x 22,804 pixels, that image viewers and browsers still open.
MAX_NEIGHBOUR_QUERIES = 200


def _folder_problem(flag: str, path: str, what: str) -> str | None:
  """Why `path` cannot be (made) a folder to write `what` into; None where it can."""
  full = os.path.abspath(path)
  where = full
  while not os.path.exists(where):              # its nearest existing ancestor
    where = os.path.dirname(where)
  if where == full and not os.path.isdir(full):
    why = 'is a file, not a folder'
  elif not os.path.isdir(where):
    why = f'cannot be made inside the file {where}'
  elif not os.access(where, os.W_OK | os.X_OK):
    why = f'cannot be written ({where} is not writable)'
  else:
    return None
  return f'{flag}={path} {why}: give a folder (new or existing) for {what}'


def _argument_problems(*, k, sigma, batch_size, neighbours, neighbours_dir, export_dir):
  integer = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)
  out = []
  if k is not None and not (integer(k) and k >= 1):
    out.append(f'--k={k} cannot work: give a whole number of neighbours, at least 1')
  if sigma is not None and not (isinstance(sigma, numbers.Real) and math.isfinite(sigma)
                                and sigma > 0):
    out.append(f'--sigma={sigma} cannot work: give a vote temperature above 0')
  if batch_size is not None and not (integer(batch_size) and batch_size >= 1):
    out.append(f'--batch_size={batch_size} cannot work: give a batch size of at least 1')
  if not (integer(neighbours) and 0 <= neighbours <= MAX_NEIGHBOUR_QUERIES):
    out.append(f'--neighbours={neighbours} cannot work: give how many evaluation images to '
               f'picture with their neighbours, 0 (none) to {MAX_NEIGHBOUR_QUERIES} (more do '
               f'not fit one picture)')
  elif neighbours and neighbours_dir:
    out.append(_folder_problem('--neighbours_dir', neighbours_dir, 'the neighbour pictures'))
  if export_dir:
    out.append(_folder_problem('--export', export_dir, 'the .npy files'))
  return [p for p in out if p]


def evaluate_checkpoint(path: str, *, k=None, sigma=None, recompute=False, batch_size=None,
                        data_overrides=None, neighbours=0, neighbours_dir=None,
                        export_dir=None):
  """Weighted kNN top-1 / top-5 of the evaluation split for the checkpoint at `path` (a
  workdir, its checkpoints directory, or one step's directory; the latest step by default).

  The database is the checkpoint's bank, or with `recompute` the training set re-embedded with
  the evaluation transform (always for a softmax run, which keeps no bank). k and sigma
  default to the run's config (sigma: its temperature). A run trained on coarse labels is also
  evaluated on the fine ones (sub-categories), one trained on a subset of the classes on the
  others (few-shot episodes). `neighbours` > 0 writes neighbour pictures to `neighbours_dir`;
  `export_dir` receives the embeddings as .npy files.

  K is that of the result's 'k': where the database has fewer images than asked for, all of
  them ('k_requested' then says what was asked for; 'subcategory/k' and 'fewshot/knn_k' the
  same of their databases). Arguments that cannot work fail here, before any work.
  """
  bad = _argument_problems(k=k, sigma=sigma, batch_size=batch_size, neighbours=neighbours,
                           neighbours_dir=neighbours_dir, export_dir=export_dir)
  if bad:
    raise ConfigError('; '.join(bad))
  ckpt_dir, step = checkpoint.locate(path)
  if not os.path.isdir(ckpt_dir):
    raise CheckpointError(f'no checkpoint at {path}: pass the --workdir of a training run, '
                          f'or --checkpoint with a checkpoint directory')
  mngr = checkpoint.manager(ckpt_dir, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'{ckpt_dir} holds no checkpoint: train first (python train.py '
                          f'--workdir ...) or point --checkpoint at a step directory')
  mesh = mesh_lib.make_mesh()
  with checkpoint.reading(os.path.join(ckpt_dir, str(step)),
                          'evaluate an earlier step with --checkpoint'):
    config, facts = checkpoint.read_config(mngr, step)
    state = checkpoint.restore_as_saved(mngr, step, mesh)
  for key, value in (data_overrides or {}).items():
    if value:
      config.data[key] = value
  settings = evaluators.KnnSettings.from_config(config, k=k, sigma=sigma, batch_size=batch_size)
  embeddings = evaluators.Embedder(config, mesh, batch_size=settings.batch_size).of(
      {'params': state['params'], 'batch_stats': state['batch_stats']})
  recompute = recompute or schema.is_softmax(config)
  if recompute:
    train = embeddings.get(config.data.train_split)
    database = evaluators.Database(train.features, train.labels, train.index)
  else:     # the sharded bank as it is (its padding rows never count)
    database = evaluators.Database(state['bank'], state['bank_labels'],
                                   np.arange(state['bank'].shape[0]))
  result = evaluators.KnnEvaluator(config, settings).run(embeddings, database)
  k_used = result.pop('k')
  for evaluator in evaluators.paper_evaluators(config, settings):
    result.update(evaluator.run(embeddings, database))
  if neighbours:
    out = neighbours_dir or os.path.join(os.path.dirname(ckpt_dir), 'neighbours')
    result.update(evaluators.NeighboursEvaluator(config, out, num_queries=neighbours).run(
        embeddings, database))
    result['neighbours_dir'] = out
  if export_dir:
    queries = embeddings.get(config.data.eval_split)
    n = len(database.labels) if recompute else int(facts.get('num_examples')
                                                   or len(database.labels))  # no padding
    export_embeddings(export_dir, queries.features, queries.labels, queries.index,
                      distributed.to_host(database.features)[:n],
                      distributed.to_host(database.labels)[:n], database.index[:n])
  return {'step': int(step), 'k': k_used, 'sigma': settings.sigma,
          'database': 'recomputed' if recompute else 'bank', **result,
          **({'k_requested': settings.k} if k_used != settings.k else {})}


def describe(result: dict) -> list[str]:
  """The lines eval_knn.py prints for `evaluate_checkpoint`'s result."""
  clamped = (f" (the whole database: {result['database_size']} images, fewer than the "
             f"{result['k_requested']} asked for)" if 'k_requested' in result else '')
  lines = [f"kNN (K={result['k']}{clamped}, sigma={result['sigma']:g}, database: "
           f"{result['database']}) on {result['num_queries']} images, checkpoint step "
           f"{result['step']}: top-1 {100 * result['top1']:.2f}%  top-5 "
           f"{100 * result['top5']:.2f}%"]
  for key, value in result.items():
    if not key.startswith(('subcategory/', 'fewshot/')) or key.endswith('_ci95'):
      continue
    if key.endswith(('/k', '_k')):       # a database smaller than K: all of it
      lines.append(f'{key}: {value} (all of its database)')
      continue
    ci = result.get(key + '_ci95')
    lines.append(f'{key}: {100 * value:.2f}%' + (f' +- {100 * ci:.2f}' if ci is not None else ''))
  if 'neighbours_dir' in result:
    lines.append(f"neighbour pictures of {result['neighbours/num_queries']} images: "
                 f"{result['neighbours_dir']}/neighbours.png and .html")
  return lines
