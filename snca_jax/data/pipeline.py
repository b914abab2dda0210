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
import logging
import os
from typing import Any, Iterator

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from snca_jax.data import folder
from snca_jax.data import transforms
from snca_jax.data.fashion_mnist import DEFAULT_IDX_DIR, FashionMnistIdx
from snca_jax.errors import DataError

log = logging.getLogger('snca_jax')


VIEWS = ('train', 'fine', 'held_out')


def open_source(data_config, split: str, view: str = 'train'):
  """The random-access data source of `split` for the dataset named in `data_config.name`:
  'fashion_mnist' (IDX files), 'folder' (an image folder tree under `data_config.root`), or the
  name of any TFDS dataset with `image` and `label` features, prepared as array_record.

  `view` says which records and labels, where the config trains on coarse labels
  (`data.label_map`: fine class -> coarse class; or `data.label_key`: the records' own coarse
  label, such as TFDS cifar100's 'coarse_label') or on a subset of the classes
  (`data.train_classes`):
    'train'     what training sees: the training classes' records, labels mapped to coarse
    'fine'      every record, with its own (fine) label
    'held_out'  the records of the classes left out of training, with their own labels
  Records are renumbered 0.. within a view, so `index` stays a dense bank row."""
  source = _open(data_config, split)
  label_map = tuple(data_config.get('label_map') or ())
  label_key = data_config.get('label_key') or 'label'
  train_classes = tuple(data_config.get('train_classes') or ())
  if view not in VIEWS:
    raise ValueError(f'view {view!r}: use one of {VIEWS}')
  name = data_config.name
  fine = _fine_classes(source)
  if fine and train_classes and max(train_classes) >= fine:
    raise DataError(f'data.train_classes={list(train_classes)} names classes '
                    f'{[c for c in train_classes if c >= fine]} that {name} does not have '
                    f'(its {fine} classes are 0..{fine - 1}): train on classes of the dataset')
  if fine and label_map and label_key == 'label' and len(label_map) != fine:
    raise DataError(f'data.label_map has {len(label_map)} entries but {name} has {fine} '
                    f'classes: give one class for each of its {fine} classes, in order '
                    f'(fine class i is trained as label_map[i])')
  coarse = bool(label_map) or label_key != 'label'
  if not train_classes and (not coarse or view == 'fine'):
    return source
  positions = None
  if train_classes and view != 'fine':
    labels = read_labels(source)
    missing = sorted(set(train_classes) - set(np.unique(labels).tolist()))
    if missing and split == data_config.get('train_split', split):
      raise DataError(f'data.train_classes={list(train_classes)} names classes {missing} of '
                      f'which the {split} split of {name} has no image (its classes: '
                      f'{_classes_text(labels)}): train on classes it has')
    keep = np.isin(labels, train_classes)
    positions = np.flatnonzero(keep if view == 'train' else ~keep)
  train = view == 'train'
  out = View(source, positions, label_map if train else (), label_key if train else 'label',
             name=f'the {split} split of {name}')
  if train and label_map and not (fine and label_key == 'label'):
    out.labels()          # no class count declared: the labels say whether the map fits
  return out


def _fine_classes(source) -> int | None:
  """How many classes (of the `label` field) a source declares, if it does: image folders,
  TFDS ClassLabel features, Fashion-MNIST's ten."""
  declared = num_classes(source)
  if declared:
    return declared
  info = getattr(source, 'dataset_info', None)
  if info is not None and info.name == FashionMnistIdx.name:
    from snca_jax.data import fashion_mnist
    return len(fashion_mnist.CLASS_NAMES)
  return None


def _classes_text(labels) -> str:
  values = np.unique(labels).tolist()
  if values and values == list(range(values[0], values[-1] + 1)):
    return f'{values[0]}..{values[-1]}'
  return str(values[:20])[:-1] + (', ...]' if len(values) > 20 else ']')


