"""Image folders (`<root>/<split>/<class>/.../<image>`), prepared once into one file of bytes.

The tree is read in torchvision `ImageFolder` order (`listing.py`), so that record `i` is the
original's row `i`; labels index the training split's class list.

Preparing reads every file once, checks that PIL decodes it (JPEGs at 1/8 scale, which still
reads their whole entropy-coded stream), and writes its bytes unchanged, one after another:

    <prepared_dir>/<split>/images.bin    every image's bytes as read, in record order
    <prepared_dir>/<split>/offsets.npy   int64, num_records + 1: record i is images.bin's bytes
                                         offsets[i] to offsets[i + 1]
    <prepared_dir>/<split>/labels.npy    int32, in record order
    <prepared_dir>/<split>/files.txt     paths relative to the split directory, in record order
    <prepared_dir>/<split>/meta.json     classes (the list labels index: the training split's),
        split_classes (the split's own folders), skipped files

A record is read with one `os.pread`, which lets go of the GIL. An array_record file of msgpack
records (what this module wrote before, and still reads) cost the training process 1,102-1,103
us of CPU an image, readers included, where this file costs 1,072-1,090, and whole epochs read
at 0.86-0.87 of the cores' transform rate where this file gives 0.89-0.92 (2-core AMD EPYC;
BENCHMARKS.md, the input pipeline).

Everything is written to a temporary directory `<split>.incomplete-PID` that is renamed into
place when complete, so an interrupted prepare leaves nothing that looks prepared. A prepare
holds an exclusive lock (`fcntl.flock` on `<split>.lock`, removed when done) from start to end:
a second run preparing the same split waits, then uses the split the first one finished; and
the holder removes the temporaries that killed prepares left. A file that is not a decodable
image (or cannot be read) stops the prepare with its name, or with `skip_bad_images` is left
out and listed.
"""

import concurrent.futures
import contextlib
import fcntl
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import stat
import time

import grain
import msgpack
import numpy as np
import tqdm
from PIL import Image

from snca_jax import distributed
from snca_jax.data import images
from snca_jax.data import pipeline
from snca_jax.data.listing import find_classes, list_images
from snca_jax.errors import DataError
from snca_jax.lookahead import look_ahead

_META = 'meta.json'
_IMAGES = 'images.bin'
_OFFSETS = 'offsets.npy'
_WRITE_BUFFER = 1 << 22

log = logging.getLogger('snca_jax')
# Files are read and checked by threads of this process (two per core) on up to
# pipeline.THREAD_CORES cores; on more, where a split has at least PROCESS_MIN_FILES files, by
# worker processes (one per core, CHECK_THREADS threads each). Either takes CHUNK files a task,
# fewer where four tasks a reader would not fill IN_FLIGHT files. One process's threads share
# its GIL: on a GPU host's 16 cores, 32 threads prepared at 0.17 x 16 x one thread's rate
# (BENCHMARKS.md). A worker's start imports the program's modules again (seconds), hence the
# floor on the files; and, as with grain's workers, a script that prepares so needs the
# `if __name__ == '__main__':` guard (train.py and eval_knn.py have it).
PROCESS_MIN_FILES = 16384
CHECK_THREADS = 2
CHUNK = 64
IN_FLIGHT = 2048


def _read_checked(path: str) -> bytes:
  """The file's bytes, after PIL has decoded them (raises on anything not a whole image)."""
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)       # a FIFO does not block the open
  with open(fd, 'rb') as f:
    if not stat.S_ISREG(os.fstat(fd).st_mode):          # a FIFO, a device such as /dev/zero
      raise ValueError('not a regular file')
    data = f.read()
  image = images.open_image(data)
  if image.format == 'JPEG':
    image.draft(image.mode, (1, 1))
  image.load()
  return data


def _deserialize(record: bytes) -> dict:
  """A record of a split prepared into array_record (before 2026-12-05)."""
  return msgpack.unpackb(record)


@contextlib.contextmanager
def _locked(path: str):
  """Holds an exclusive flock on the file `path` (created, and removed when released); yields
  whether it is held (False where the file system has no locks: a warning, no lock)."""
  while True:
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
      raise DataError(f'cannot create the lock file {path} ({e.strerror}): set '
                      f'--config.data.prepared_dir to a writable folder') from e
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        log.info('waiting for another process preparing %s (it holds %s)',
                 path[:-len('.lock')], path)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:
      os.close(fd)
      log.warning('cannot lock %s (%s): preparing without a lock; do not prepare the same '
                  'split from two runs at once', path, e.strerror)
      yield False
      return
    try:                    # the holder before us may have removed the file: lock it anew
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except OSError:
      same = False
    if same:
      break
    os.close(fd)
  try:
    yield True
  finally:
    try:
      os.unlink(path)       # while still held, so no one waits on a removed file unawares
    except OSError:
      pass
    os.close(fd)


def read_meta(out_dir: str) -> dict:
  with open(os.path.join(out_dir, _META)) as f:
    return json.load(f)


