"""Image folders (`<root>/<split>/<class>/.../<image>`), prepared once into array_record.

The tree is read in torchvision `ImageFolder` order, the original's order: classes are the
sub-directories of the split sorted by name, and within a class the files found by walking it
(`sorted(os.walk(...))`, then each directory's file names sorted) whose extension is an image
extension (`images.IMG_EXTENSIONS`, case-insensitive); other files (`.DS_Store`, `Thumbs.db`, a
README) are ignored. Record `i` is that list's file `i`, so bank row `i` is the original's row
`i`.

Preparing reads every file once, checks that PIL decodes it (JPEGs at 1/8 scale, which still
reads their whole entropy-coded stream), and writes its bytes unchanged with its label, index
and path relative to the split directory:

    <prepared_dir>/<split>/records-00000-of-000NN.array_record   one msgpack record per image
    <prepared_dir>/<split>/labels.npy                             int32, in record order
    <prepared_dir>/<split>/meta.json                              classes, files, skipped files

Everything is written to a temporary directory that is renamed into place when complete, so an
interrupted prepare leaves nothing that looks prepared. A file that is not a decodable image
stops the prepare with its name, or with `skip_bad_images` is left out and counted.
"""

import collections
import concurrent.futures
import json
import os
import shutil
import time

import grain
import msgpack
import numpy as np
import tqdm
from array_record.python import array_record_module
from PIL import Image

from snca_jax.data import images
from snca_jax.errors import DataError

_SHARD_BYTES = 1 << 30
_META = 'meta.json'


def find_classes(split_dir: str) -> list[str]:
  """torchvision's `find_classes`: the sub-directories' names, sorted."""
  try:
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
  except OSError as e:
    raise DataError(f'cannot read the image folder {split_dir} ({e.strerror}): set '
                    f'--config.data.root to a folder holding <split>/<class>/<image> files') from e
  if not classes:
    raise DataError(f'{split_dir} has no class folders: images must be in '
                    f'{split_dir}/<class name>/')
  return classes


def list_images(split_dir: str, classes=None) -> list[tuple[str, int]]:
  """(path relative to `split_dir`, class index) of every image, in ImageFolder order."""
  classes = find_classes(split_dir) if classes is None else classes
  out = []
  for label, name in enumerate(classes):
    for root, _, files in sorted(os.walk(os.path.join(split_dir, name), followlinks=True)):
      rel = os.path.relpath(root, split_dir)
      out.extend((os.path.join(rel, f), label) for f in sorted(files)
                 if f.lower().endswith(images.IMG_EXTENSIONS))
  empty = sorted(set(classes) - {classes[label] for _, label in out})
  if empty:
    raise DataError(f'class folder(s) {", ".join(empty[:5])} in {split_dir} hold no image '
                    f'({", ".join(images.IMG_EXTENSIONS)}): add images or remove the folder')
  return out


def _read_checked(path: str) -> bytes:
  """The file's bytes, after PIL has decoded them (raises on anything not a whole image)."""
  with open(path, 'rb') as f:
    data = f.read()
  image = images.open_image(data)
  if image.format == 'JPEG':
    image.draft(image.mode, (1, 1))
  image.load()
  return data


def serialize(image: bytes, label: int, index: int, file: str) -> bytes:
  return msgpack.packb({'image': image, 'label': label, 'index': index, 'file': file})


def deserialize(record: bytes) -> dict:
  return msgpack.unpackb(record)


def prepare(split_dir: str, out_dir: str, *, skip_bad_images: bool = False,
            num_threads: int | None = None, show_progress: bool = True) -> dict:
  """Writes the prepared split of `split_dir` to `out_dir` (see the module doc); returns meta."""
  classes = find_classes(split_dir)
  files = list_images(split_dir, classes)
  tmp = f'{out_dir}.incomplete-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    meta = _write(split_dir, tmp, classes, files, skip_bad_images, num_threads, show_progress)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return meta


