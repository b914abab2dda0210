"""Data sources: a split's records by position, with their labels.

Every training example carries its dense index `0 <= i < N`: its record position in the
split's data source, which is stable for a prepared dataset. The memory bank is indexed by it.

`open_source` opens Fashion-MNIST (IDX files, prepared as array_record by fashion_mnist.py),
an image folder (prepared by folder.py) or a TFDS dataset, and the view of it that training,
the fine labels or the held-out classes need (`View`).
"""

import logging
import os
from typing import Protocol, Sequence

import jax
import numpy as np
import tensorflow_datasets as tfds

from snca_jax.data import fetch
from snca_jax.data import folder
from snca_jax.data import listing
from snca_jax.data.fashion_mnist import DEFAULT_IDX_DIR, FashionMnistIdx
from snca_jax.errors import DataError

log = logging.getLogger('snca_jax')


class Source(Protocol):
  """Random access to a split's records, positions 0..len-1: each a dict with at least
  `image` (encoded bytes, or an array) and `label`. A source may also have
    labels()        all labels in record order, reading no image (`read_labels` uses it)
    num_classes     the number of classes it declares (`num_classes` reads it)
    classes         image folders: the class names, label i being classes[i]
    class_names     TFDS: the label feature's names
  Fashion-MNIST's TFDS data source, `folder.FolderSource`, `TfdsSource` and `View` are ones."""

  def __len__(self) -> int: ...

  def __getitem__(self, i: int) -> dict: ...

  def __getitems__(self, keys: Sequence[int]) -> list[dict]: ...


VIEWS = ('train', 'fine', 'held_out')


def open_source(data_config, split: str, view: str = 'train') -> Source:
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
  label_map = tuple(data_config.label_map)
  label_key = data_config.label_key
  train_classes = tuple(data_config.train_classes)
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
    if missing and split == data_config.train_split:
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

  def __init__(self, source: Source, positions=None, label_map=(), label_key='label',
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
  name, data_dir = data_config.name, data_config.data_dir or None
  if name == 'fashion_mnist':
    idx_dir = data_config.idx_dir or DEFAULT_IDX_DIR
    tfds_dir = data_dir or os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')
    builder = FashionMnistIdx(idx_dir=idx_dir, download=data_config.download,
                              data_dir=tfds_dir, file_format='array_record')
    fetch.prepare_once(builder.is_prepared,
                       lambda: fetch.prepare_fashion_mnist(builder, idx_dir))
    return builder.as_data_source(split)
  if name == 'folder':
    return _open_folder(data_config, split)
  return TfdsSource(name, split, data_dir)


def prepared_dir(data_config) -> str:
  root = os.path.abspath(os.path.expanduser(data_config.root))
  return os.path.abspath(os.path.expanduser(data_config.prepared_dir or
                                            os.path.join(root, 'snca_prepared')))


def _open_folder(data_config, split: str) -> folder.FolderSource:
  if not data_config.root:
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
  train_dir = os.path.join(root, data_config.train_split)
  train_out = os.path.join(prepared_dir(data_config), data_config.train_split)
  if os.path.isdir(train_dir):
    classes = listing.find_classes(train_dir)
  elif folder.is_prepared(train_out):
    classes = folder.read_meta(train_out)['classes']
  elif folder.is_prepared(out):
    classes = None                    # nothing to check against: as it was prepared
  else:
    raise DataError(f'no folder {train_dir} (the training split) to take the class list from: '
                    f'the labels of {split_dir} are indices into it; set '
                    f'--config.data.train_split to its name')
  split_classes = listing.find_classes(split_dir) if os.path.isdir(split_dir) else None
  if split_classes is not None and classes is not None:
    listing.check_classes(split_dir, split_classes, classes, train_dir)

  def prepare():
    try:
      os.makedirs(os.path.dirname(out), exist_ok=True)
    except OSError as e:
      raise DataError(f'cannot write the prepared dataset to {os.path.dirname(out)} '
                      f'({e.strerror}): set --config.data.prepared_dir to a writable folder '
                      f'(shared by all hosts)') from e
    meta = folder.prepare(split_dir, out, classes=classes,
                          skip_bad_images=data_config.skip_bad_images,
                          show_progress=jax.process_index() == 0)
    if meta['skipped']:
      log.warning('%s: left out %d files that are not decodable images (listed in %s)',
                  split_dir, len(meta['skipped']), os.path.join(out, 'meta.json'))

  fetch.prepare_once(lambda: folder.is_prepared(out), prepare)
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


def num_classes(source: Source) -> int | None:
  """The number of classes a source declares (folder classes, TFDS ClassLabel, a label map),
  if any."""
  if getattr(source, 'num_classes', None):
    return source.num_classes
  if hasattr(source, 'classes'):
    return len(source.classes)
  return num_classes(source.source) if isinstance(source, View) else None


def image_shape(data_config):
  return (data_config.image_size, data_config.image_size, data_config.channels)


def read_labels(source: Source, batch_size: int = 8192) -> np.ndarray:
  """All labels of a source, in record order, as int32, decoding no image where the source
  can say (image folders keep them in a file; TFDS reads the label feature alone)."""
  if hasattr(source, 'labels'):
    return np.asarray(source.labels(), np.int32)
  return _labels_of(source, batch_size)
