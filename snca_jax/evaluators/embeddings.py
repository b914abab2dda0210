"""Embedding the splits of a run's dataset with a trained network, each split once.

`Embedder` is built once from the run's config: the evaluation-mode network, the evaluation
transform, and each split's source opened once. `Embedder.of(variables)` gives the
`Embeddings` of one set of weights: every (split, view) embedded on first use and kept, so the
evaluators of one evaluation share them (the evaluation split is embedded once, however many
evaluators read it).
"""

import dataclasses
import functools

import jax
import numpy as np

from snca_jax import distributed
from snca_jax import mesh as mesh_lib
from snca_jax import models
from snca_jax.data import pipeline
from snca_jax.data import sources as sources_lib
from snca_jax.data import transforms
from snca_jax.lookahead import look_ahead


@dataclasses.dataclass(frozen=True)
class Embedded:
  """A split's embeddings (M, D), labels (M,) and record positions (M,), in record order."""
  features: np.ndarray
  labels: np.ndarray
  index: np.ndarray


@functools.lru_cache(maxsize=None)
def _embed_fn(model, mesh, mean, std):
  def embed(variables, images):
    return model.apply(variables, models.normalize_images(images, mean, std), train=False)
  return jax.jit(embed, in_shardings=(mesh_lib.replicated(mesh), mesh_lib.row_sharding(mesh)),
                 out_shardings=mesh_lib.row_sharding(mesh))


def embed_dataset(variables, model, source, *, data_config, transform, mesh,
                  batch_size: int) -> Embedded:
  """Every record of `source`, in order, embedded by the evaluation-mode network with
  `variables` ({'params', 'batch_stats'}). `batch_size` is global; images are read and
  transformed by the training pipeline's threads and worker processes
  (`data_config.num_threads`, `worker_count`)."""
  fn = _embed_fn(model, mesh, tuple(data_config.mean), tuple(data_config.std))
  rows = mesh_lib.row_sharding(mesh)
  batch_size = mesh_lib.padded_rows(batch_size, mesh)      # a multiple of the device count
  out = {'features': [], 'label': [], 'index': [], 'mask': []}

  def embedded():
    """Each batch placed and its embedding dispatched (not waited for)."""
    for batch in pipeline.eval_batches(source, global_batch_size=batch_size, transform=transform,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count(),
                                       num_threads=data_config.num_threads,
                                       worker_count=data_config.worker_count):
      # Every field becomes a global array the same way, so that features, labels, positions
      # and masks come back in one order, the mesh's, whatever order its devices take the
      # processes.
      glob = distributed.put_process_local(batch, rows, ('image', 'label', 'index', 'mask'))
      yield fn(variables, glob.pop('image')), glob

  # The next batch is read (by the pipeline's threads) and embedded while this one's
  # features are copied to the host.
  for features, glob in look_ahead(embedded(), 2):
    out['features'].append(distributed.to_host(features))
    for key, value in glob.items():
      out[key].append(distributed.to_host(value))
  out = {k: np.concatenate(v) for k, v in out.items()}
  mask = out['mask']
  order = np.argsort(out['index'][mask], kind='stable')    # record order, whatever the mesh's
  return Embedded(out['features'][mask][order], out['label'][mask][order],
                  out['index'][mask][order])


class Embedder:
  """The run's dataset and evaluation-mode network: built once from the config."""

  def __init__(self, config, mesh, *, batch_size=None):
    self.config, self.mesh = config, mesh
    self.batch_size = int(batch_size or config.knn.batch_size)
    self.model = models.model_from_config(config)
    self.transform = transforms.from_config(config.data, config.data.eval_augment)
    self._sources = {}

  def source(self, split: str, view: str = 'train'):
    """The source of `split` as `view` sees it (`sources.open_source`), opened once."""
    if (split, view) not in self._sources:
      self._sources[split, view] = sources_lib.open_source(self.config.data, split, view)
    return self._sources[split, view]

  def embed(self, variables, split: str, view: str = 'train') -> Embedded:
    return embed_dataset(variables, self.model, self.source(split, view),
                         data_config=self.config.data, transform=self.transform,
                         mesh=self.mesh, batch_size=self.batch_size)

  def of(self, variables) -> 'Embeddings':
    return Embeddings(self, variables)


class Embeddings:
  """The embeddings of one set of weights, each (split, view) computed on first use."""

  def __init__(self, embedder: Embedder, variables):
    self.embedder, self.variables = embedder, variables
    self.config, self.mesh = embedder.config, embedder.mesh
    self._cache = {}

  def get(self, split: str, view: str = 'train') -> Embedded:
    if (split, view) not in self._cache:
      self._cache[split, view] = self.embedder.embed(self.variables, split, view)
    return self._cache[split, view]

  def source(self, split: str, view: str = 'train'):
    return self.embedder.source(split, view)