class View:
  """Some records of a source (`positions`, renumbered 0..); their label taken from the
  record's `label_key` field and mapped by `label_map`."""

  def __init__(self, source, positions=None, label_map=(), label_key='label',
               name='the dataset'):
    self.source, self.positions, self.label_key = source, positions, label_key
    self.label_map = np.asarray(label_map, np.int32) if len(label_map) else None
    self.name, self._labels = name, None
    if self.label_map is not None:
      self.num_classes = int(self.label_map.max()) + 1

  def _map(self, labels):
    """`labels` through the label map; a label the map has no entry for is a DataError."""
    labels = np.asarray(labels)
    bad = labels[(labels < 0) | (labels >= len(self.label_map))]
    if len(bad):
      raise DataError(f'{self.name} has {self.label_key} {int(bad[0])}, beyond the '
                      f'{len(self.label_map)} entries of data.label_map: give one class for '
                      f'each class of the dataset, in order (fine class i is trained as '
                      f'label_map[i])')
    return self.label_map[labels]

  def __len__(self):
    return len(self.source) if self.positions is None else len(self.positions)

  def _records(self, keys):
    keys = [int(k) for k in keys]
    where = keys if self.positions is None else [int(self.positions[k]) for k in keys]
    out = []
    for key, record in zip(keys, self.source.__getitems__(where)):
      record = dict(record, index=key, label=record[self.label_key])
      if self.label_map is not None:
        record['label'] = int(self._map([int(record['label'])])[0])
      out.append(record)
    return out

  def __getitem__(self, i):
    return self._records([i])[0]

  def __getitems__(self, keys):
    return self._records(keys)

  def labels(self) -> np.ndarray:
    if self._labels is None:          # read once: a view's records never change
      labels = (read_labels(self.source) if self.label_key == 'label'
                else _labels_of(self.source, 8192, self.label_key))
      labels = labels if self.positions is None else labels[self.positions]
      self._labels = labels if self.label_map is None else self._map(labels)
    return self._labels.copy()


def _open(data_config, split: str):
  name, data_dir = data_config.name, data_config.get('data_dir') or None
  if name == 'fashion_mnist':
    idx_dir = data_config.get('idx_dir') or DEFAULT_IDX_DIR
    tfds_dir = data_dir or os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')
    builder = FashionMnistIdx(idx_dir=idx_dir, download=data_config.get('download', True),
                              data_dir=tfds_dir, file_format='array_record')
    _prepare_once(builder.is_prepared, lambda: _prepare(builder, idx_dir))
    return builder.as_data_source(split)
  if name == 'folder':
    return _open_folder(data_config, split)
  return TfdsSource(name, split, data_dir)


def _prepare_once(is_prepared, prepare):
  """Prepares a dataset on process 0 while the others wait (the filesystem is shared)."""
  if jax.process_count() > 1:
    if jax.process_index() == 0 and not is_prepared():
      prepare()
    multihost_utils.sync_global_devices('snca_jax: dataset prepared')
  if not is_prepared():
    prepare()


def _reachable(url: str, timeout: float = 5.0) -> bool:
  """Whether `url`'s host accepts a connection within `timeout` seconds (name lookup
  included), so that a machine without the network fails at once, not after retries."""
  import socket
  import threading
  import urllib.parse
  host = urllib.parse.urlparse(url).hostname
  result = []

  def connect():
    try:
      socket.create_connection((host, 443), timeout=timeout).close()
      result.append(True)
    except OSError:
      pass

  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(result)


def _prepare(builder, idx_dir):
  from snca_jax.data import fashion_mnist
  if not fashion_mnist.has_idx_files(idx_dir) and not (
      builder.download and _reachable(fashion_mnist.URL)):
    why = ('downloading is off (data.download=False)' if not builder.download else
           f'{fashion_mnist.URL} cannot be reached')
    raise DataError(
        f'Fashion-MNIST not found in {idx_dir}, and {why}: install Debian\'s '
        f'dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set '
        f'--config.data.idx_dir to a folder holding the four IDX files')
  try:
    builder.download_and_prepare(file_format='array_record')
  except Exception as e:  # no IDX files and no network
    raise DataError(
        f'Fashion-MNIST not found in {idx_dir} and could not be downloaded ({type(e).__name__}'
        f'): install Debian\'s dataset-fashion-mnist (apt-get install dataset-fashion-mnist) '
        f'or set --config.data.idx_dir to a folder holding the four IDX files') from e