def _write(split_dir, tmp, classes, files, skip_bad_images, num_threads, show_progress):
  total_bytes = sum(os.path.getsize(os.path.join(split_dir, f)) for f, _ in files)
  num_shards = max(1, -(-total_bytes // _SHARD_BYTES))
  per_shard = -(-len(files) // num_shards)
  shard_names = [f'records-{i:05d}-of-{num_shards:05d}.array_record' for i in range(num_shards)]
  labels, kept, skipped = [], [], []
  writer, shard = None, -1
  t0 = time.time()
  bar = tqdm.tqdm(total=len(files), desc=f'preparing {split_dir}', unit='img',
                  disable=not show_progress, dynamic_ncols=True)
  with concurrent.futures.ThreadPoolExecutor(num_threads or os.cpu_count()) as pool:
    checked = _ordered_map(pool, _read_or_error, [os.path.join(split_dir, f) for f, _ in files])
    for (rel, label), (data, error) in zip(files, checked):
      bar.update(1)
      if error is not None:
        if not skip_bad_images:
          raise DataError(f'{os.path.join(split_dir, rel)} is not a decodable image ({error}): '
                          f'remove it, or set --config.data.skip_bad_images=True to leave out '
                          f'such files')
        skipped.append(rel)
        continue
      if len(kept) // per_shard != shard:
        if writer is not None:
          writer.close()
        shard = len(kept) // per_shard
        writer = array_record_module.ArrayRecordWriter(
            os.path.join(tmp, shard_names[shard]), 'group_size:1')
      writer.write(serialize(data, label, len(kept), rel))
      labels.append(label)
      kept.append(rel)
  bar.close()
  if writer is not None:
    writer.close()
  if not kept:
    raise DataError(f'no decodable image in {split_dir}')
  meta = {'split_dir': os.path.abspath(split_dir), 'classes': classes, 'num_records': len(kept),
          'shards': shard_names[:shard + 1], 'skipped': skipped,
          'seconds': round(time.time() - t0, 1)}
  np.save(os.path.join(tmp, 'labels.npy'), np.asarray(labels, np.int32))
  with open(os.path.join(tmp, 'files.txt'), 'w', encoding='utf-8') as f:
    f.writelines(name + '\n' for name in kept)
  with open(os.path.join(tmp, _META), 'w') as f:     # written last: marks a whole split
    json.dump(meta, f, indent=1)
  return meta


def _ordered_map(pool, fn, items, window: int = 1024):
  """pool.map with at most `window` results in flight (a split can be far larger than memory)."""
  pending = collections.deque()
  for item in items:
    pending.append(pool.submit(fn, item))
    if len(pending) >= window:
      yield pending.popleft().result()
  while pending:
    yield pending.popleft().result()


def _read_or_error(path):
  try:
    return _read_checked(path), None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    return None, f'{type(e).__name__}: {e}'


def is_prepared(out_dir: str) -> bool:
  return os.path.exists(os.path.join(out_dir, _META))


class FolderSource:
  """A prepared split: random access by record position, batched reads, labels without reading
  any image. Records are dicts {'image': encoded bytes, 'label', 'index', 'file'}."""

  def __init__(self, out_dir: str):
    with open(os.path.join(out_dir, _META)) as f:
      self.meta = json.load(f)
    self.directory = out_dir
    self.classes = self.meta['classes']
    self._records = grain.sources.ArrayRecordDataSource(
        [os.path.join(out_dir, name) for name in self.meta['shards']])
    if len(self._records) != self.meta['num_records']:
      raise DataError(f'{out_dir} holds {len(self._records)} records but its {_META} says '
                      f'{self.meta["num_records"]}: delete {out_dir} to prepare it again')

  def __len__(self):
    return self.meta['num_records']

  def __getitem__(self, i):
    return deserialize(self._records[int(i)])

  def __getitems__(self, keys):
    return [deserialize(r) for r in self._records.__getitems__(list(keys))]

  def labels(self) -> np.ndarray:
    return np.load(os.path.join(self.directory, 'labels.npy'))

  def __repr__(self):
    return f'FolderSource({self.directory!r}, {len(self)} records)'
