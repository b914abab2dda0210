"""The evaluators of a trained run, one module each, one API: built from the run's config,
`run(embeddings, database) -> {name: value}` (see `knn.py`). `Embedder.of(variables)` embeds
each split once for all of them.

    knn.py          weighted kNN of the evaluation split against the database (bank or
                    training set): the per-epoch monitor and eval_knn.py's figure
    subcategory.py  a run trained on coarse labels, evaluated on the fine ones
    few_shot.py     a run trained on some classes, evaluated on the others (episodes, kNN)
    neighbours.py   neighbour pictures (PNG and HTML)
"""

from snca_jax import schema
from snca_jax.evaluators.embeddings import Embedded, Embedder, Embeddings, embed_dataset
from snca_jax.evaluators.few_shot import FewShotEvaluator, few_shot_episodes
from snca_jax.evaluators.knn import Database, KnnEvaluator, KnnSettings
from snca_jax.evaluators.neighbours import NeighboursEvaluator, class_names
from snca_jax.evaluators.subcategory import SubcategoryEvaluator

__all__ = (
    'Database', 'Embedded', 'Embedder', 'Embeddings', 'FewShotEvaluator', 'KnnEvaluator',
    'KnnSettings', 'NeighboursEvaluator', 'SubcategoryEvaluator', 'class_names',
    'embed_dataset', 'few_shot_episodes', 'paper_evaluators',
)


def paper_evaluators(config, settings: KnnSettings) -> list:
  """The evaluations that the run's config calls for beyond kNN: sub-categories for a run
  trained on coarse labels, novel classes for one trained on a subset of the classes."""
  out = []
  if schema.trains_on_coarse_labels(config):
    out.append(SubcategoryEvaluator(config, settings))
  if schema.trains_on_class_subset(config):
    # Episodes drawn with the run's own seed: over training seeds, the spread of a few-shot
    # figure covers the episodes as well as training, while NCA and softmax runs of one seed
    # meet the same episodes.
    out.append(FewShotEvaluator(config, settings, seed=config.seed))
  return out
