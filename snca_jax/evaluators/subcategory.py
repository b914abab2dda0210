"""Sub-category discovery: a run trained on coarse labels (`data.label_map`, or a record field
such as cifar100's 'coarse_label'), evaluated on the fine ones."""

import numpy as np

from snca_jax.evaluators.knn import Database, KnnSettings


class SubcategoryEvaluator:
  """Weighted kNN of the evaluation split against the training set re-embedded, both with
  their fine labels: {'subcategory/top1', 'subcategory/top5'} (and 'subcategory/k' where the
  training set is smaller than K). The run's own database (its bank, of coarse labels) is not
  used."""

  def __init__(self, config, settings: KnnSettings):
    self.config, self.settings = config, settings

  def run(self, embeddings, database=None) -> dict:
    del database
    d = self.config.data
    queries = embeddings.get(d.eval_split, 'fine')
    train = embeddings.get(d.train_split, 'fine')
    k, acc = self.settings.accuracy(
        queries.features, queries.labels, Database(train.features, train.labels),
        num_classes=int(max(np.max(queries.labels), np.max(train.labels))) + 1,
        mesh=embeddings.mesh)
    out = {'subcategory/top1': acc[1], 'subcategory/top5': acc[5]}
    return out | ({'subcategory/k': k} if k != self.settings.k else {})