def prepared_dir(data_config) -> str:
  root = os.path.abspath(os.path.expanduser(data_config.root))
  return os.path.abspath(os.path.expanduser(data_config.get('prepared_dir') or
                                            os.path.join(root, 'snca_prepared')))


def _open_folder(data_config, split: str) -> folder.FolderSource:
  if not data_config.get('root'):
    raise DataError('data.name=folder needs the image folder: set --config.data.root=DIR '
                    '(DIR/<split>/<class>/<image>)')
  root = os.path.abspath(os.path.expanduser(data_config.root))
  split_dir = os.path.join(root, split)
  out = os.path.join(prepared_dir(data_config), split)
  if not folder.is_prepared(out) and not os.path.isdir(split_dir):
    raise DataError(f'no folder {split_dir}: the image folder needs one sub-folder per split '
                    f'(set --config.data.train_split / eval_split to their names)')
  # Every split is labelled by the training split's class list (its sorted class folders, or
  # those it was prepared with where its folder is gone), so val/dog gets train/dog's label.
  train_dir = os.path.join(root, data_config.get('train_split') or split)
  train_out = os.path.join(prepared_dir(data_config), data_config.get('train_split') or split)
  if os.path.isdir(train_dir):
    classes = folder.find_classes(train_dir)
  elif folder.is_prepared(train_out):
    classes = folder.read_meta(train_out)['classes']
  elif folder.is_prepared(out):
    classes = None                    # nothing to check against: as it was prepared
  else:
    raise DataError(f'no folder {train_dir} (the training split) to take the class list from: '
                    f'the labels of {split_dir} are indices into it; set '
                    f'--config.data.train_split to its name')
  split_classes = folder.find_classes(split_dir) if os.path.isdir(split_dir) else None
  if split_classes is not None and classes is not None:
    folder.check_classes(split_dir, split_classes, classes, train_dir)

  def prepare():
    try:
      os.makedirs(os.path.dirname(out), exist_ok=True)
    except OSError as e:
      raise DataError(f'cannot write the prepared dataset to {os.path.dirname(out)} '
                      f'({e.strerror}): set --config.data.prepared_dir to a writable folder '
                      f'(shared by all hosts)') from e
    meta = folder.prepare(split_dir, out, classes=classes,
                          skip_bad_images=data_config.get('skip_bad_images'),
                          show_progress=jax.process_index() == 0)
    if meta['skipped']:
      log.warning('%s: left out %d files that are not decodable images (listed in %s)',
                  split_dir, len(meta['skipped']), os.path.join(out, 'meta.json'))

  _prepare_once(lambda: folder.is_prepared(out), prepare)
  source = folder.FolderSource(out)
  if split_classes is not None and split_classes != source.meta.get('split_classes',
                                                                   source.classes):
    raise DataError(f'the class folders of {split_dir} changed since it was prepared into '
                    f'{out}: delete {out} to prepare it again')
  if classes is not None and classes != source.classes:     # its labels index a stale list
    raise DataError(f'the class folders of the training split {train_dir} changed since '
                    f'{split} was prepared into {out} (its labels index them): delete {out} to '
                    f'prepare it again')
  return source


