"""Sub-category discovery: a run trained on coarse labels (`data.label_map`, or a record field
such as cifar100's 'coarse_label'), evaluated on the fine ones.

A coarse class with a single fine class (Fashion-MNIST's bags) needs no discovery: knowing the
coarse class is knowing the fine one. So beside top-1 over all queries the evaluator reports it
without those queries, and the chance floor of each: the top-1 of a rule that knows every
query's coarse class and picks one of its fine classes at random (with Fashion-MNIST's four
groups, 40% over all queries).
"""

import numpy as np

from snca_jax import knn
from snca_jax.data import sources
from snca_jax.evaluators.knn import Database, KnnSettings


def fine_per_coarse(fine, coarse) -> dict:
  """{coarse class: how many fine classes it holds}, from (fine, coarse) label pairs."""
  pairs = set(zip(np.asarray(fine).tolist(), np.asarray(coarse).tolist()))
  out = {}
  for _, c in pairs:
    out[c] = out.get(c, 0) + 1
  return out


class SubcategoryEvaluator:
  """Weighted kNN of the evaluation split against the training set re-embedded, both with
  their fine labels: {'subcategory/top1', 'subcategory/top5'} (and 'subcategory/k' where the
  training set is smaller than K); 'subcategory/top1_without_singletons' (queries whose coarse
  class has more than one fine class) and the chance floors 'subcategory/chance_floor' and
  'subcategory/chance_floor_without_singletons'. The run's own database (its bank, of coarse
  labels) is not used."""

  def __init__(self, config, settings: KnnSettings):
    self.config, self.settings = config, settings

  def run(self, embeddings, database=None) -> dict:
    del database
    d = self.config.data
    queries = embeddings.get(d.eval_split, 'fine')
    train = embeddings.get(d.train_split, 'fine')
    k, scores = self.settings.scores(
        queries.features, Database(train.features, train.labels),
        num_classes=int(max(np.max(queries.labels), np.max(train.labels))) + 1,
        mesh=embeddings.mesh)
    acc = knn.top_k_accuracy(scores, queries.labels, ks=(1, 5))
    out = {'subcategory/top1': acc[1], 'subcategory/top5': acc[5]}
    out |= self._without_singletons(embeddings, queries, train, scores)
    return out | ({'subcategory/k': k} if k != self.settings.k else {})

  def _without_singletons(self, embeddings, queries, train, scores) -> dict:
    d = self.config.data
    # The coarse labels the run trained on, record by record ('train' view; the same records
    # as the 'fine' view, since a sub-category run trains on every class).
    coarse = {split: sources.read_labels(embeddings.source(split, 'train'))
              for split in (d.eval_split, d.train_split)}
    if len(coarse[d.eval_split]) != len(queries.labels):
      return {}
    groups = fine_per_coarse(np.r_[train.labels, queries.labels],
                             np.r_[coarse[d.train_split], coarse[d.eval_split]])
    size = np.asarray([groups[c] for c in coarse[d.eval_split].tolist()])
    right = np.argsort(-scores, axis=1, kind='stable')[:, 0] == queries.labels
    several = size > 1
    out = {'subcategory/chance_floor': float(np.mean(1 / size))}
    if several.any():
      out['subcategory/top1_without_singletons'] = float(np.mean(right[several]))
      out['subcategory/chance_floor_without_singletons'] = float(np.mean(1 / size[several]))
    return out
