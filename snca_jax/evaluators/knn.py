"""Weighted kNN of the evaluation split against a database (docs/METHOD.md, "kNN evaluation"):
the per-epoch monitor and eval_knn.py's main figure.

Every evaluator of this package has one API: built from the run's config (and the kNN settings
they share, `KnnSettings`), `run(embeddings, database) -> {name: value}`, where `embeddings`
(`embeddings.Embeddings`) embeds each split once for all of them and `database` is what kNN
searches: the bank, or the training set embedded again.
"""

import dataclasses
import functools
from typing import Any

from snca_jax import bank as bank_lib
from snca_jax import knn


@dataclasses.dataclass(frozen=True)
class Database:
  """What kNN searches: features (N, D) and labels (N,), host or row-sharded arrays (a bank
  with its padding rows, labelled < 0, that never count); `index`, where known, the record
  position of each row."""
  features: Any
  labels: Any
  index: Any = None

  @functools.cached_property
  def size(self) -> int:
    """Its images: the rows but the padding ones (counted once, where the labels live)."""
    return bank_lib.database_size(self.labels)


@dataclasses.dataclass(frozen=True)
class KnnSettings:
  """K, the vote temperature and the query batch of a run's kNN, the config's unless given."""
  k: int
  sigma: float
  batch_size: int

  @classmethod
  def from_config(cls, config, *, k=None, sigma=None, batch_size=None) -> 'KnnSettings':
    return cls(k=int(k or config.knn.k),
               sigma=float(sigma or config.knn.sigma or config.temperature),
               batch_size=int(batch_size or config.knn.batch_size))

  def k_for(self, size: int) -> int:
    """The K searched in a database of `size` images: self.k, or all of them where fewer."""
    return max(1, min(self.k, size))

  def scores(self, queries, database: Database, *, num_classes, mesh):
    """(K used, class scores (Q, num_classes)) of weighted kNN of `queries` against
    `database`."""
    k = self.k_for(database.size)
    return k, knn.knn_classify(queries, database.features, database.labels, k=k,
                               sigma=self.sigma, num_classes=num_classes, mesh=mesh,
                               batch_size=self.batch_size)

  def accuracy(self, queries, query_labels, database: Database, *, num_classes, mesh,
               ks=(1, 5)):
    """(K used, {j: top-j accuracy}) of weighted kNN of `queries` against `database`."""
    k, scores = self.scores(queries, database, num_classes=num_classes, mesh=mesh)
    return k, knn.top_k_accuracy(scores, query_labels, ks=ks)


class KnnEvaluator:
  """{'top1', ['top5'], 'num_queries', 'k': the K used, 'database_size'} of the evaluation
  split against the database: the per-epoch monitor (k=1, the original's 1-NN; or the
  config's k) and eval_knn.py's figure are both this."""

  def __init__(self, config, settings: KnnSettings, *, ks=(1, 5)):
    self.config, self.settings, self.ks = config, settings, ks

  def run(self, embeddings, database: Database) -> dict:
    queries = embeddings.get(self.config.data.eval_split)
    k, acc = self.settings.accuracy(queries.features, queries.labels, database,
                                    num_classes=self.config.data.num_classes,
                                    mesh=embeddings.mesh, ks=self.ks)
    return {f'top{n}': v for n, v in acc.items()} | {
        'num_queries': len(queries.labels), 'k': k, 'database_size': database.size}
