"""Input pipeline: TFDS array_record sources read in batches by grain.

Every training example carries its dense index `0 <= i < N`: its record position in the
split's data source, which is stable for a prepared dataset. The memory bank is indexed by it.

A training epoch is a grain `MapDataset`: a seeded permutation of the record positions, cut
into global batches, of which each process keeps its own contiguous share; that share is read
with one batched `__getitems__` call and augmented with one generator per example, seeded by
(epoch seed, example index). Batch `k` of epoch `e` is therefore a pure function of
(seed, e, k), and each process's share of it does not depend on the number of processes:
resuming at any batch gives exactly the batches an uninterrupted run would have seen.
"""

import dataclasses
import os
from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from snca_jax.data import augment
from snca_jax.errors import DataError
from snca_jax.data.fashion_mnist import DEFAULT_IDX_DIR, FashionMnistIdx


def open_source(data_config, split: str):
  """The random-access data source of `split` for the dataset named in `data_config.name`."""
  name, data_dir = data_config.name, data_config.get('data_dir') or None
  if name == 'fashion_mnist':
    idx_dir = data_config.get('idx_dir') or DEFAULT_IDX_DIR
    tfds_dir = data_dir or os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')
    builder = FashionMnistIdx(idx_dir=idx_dir, download=data_config.get('download', True),
                              data_dir=tfds_dir, file_format='array_record')
    if jax.process_count() > 1:   # process 0 first, so a shared filesystem is written once
      if jax.process_index() == 0 and not builder.is_prepared():
        _prepare(builder, idx_dir)
      multihost_utils.sync_global_devices('snca_jax: fashion_mnist prepared')
    if not builder.is_prepared():
      _prepare(builder, idx_dir)
    return builder.as_data_source(split)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:
    raise DataError(
        f'TFDS dataset {name!r} (split {split!r}) could not be opened from '
        f'{data_dir or "the default TFDS data dir"} ({type(e).__name__}: {e}); prepare it as '
        f'array_record first, or set --config.data.data_dir') from e


def _prepare(builder, idx_dir):
  try:
    builder.download_and_prepare(file_format='array_record')
  except Exception as e:  # no IDX files and no network
    raise DataError(
        f'Fashion-MNIST not found in {idx_dir} and could not be downloaded ({type(e).__name__}'
        f'): install Debian\'s dataset-fashion-mnist (apt-get install dataset-fashion-mnist) '
        f'or set --config.data.idx_dir to a folder holding the four IDX files') from e


def image_shape(data_config):
  return (data_config.image_size, data_config.image_size, data_config.channels)


def read_labels(source, batch_size: int = 8192) -> np.ndarray:
  """All labels of a source, in record order, as int32."""
  out = []
  for start in range(0, len(source), batch_size):
    records = source.__getitems__(list(range(start, min(start + batch_size, len(source)))))
    out.append(np.asarray([r['label'] for r in records], np.int32))
  return np.concatenate(out) if out else np.zeros((0,), np.int32)


@dataclasses.dataclass(frozen=True)
class ReadBatch:
  """Record positions -> a batch dict; one batched read. Positions < 0 are padding (mask 0)."""
  source: Any

  def __call__(self, positions):
    positions = np.asarray(positions, np.int64)
    mask = positions >= 0
    records = self.source.__getitems__([int(p) for p in np.where(mask, positions, 0)])
    images = [r['image'] for r in records]
    if len({im.shape for im in images}) == 1:
      images = np.stack(images)
    return {'image': images,
            'label': np.asarray([r['label'] for r in records], np.int32),
            'index': np.where(mask, positions, 0).astype(np.int32),
            'mask': mask}


@dataclasses.dataclass(frozen=True)
class Transform:
  """A batch augmentation by name ('crop_flip', 'cifar', 'imagenet', 'imagenet_eval', 'none'),
  then normalisation: (batch, seed) -> batch, each example augmented with its own generator
  seeded by (seed, its index)."""
  kind: str
  mean: Sequence[float]
  std: Sequence[float]
  image_size: int

  def __call__(self, batch, seed: int = 0):
    rng = [np.random.default_rng((seed, int(i))) for i in batch['index']]
    x = batch['image']                      # uint8, values in [0, 255]
    if self.kind == 'none':
      x = np.asarray(x, np.float32)
    elif self.kind == 'crop_flip':
      x = augment.random_crop_flip(np.asarray(x), rng, pad=4 if self.image_size >= 32 else 2)
    elif self.kind == 'cifar':
      x = augment.random_resized_crop(x, rng, self.image_size, scale=(0.2, 1.0)) / 255.0
      x = augment.random_grayscale(x, rng, p=0.2)
      x = augment.color_jitter(x, rng, strength=0.4)
      x = augment.random_flip(x, rng) * 255.0
    elif self.kind == 'imagenet':
      x = augment.random_flip(augment.random_resized_crop(x, rng, self.image_size), rng)
    elif self.kind == 'imagenet_eval':
      x = augment.resize_center_crop(x, resize=self.image_size * 256 // 224,
                                     crop=self.image_size)
    else:
      raise ValueError(f"unknown augmentation {self.kind!r}: use 'none', 'crop_flip', "
                       f"'cifar', 'imagenet' or 'imagenet_eval'")
    return dict(batch, image=augment.normalize(np.asarray(x, np.float32) / 255.0,
                                               self.mean, self.std))


@dataclasses.dataclass(frozen=True)
class Augment:
  """A grain map: `transform` with a fixed seed (the epoch's)."""
  transform: Transform
  seed: int

  def __call__(self, batch):
    return self.transform(batch, self.seed)


@dataclasses.dataclass(frozen=True)
class ProcessShare:
  """Global batch of positions -> this process's contiguous share of it."""
  process_index: int
  process_count: int

  def __call__(self, positions):
    local = len(positions) // self.process_count
    return positions[self.process_index * local:(self.process_index + 1) * local]


def _iterate(ds: grain.MapDataset, start: int, num_threads: int, worker_count: int):
  ds = ds[start:]
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4))
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it)


def epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def train_dataset(source, *, global_batch_size: int, seed: int, epoch: int,
                  transform: Transform, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """Epoch `epoch` as a MapDataset of this process's batches (the last partial batch dropped)."""
  s = epoch_seed(seed, epoch)
  ds = grain.MapDataset.range(len(source)).shuffle(seed=s)
  ds = ds.batch(global_batch_size, drop_remainder=True)
  ds = ds.map(ProcessShare(process_index, process_count)).map(ReadBatch(source))
  return ds.map(Augment(transform, s))


def train_batches(source, *, start_batch: int = 0, num_threads: int = 1, worker_count: int = 0,
                  **kwargs) -> Iterator[dict]:
  """Iterates `train_dataset(source, **kwargs)` from batch `start_batch`, prefetching."""
  return _iterate(train_dataset(source, **kwargs), start_batch, num_threads, worker_count)


def eval_batches(source, *, global_batch_size: int, transform: Transform, process_index: int = 0,
                 process_count: int = 1, num_threads: int = 1,
                 worker_count: int = 0) -> Iterator[dict]:
  """All records in order; the last batch padded, padding marked by `mask == False`."""
  n = len(source)
  num_batches = -(-n // global_batch_size)
  positions = np.full(num_batches * global_batch_size, -1, np.int64)
  positions[:n] = np.arange(n)
  ds = grain.MapDataset.source(positions.reshape(num_batches, global_batch_size))
  ds = ds.map(ProcessShare(process_index, process_count)).map(ReadBatch(source))
  ds = ds.map(Augment(transform, 0))
  return _iterate(ds, 0, num_threads, worker_count)
