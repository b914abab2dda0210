"""Embedding a dataset with a trained state, and kNN accuracy (docs/METHOD.md, "kNN evaluation")."""

import functools
import math
import numbers
import os

import jax
import jax.numpy as jnp
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
from snca_jax.data import sources
from snca_jax.data import transforms
from snca_jax.errors import CheckpointError, ConfigError


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
    self.transform = transforms.from_config(config.data, config.data.eval_augment)
    self._sources = {}

  def source(self, split, view='train'):
    if (split, view) not in self._sources:
      self._sources[split, view] = sources.open_source(self.config.data, split, view)
    return self._sources[split, view]

  def embed(self, variables, split, view='train'):
    return embed_dataset(variables, self.model, self.source(split, view),
                         data_config=self.config.data, transform=self.transform,
                         mesh=self.mesh, batch_size=self.batch_size)

  def k_for(self, size: int) -> int:
    """The K searched in a database of `size` images: self.k, or all of them where fewer."""
    return max(1, min(self.k, size))

  def run(self, variables, bank, bank_labels) -> dict:
    """{'top1', ['top5'], 'num_queries', 'k': the K used, 'database_size'}."""
    queries, labels, _ = self.embed(variables, self.config.data.eval_split)
    size = database_size(bank_labels)
    k = self.k_for(size)
    acc = knn_accuracy(queries, labels, bank, bank_labels, k=k, sigma=self.sigma,
                       num_classes=self.config.data.num_classes, mesh=self.mesh,
                       ks=self.ks, batch_size=self.batch_size)
    return {f'top{n}': v for n, v in acc.items()} | {
        'num_queries': len(queries), 'k': k, 'database_size': size}


def database_size(labels) -> int:
  """Images in a database: its rows but the padding ones (label < 0), counted where the labels
  live (a sharded bank's stay on the devices)."""
  if isinstance(labels, jax.Array):
    return int(jnp.sum(labels >= 0))
  return int(np.sum(np.asarray(labels) >= 0))


class SubcategoryEvaluator:
  """Sub-category discovery: a run trained on coarse labels (`data.label_map`), evaluated on
  the fine ones. Weighted kNN of the evaluation split against the training set re-embedded,
  both with their fine labels: {'subcategory/top1', 'subcategory/top5'}."""

  def __init__(self, knn_evaluator: KnnEvaluator):
    self.knn = knn_evaluator

  def run(self, variables) -> dict:
    c, knn_ = self.knn.config, self.knn
    queries, labels, _ = knn_.embed(variables, c.data.eval_split, 'fine')
    database, db_labels, _ = knn_.embed(variables, c.data.train_split, 'fine')
    k = knn_.k_for(database_size(db_labels))
    acc = knn_accuracy(queries, labels, database, db_labels, k=k, sigma=knn_.sigma,
                       num_classes=int(max(labels.max(), db_labels.max())) + 1,
                       mesh=knn_.mesh, batch_size=knn_.batch_size)
    out = {'subcategory/top1': acc[1], 'subcategory/top5': acc[5]}
    return out | ({'subcategory/k': k} if k != knn_.k else {})    # a database smaller than K