def prepare(split_dir: str, out_dir: str, *, classes=None, skip_bad_images: bool = False,
            num_threads: int | None = None, num_workers: int | None = None,
            show_progress: bool = True) -> dict:
  """Writes the prepared split of `split_dir` to `out_dir` (see the module doc); returns meta.
  `classes`: the class list to label by (the training split's; default the split's own). If
  another run has prepared `out_dir` meanwhile (or had before), that is used, not redone.
  `num_workers` processes (default: see PROCESS_MIN_FILES; 0: none), or else `num_threads`
  threads of this process (default: two per core this process may use; PIL's header parsing
  holds the GIL, the reads and decodes do not; 1: this thread alone, which also writes), read
  and check the files. The records are the same whichever read them."""
  out_dir = os.path.abspath(out_dir)
  parent, name = os.path.split(out_dir)
  os.makedirs(parent, exist_ok=True)
  with _locked(f'{out_dir}.lock') as held:
    if is_prepared(out_dir):
      return read_meta(out_dir)
    if held:                          # no one else is preparing: any temporary is stale
      for entry in os.listdir(parent):
        if entry.startswith(f'{name}.incomplete-'):
          shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    split_classes = find_classes(split_dir)
    classes = split_classes if classes is None else list(classes)
    files = list_images(split_dir, classes)
    tmp = f'{out_dir}.incomplete-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
      meta = _write(split_dir, tmp, classes, split_classes, files, skip_bad_images,
                    num_threads, num_workers, show_progress)
      shutil.rmtree(out_dir, ignore_errors=True)
      os.rename(tmp, out_dir)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return meta


def _size(path: str) -> int:
  try:
    return os.path.getsize(path)
  except OSError:                     # a dangling symlink: reported when it is read
    return 0


def check_workers(num_workers: int | None, num_files: int, cores: int | None = None) -> int:
  """The worker processes that read and check `num_files` files (0: threads of this process):
  `num_workers` where given, else one per core on hosts of more than pipeline.THREAD_CORES
  cores for splits of at least PROCESS_MIN_FILES files."""
  if num_workers is not None:
    return num_workers
  cores = cores or distributed.local_cores()
  return cores if cores > pipeline.THREAD_CORES and num_files >= PROCESS_MIN_FILES else 0