class TfdsSource:
  """A TFDS dataset prepared as array_record, read with `tfds.data_source`. Image features come
  back as their encoded bytes, decoded later by the transform (with PIL, as the original), so
  that reading labels or anything else decodes nothing."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    where = data_dir or 'the default TFDS data dir'
    try:
      self._builder = tfds.builder(name, data_dir=data_dir)
      features = dict(self._builder.info.features)
      self._source = self._builder.as_data_source(
          split, decoders={'image': tfds.decode.SkipDecoding()}
          if isinstance(features.get('image'), tfds.features.Image) else None)
      self.num_classes = getattr(features.get('label'), 'num_classes', None)
      self.class_names = getattr(features.get('label'), 'names', None)
    except Exception as e:
      raise DataError(
          f'TFDS dataset {name!r} (split {split!r}) could not be opened from {where} '
          f'({type(e).__name__}: {" ".join(str(e).split())[:200]}); prepare it as array_record '
          f'first (tfds build {name} --file_format=array_record), or set '
          f'--config.data.data_dir') from e
    if 'image' not in features or 'label' not in features:
      raise DataError(f'TFDS dataset {name!r} has features {sorted(features)}; snca-jax needs '
                      f'"image" and "label"')

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    return self._source[i]

  def __getitems__(self, keys):
    return self._source.__getitems__(list(keys))

  def labels(self, batch_size: int = 8192) -> np.ndarray:
    """All labels, in record order; images stay encoded (nothing is decoded)."""
    return _labels_of(self._source, batch_size)


def _labels_of(source, batch_size, key='label'):
  out = []
  for start in range(0, len(source), batch_size):
    records = source.__getitems__(list(range(start, min(start + batch_size, len(source)))))
    out.append(np.asarray([r[key] for r in records], np.int32))
  return np.concatenate(out) if out else np.zeros((0,), np.int32)


def num_classes(source) -> int | None:
  """The number of classes a source declares (folder classes, TFDS ClassLabel, a label map),
  if any."""
  if getattr(source, 'num_classes', None):
    return source.num_classes
  if hasattr(source, 'classes'):
    return len(source.classes)
  return num_classes(source.source) if isinstance(source, View) else None


def image_shape(data_config):
  return (data_config.image_size, data_config.image_size, data_config.channels)


def read_labels(source, batch_size: int = 8192) -> np.ndarray:
  """All labels of a source, in record order, as int32, decoding no image where the source
  can say (image folders keep them in a file; TFDS reads the label feature alone)."""
  if hasattr(source, 'labels'):
    return np.asarray(source.labels(), np.int32)
  return _labels_of(source, batch_size)


@dataclasses.dataclass(frozen=True)
class ReadBatch:
  """Record positions -> a batch dict; one batched read. Positions < 0 are padding (mask 0)."""
  source: Any

  def __call__(self, positions):
    positions = np.asarray(positions, np.int64)
    mask = positions >= 0
    records = self.source.__getitems__([int(p) for p in np.where(mask, positions, 0)])
    return {'image': [r['image'] for r in records],
            'label': np.asarray([r['label'] for r in records], np.int32),
            'index': np.where(mask, positions, 0).astype(np.int32),
            'mask': mask}


@dataclasses.dataclass(frozen=True)
class SeededTransform:
  """A grain map: `transform` with a fixed seed (the epoch's)."""
  transform: transforms.BatchTransform
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
    from absl import flags
    if not flags.FLAGS.is_parsed():      # grain's workers read absl flags (notebooks, tests)
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it)


def epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def train_dataset(source, *, global_batch_size: int, seed: int, epoch: int,
                  transform: transforms.BatchTransform, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """Epoch `epoch` as a MapDataset of this process's batches (the last partial batch dropped)."""
  s = epoch_seed(seed, epoch)
  ds = grain.MapDataset.range(len(source)).shuffle(seed=s)
  ds = ds.batch(global_batch_size, drop_remainder=True)
  ds = ds.map(ProcessShare(process_index, process_count)).map(ReadBatch(source))
  return ds.map(SeededTransform(transform, s))


def train_batches(source, *, start_batch: int = 0, num_threads: int = 1, worker_count: int = 0,
                  **kwargs) -> Iterator[dict]:
  """Iterates `train_dataset(source, **kwargs)` from batch `start_batch`, prefetching."""
  return _iterate(train_dataset(source, **kwargs), start_batch, num_threads, worker_count)


def eval_batches(source, *, global_batch_size: int, transform: transforms.BatchTransform,
                 process_index: int = 0, process_count: int = 1, num_threads: int = 1,
                 worker_count: int = 0) -> Iterator[dict]:
  """All records in order; the last batch padded, padding marked by `mask == False`."""
  n = len(source)
  num_batches = -(-n // global_batch_size)
  positions = np.full(num_batches * global_batch_size, -1, np.int64)
  positions[:n] = np.arange(n)
  ds = grain.MapDataset.source(positions.reshape(num_batches, global_batch_size))
  ds = ds.map(ProcessShare(process_index, process_count)).map(ReadBatch(source))
  ds = ds.map(SeededTransform(transform, 0))
  return _iterate(ds, 0, num_threads, worker_count)
