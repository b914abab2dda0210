"""The input pipeline: a data source's records read in batches by grain.

Every record is read with its position in the source, `index`, the example's dense bank row
(`sources.py`). A training epoch is a grain `MapDataset`: a seeded permutation of the record
positions, cut into global batches, of which each process keeps its own contiguous share; that
share is read with one batched `__getitems__` call and augmented with one generator per
example, seeded by (epoch seed, example index). Batch `k` of epoch `e` is therefore a pure
function of (seed, e, k), and each process's share of it does not depend on the number of
processes: resuming at any batch gives exactly the batches an uninterrupted run would have
seen.

A run reads all its epochs through one iterator (`run_batches`: the epochs' datasets
concatenated), so that grain's worker processes and prefetch threads are started once and
keep reading the next epoch's first batches while the last one is evaluated.

Who reads (`readers`): threads where a process has a few cores, worker processes of
THREADS_PER_WORKER threads each where it has more. Decoding and resizing release Python's GIL,
but the rest of an example's work holds it (a fifth of the ImageNet transform's time), so the
threads of one process stop scaling at about five cores; each worker process has a GIL of its
own, and costs the training process about 15 us an image to receive from
(`benchmarks/input_pipeline.py --end_to_end`).
"""

import dataclasses
from typing import Any, Iterator

import grain
import numpy as np

from snca_jax import distributed
from snca_jax.data import transforms


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


# Threads alone on up to THREAD_CORES cores: on 2 (AMD EPYC), threads read a whole epoch at
# 0.89-0.92 of the cores' transform rate, worker processes at 0.62-0.67 (0.72-0.79 once
# started). Beyond, worker processes of THREADS_PER_WORKER threads: holding the GIL a fifth
# of an example's time, two threads keep it about 40% busy, while one's decode overlaps the
# other's Python.
THREAD_CORES = 4
THREADS_PER_WORKER = 2


def readers(num_threads: int, worker_count: int, cores: int | None = None) -> tuple[int, int]:
  """(threads in each reading process, grain worker processes) for `data.num_threads` and
  `data.worker_count` on `cores` (default: the cores this process may use). 0 threads and -1
  workers are derived from the cores, an explicit value stands:
    both derived: up to THREAD_CORES cores, one thread per core in this process; more,
                  cores // THREADS_PER_WORKER workers of THREADS_PER_WORKER threads
    threads t:    workers to fill the cores with processes of t threads (none where t covers
                  them)
    workers w:    the cores shared among them (all of them in this process where w = 0)"""
  cores = cores or distributed.local_cores()
  if num_threads == 0 and worker_count < 0:
    if cores <= THREAD_CORES:
      return cores, 0
    return THREADS_PER_WORKER, cores // THREADS_PER_WORKER
  if worker_count < 0:
    return num_threads, 0 if num_threads >= cores else cores // num_threads
  return num_threads or max(1, cores // max(worker_count, 1)), worker_count


def _iterate(ds: grain.MapDataset, start: int, num_threads: int, worker_count: int):
  """`ds` from `start` on, read by the `readers(num_threads, worker_count)`: threads in this
  process, or in each worker process."""
  ds = ds[start:]
  num_threads, worker_count = readers(num_threads, worker_count)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=max(4, num_threads)))
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


def run_batches(source, *, num_epochs: int, start_step: int = 0, num_threads: int = 1,
                worker_count: int = 0, **kwargs) -> Iterator[dict]:
  """Every batch of epochs 0 .. num_epochs - 1 from the run's step `start_step` on, epoch after
  epoch (`train_dataset(source, epoch=e, **kwargs)` each, the same batches), through one
  iterator: its worker processes and threads live as long as the run."""
  epochs = [train_dataset(source, epoch=e, **kwargs) for e in range(num_epochs)]
  return _iterate(grain.MapDataset.concatenate(epochs), start_step, num_threads, worker_count)


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