def _checked_files(paths, num_threads, num_workers):
  """(pool or None, iterator of (bytes, error) for `paths`, in order). One thread is this one;
  else four tasks a reader are in flight, of up to CHUNK files each: a task a file cost one
  reader thread about a tenth of its rate in the pool's hand-offs (BENCHMARKS.md)."""
  if not num_workers and num_threads == 1:
    return None, map(_read_or_error, paths)
  if num_workers:
    readers, task = num_workers, _check_chunk
    pool = concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=multiprocessing.get_context('spawn'))   # JAX's threads: no fork
  else:
    readers, task = num_threads or 2 * distributed.local_cores(), _read_chunk
    pool = concurrent.futures.ThreadPoolExecutor(readers)
  size = max(1, min(CHUNK, len(paths) // (4 * readers), IN_FLIGHT // (4 * readers)))
  chunks = (paths[i:i + size] for i in range(0, len(paths), size))
  return pool, itertools.chain.from_iterable(
      _ordered_map(pool, task, chunks, window=4 * readers))


def _read_chunk(paths):
  """A reader thread's task: _read_or_error of each path."""
  return [_read_or_error(path) for path in paths]


def _check_chunk(paths):
  """A worker process's task: _read_or_error of each path, CHECK_THREADS at a time."""
  with concurrent.futures.ThreadPoolExecutor(CHECK_THREADS) as pool:
    return list(pool.map(_read_or_error, paths))


def _write(split_dir, tmp, classes, split_classes, files, skip_bad_images, num_threads,
           num_workers, show_progress):
  labels, kept, skipped, offsets = [], [], [], [0]
  t0 = time.time()
  bar = tqdm.tqdm(total=len(files), desc=f'preparing {split_dir}', unit='img',
                  disable=not show_progress, dynamic_ncols=True)
  try:      # the bar, the file and the readers closed on every path
    with contextlib.ExitStack() as stack:
      out = stack.enter_context(open(os.path.join(tmp, _IMAGES), 'wb', buffering=_WRITE_BUFFER))
      pool, checked = _checked_files([os.path.join(split_dir, f) for f, _ in files],
                                     num_threads, check_workers(num_workers, len(files)))
      if pool is not None:
        stack.callback(pool.shutdown, wait=True, cancel_futures=True)
      for (rel, label), (data, error) in zip(files, checked):
        bar.update(1)
        if error is not None:
          if not skip_bad_images:
            raise DataError(f'{os.path.join(split_dir, rel)} is not a decodable image ({error}): '
                            f'remove it, or set --config.data.skip_bad_images=True to leave out '
                            f'such files')
          skipped.append(rel)
          continue
        out.write(data)
        offsets.append(offsets[-1] + len(data))
        labels.append(label)
        kept.append(rel)
  finally:
    bar.close()
  if not kept:
    raise DataError(f'no decodable image in {split_dir}')
  meta = {'split_dir': os.path.abspath(split_dir), 'classes': classes,
          'split_classes': split_classes, 'num_records': len(kept), 'images': _IMAGES,
          'skipped': skipped, 'seconds': round(time.time() - t0, 1)}
  np.save(os.path.join(tmp, _OFFSETS), np.asarray(offsets, np.int64))
  np.save(os.path.join(tmp, 'labels.npy'), np.asarray(labels, np.int32))
  with open(os.path.join(tmp, 'files.txt'), 'w', encoding='utf-8') as f:
    f.writelines(name + '\n' for name in kept)
  with open(os.path.join(tmp, _META), 'w') as f:     # written last: marks a whole split
    json.dump(meta, f, indent=1)
  return meta


def _ordered_map(pool, fn, items, window: int = 1024):
  """pool.map with at most `window` results in flight (a split can be far larger than memory)."""
  return (f.result() for f in look_ahead((pool.submit(fn, item) for item in items), window))


def _read_or_error(path):
  try:
    return _read_checked(path), None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    return None, f'{type(e).__name__}: {e}'


def is_prepared(out_dir: str) -> bool:
  return os.path.exists(os.path.join(out_dir, _META))


def _load(out_dir: str, name: str) -> np.ndarray:
  path = os.path.join(out_dir, name)
  try:
    return np.load(path)
  except (OSError, ValueError) as e:
    raise DataError(f'cannot read {path} ({type(e).__name__}: {" ".join(str(e).split())}): '
                    f'delete {out_dir} to prepare it again') from e


class FolderSource:
  """A prepared split: random access by record position, batched reads, labels without reading
  any image. Records are dicts {'image': the encoded bytes, 'label', 'index'}; `files()` gives
  their paths. Safe to share between threads (`os.pread` has no file position) and to send to
  grain's worker processes (each opens the file again)."""

  def __init__(self, out_dir: str):
    self.meta = read_meta(out_dir)
    self.directory = out_dir
    self.classes = self.meta['classes']
    n = self.meta['num_records']
    self._labels = _load(out_dir, 'labels.npy')
    if 'shards' in self.meta:       # prepared into array_record before 2026-12-05: still read
      self._records = grain.sources.ArrayRecordDataSource(
          [os.path.join(out_dir, name) for name in self.meta['shards']])
      found = min(len(self._records), len(self._labels))
      log.info('%s was prepared by an earlier snca-jax (array_record), which reads slower: '
               'delete it to prepare it again', out_dir)
    else:
      self._records = None
      self._offsets = _load(out_dir, _OFFSETS)
      found = min(len(self._offsets) - 1, len(self._labels))
      size = _size(os.path.join(out_dir, self.meta['images']))
      if found == n and self._offsets[-1] != size:
        raise DataError(f'{os.path.join(out_dir, self.meta["images"])} holds {size} bytes where '
                        f'its {_OFFSETS} says {self._offsets[-1]}: delete {out_dir} to prepare '
                        f'it again')
    if found != n:
      raise DataError(f'{out_dir} holds {found} records but its {_META} says {n}: delete '
                      f'{out_dir} to prepare it again')
    self._fd = None
    self._open()

  def _open(self):
    if self._records is None:
      self._fd = os.open(os.path.join(self.directory, self.meta['images']), os.O_RDONLY)

  def __setstate__(self, state):    # a copy (a worker process's) opens the file itself
    self.__dict__.update(state, _fd=None)
    self._open()

  def __del__(self, close=os.close):      # os may be gone when the interpreter exits
    if getattr(self, '_fd', None) is not None:
      close(self._fd)

  def __len__(self):
    return self.meta['num_records']

  def __getitem__(self, i):
    return self.__getitems__([i])[0]

  def __getitems__(self, keys):
    keys = [int(k) for k in keys]
    if self._records is not None:
      return [_deserialize(r) for r in self._records.__getitems__(keys)]
    n = len(self)
    if any(not 0 <= k < n for k in keys):
      raise IndexError(f'a record position out of 0..{n - 1} in {self.directory}')
    offsets, out = self._offsets, []
    for k in keys:
      start, end = int(offsets[k]), int(offsets[k + 1])
      data = os.pread(self._fd, end - start, start)
      if len(data) != end - start:
        raise DataError(f'{os.path.join(self.directory, self.meta["images"])} ends before '
                        f'record {k}: delete {self.directory} to prepare it again')
      out.append({'image': data, 'label': int(self._labels[k]), 'index': k})
    return out

  def files(self) -> list[str]:
    """Each record's path relative to the split directory, in record order."""
    with open(os.path.join(self.directory, 'files.txt'), encoding='utf-8') as f:
      return f.read().splitlines()

  def labels(self) -> np.ndarray:
    return self._labels.copy()

  def __repr__(self):
    return f'FolderSource({self.directory!r}, {len(self)} records)'