def few_shot_episodes(support, support_labels, queries, query_labels, *, ways=5, shots=1,
                      queries_per_class=15, episodes=1000, seed=0) -> dict:
  """N-way K-shot episodes on unit-norm embeddings: each episode draws `ways` classes, `shots`
  support examples of each from `support` and `queries_per_class` queries of each from
  `queries`; a query takes the class of its most similar support example ('nearest') or of
  the most similar class mean ('mean'). Returns the mean accuracy of each rule over the
  episodes with the half-width of its 95% confidence interval (1.96 standard errors)."""
  rng = np.random.default_rng(seed)
  classes = np.intersect1d(np.unique(support_labels), np.unique(query_labels))
  if len(classes) < ways:
    raise ValueError(f'{ways}-way episodes need {ways} classes; the held-out ones are '
                     f'{classes.tolist()}')
  by_class_s = {c: np.flatnonzero(support_labels == c) for c in classes}
  by_class_q = {c: np.flatnonzero(query_labels == c) for c in classes}
  acc = {'nearest': [], 'mean': []}
  for _ in range(episodes):
    chosen = rng.choice(classes, ways, replace=False)
    s_idx = np.stack([rng.choice(by_class_s[c], shots, replace=False) for c in chosen])
    q_idx = np.concatenate([rng.choice(by_class_q[c], min(queries_per_class,
                                                          len(by_class_q[c])), replace=False)
                            for c in chosen])
    q_true = np.concatenate([np.full(min(queries_per_class, len(by_class_q[c])), i)
                             for i, c in enumerate(chosen)])
    q = queries[q_idx]
    s_feat = support[s_idx]                                   # (ways, shots, D)
    sims = q @ s_feat.reshape(ways * shots, -1).T             # (Q, ways * shots)
    acc['nearest'].append(np.mean(sims.argmax(1) // shots == q_true))
    means = s_feat.mean(1)
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    acc['mean'].append(np.mean((q @ means.T).argmax(1) == q_true))
  return {rule: (float(np.mean(v)), float(1.96 * np.std(v) / np.sqrt(len(v))))
          for rule, v in acc.items()}


class FewShotEvaluator:
  """Novel classes: a run trained on `data.train_classes`, evaluated on the classes it never
  saw. 5-way 1-shot and 5-shot episodes (support from their training images, queries from
  their evaluation images; nearest support example and nearest class mean), and weighted kNN
  of their evaluation images against all their training images."""

  def __init__(self, knn_evaluator: KnnEvaluator, *, ways=5, shots=(1, 5), episodes=1000,
               seed=0):
    self.knn, self.ways, self.shots = knn_evaluator, ways, shots
    self.episodes, self.seed = episodes, seed

  def run(self, variables) -> dict:
    c, knn_ = self.knn.config, self.knn
    support, support_labels, _ = knn_.embed(variables, c.data.train_split, 'held_out')
    queries, query_labels, _ = knn_.embed(variables, c.data.eval_split, 'held_out')
    out = {}
    for shots in self.shots:
      res = few_shot_episodes(support, support_labels, queries, query_labels,
                              ways=self.ways, shots=shots, episodes=self.episodes,
                              seed=self.seed)
      for rule, (mean, ci) in res.items():
        out[f'fewshot/{self.ways}way{shots}shot_{rule}'] = mean
        out[f'fewshot/{self.ways}way{shots}shot_{rule}_ci95'] = ci
    k = knn_.k_for(database_size(support_labels))
    acc = knn_accuracy(queries, query_labels, support, support_labels, k=k,
                       sigma=knn_.sigma, num_classes=int(support_labels.max()) + 1,
                       mesh=knn_.mesh, batch_size=knn_.batch_size)
    out['fewshot/knn_top1'] = acc[1]
    if k != knn_.k:                       # fewer held-out training images than K
      out['fewshot/knn_k'] = k
    return out


def class_names(source, num_classes: int) -> list[str]:
  """Names of the classes where the dataset says them, else their numbers."""
  from snca_jax.data import fashion_mnist
  if getattr(source, 'label_map', None) is not None or getattr(source, 'label_key',
                                                                 'label') != 'label':
    return [str(i) for i in range(num_classes)]                # coarse classes: their numbers
  inner = getattr(source, 'source', source)
  if hasattr(inner, 'classes'):                               # image folders
    return list(inner.classes)
  info = getattr(inner, 'dataset_info', None) or getattr(inner, 'info', None)
  if info is not None and info.name == fashion_mnist.FashionMnistIdx.name:
    return list(fashion_mnist.CLASS_NAMES)
  names = getattr(inner, 'class_names', None)                 # TFDS ClassLabel names
  return list(names) if names else [str(i) for i in range(num_classes)]


class NeighboursEvaluator:
  """Neighbour pictures: for `num_queries` evaluation images (a fixed random choice), their
  `k` nearest training images in the database, with labels and similarities, written as
  `neighbours.png` (a grid: query, then its neighbours, wrong-class ones framed in red) and
  `neighbours.html` (the same as a table) in `out_dir`."""

  def __init__(self, knn_evaluator: KnnEvaluator, out_dir: str, *, num_queries=10, k=10,
               seed=0, cell=84):
    self.knn, self.out_dir = knn_evaluator, out_dir
    self.num_queries, self.k, self.seed, self.cell = num_queries, k, seed, cell

  def _picture(self, record):
    from PIL import Image
    from snca_jax.data import images
    x = images.decode(record['image'], 3) if isinstance(record['image'], bytes) else np.asarray(
        record['image'])
    image = Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).convert('RGB')
    image.thumbnail((self.cell, self.cell))
    if image.size != (self.cell, self.cell) and max(image.size) < self.cell:
      scale = self.cell / max(image.size)
      image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)),
                           Image.NEAREST)
    return image

  def run(self, variables, database, database_labels) -> dict:
    import html
    from PIL import Image, ImageDraw
    c = self.knn.config
    queries, labels, index = self.knn.embed(variables, c.data.eval_split)
    pick = np.sort(np.random.default_rng(self.seed).choice(
        len(queries), min(self.num_queries, len(queries)), replace=False))
    sims, rows, nb_labels = knn.nearest(queries[pick], database, database_labels, k=self.k,
                                        mesh=self.knn.mesh)
    eval_source = self.knn.source(c.data.eval_split)
    train_source = self.knn.source(c.data.train_split)
    names = class_names(train_source, c.data.num_classes)
    name = lambda y: names[y] if 0 <= y < len(names) else str(y)
    cell, pad, text = self.cell, 4, 26
    grid = Image.new('RGB', ((self.k + 1) * (cell + pad) + pad,
                             len(pick) * (cell + text + pad) + pad), 'white')
    draw = ImageDraw.Draw(grid)
    rows_html = []
    q_records = eval_source.__getitems__([int(index[i]) for i in pick])
    for r, (i, q_record) in enumerate(zip(pick, q_records)):
      y0 = pad + r * (cell + text + pad)
      grid.paste(self._picture(q_record), (pad, y0))
      draw.rectangle((pad - 2, y0 - 2, pad + cell + 1, y0 + cell + 1), outline='black')
      draw.text((pad, y0 + cell + 2), f'query: {name(int(labels[i]))}'[:16], fill='black')
      cells = [f'<td><b>query</b><br>{html.escape(name(int(labels[i])))}</td>']
      neighbours = train_source.__getitems__([int(x) for x in rows[r]])
      for j, rec in enumerate(neighbours):
        x0 = pad + (j + 1) * (cell + pad)
        grid.paste(self._picture(rec), (x0, y0))
        wrong = int(nb_labels[r, j]) != int(labels[i])
        if wrong:
          draw.rectangle((x0 - 2, y0 - 2, x0 + cell + 1, y0 + cell + 1), outline='red',
                         width=3)
        draw.text((x0, y0 + cell + 2), f'{name(int(nb_labels[r, j]))[:10]} {sims[r, j]:.2f}',
                  fill='red' if wrong else 'black')
        label = html.escape(name(int(nb_labels[r, j])))
        cells.append(f'<td{" class=wrong" if wrong else ""}>{label}<br>{sims[r, j]:.3f}</td>')
      rows_html.append('<tr>' + ''.join(cells) + '</tr>')
    os.makedirs(self.out_dir, exist_ok=True)
    grid.save(os.path.join(self.out_dir, 'neighbours.png'))
    with open(os.path.join(self.out_dir, 'neighbours.html'), 'w') as f:
      f.write('<!doctype html><meta charset="utf-8"><title>Nearest neighbours</title>'
              '<style>td{padding:4px;text-align:center;font:12px sans-serif}'
              '.wrong{color:#c00;font-weight:bold}</style>'
              f'<h1>{len(pick)} queries and their {self.k} nearest training images</h1>'
              '<p><img src="neighbours.png" alt="neighbours"></p><table>'
              + ''.join(rows_html) + '</table>')
    wrong = float(np.mean(nb_labels != labels[pick][:, None]))
    return {'neighbours/wrong_fraction': wrong, 'neighbours/num_queries': len(pick)}


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
  where = os.path.join(ckpt_dir, str(step))
  mesh = mesh_lib.make_mesh()
  try:
    config = ml_collections.ConfigDict(checkpoint.restore_config(mngr, step))
    state = state_lib.restore_as_saved(mngr, step, mesh)
  except checkpoint.ChecksumError as e:     # a file not as written: checked before reading
    raise e.advice('evaluate an earlier step with --checkpoint') from e
  except CheckpointError:
    raise
  except Exception as e:
    raise CheckpointError(f'checkpoint {where} cannot be read ({type(e).__name__}: '
                          f'{str(e)[:200]}): evaluate an earlier step with --checkpoint') from e
  for key, value in (data_overrides or {}).items():
    if value:
      config.data[key] = value
  evaluator = KnnEvaluator(config, mesh, k=k, sigma=sigma, batch_size=batch_size)
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  recompute = recompute or config.get('loss', 'nca') == 'softmax'
  if recompute:
    bank, bank_labels, bank_index = evaluator.embed(variables, config.data.train_split)
  else:     # the sharded bank as it is (its padding rows never count)
    bank, bank_labels = state['bank'], state['bank_labels']
    bank_index = np.arange(bank.shape[0])
  result = evaluator.run(variables, bank, bank_labels)
  k_used = result.pop('k')
  if config.data.get('label_map') or config.data.get('label_key', 'label') != 'label':
    result.update(SubcategoryEvaluator(evaluator).run(variables))
  if config.data.get('train_classes'):
    result.update(FewShotEvaluator(evaluator).run(variables))
  if neighbours:
    out = neighbours_dir or os.path.join(os.path.dirname(ckpt_dir), 'neighbours')
    result.update(NeighboursEvaluator(evaluator, out, num_queries=neighbours).run(
        variables, bank, bank_labels))
    result['neighbours_dir'] = out
  if export_dir:
    queries, query_labels, query_index = evaluator.embed(variables, config.data.eval_split)
    n = len(bank) if recompute else int(config.get('num_examples') or len(bank))  # no padding
    export_embeddings(export_dir, queries, query_labels, query_index,
                      distributed.to_host(bank)[:n], distributed.to_host(bank_labels)[:n],
                      bank_index[:n])
  return {'step': int(step), 'k': k_used, 'sigma': evaluator.sigma,
          'database': 'recomputed' if recompute else 'bank', **result,
          **({'k_requested': evaluator.k} if k_used != evaluator.k else {})}
