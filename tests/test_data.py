"""The Fashion-MNIST builder, the grain pipeline and the augmentations."""

import os

import numpy as np
import pytest

from snca_jax import distributed
from snca_jax import models
from snca_jax.data import fashion_mnist
from snca_jax.data import pipeline
from snca_jax.data import sources
from snca_jax.data import transforms
from snca_jax.errors import DataError


def _transform(kind='none', size=28):
  return transforms.BatchTransform(kind, size, channels=1)


def test_record_position_is_the_dense_index(fake_data_config, fake_idx_dir):
  source = sources.open_source(fake_data_config.data, 'train')
  images = fashion_mnist.read_idx(os.path.join(fake_idx_dir, 'train-images-idx3-ubyte.gz'))
  labels = fashion_mnist.read_idx(os.path.join(fake_idx_dir, 'train-labels-idx1-ubyte.gz'))
  assert len(source) == len(labels) == 96
  records = source.__getitems__(list(range(len(source))))
  assert [r['index'] for r in records] == list(range(96))
  assert np.array_equal(np.stack([r['image'][..., 0] for r in records]), images)
  assert np.array_equal(sources.read_labels(source, batch_size=10), labels)


def test_truncated_idx_file_is_refused(tmp_path):
  path = tmp_path / 'x-idx1-ubyte'
  path.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, 'big') + bytes(5))
  with pytest.raises(ValueError, match='truncated'):
    fashion_mnist.read_idx(str(path))


def test_missing_dataset_is_a_clear_error(tmp_path, fake_data_config):
  config = fake_data_config.data.copy_and_resolve_references()
  config.idx_dir = str(tmp_path / 'nothing')
  config.data_dir = str(tmp_path / 'tfds')
  config.download = False
  with pytest.raises(DataError, match='dataset-fashion-mnist'):
    sources.open_source(config, 'train')


def _epoch(source, **kw):
  args = dict(global_batch_size=16, seed=3, epoch=0, transform=_transform('crop_flip'))
  args.update(kw)
  return list(pipeline.train_batches(source, **args))


def test_train_batches_cover_the_epoch_and_are_deterministic(fake_data_config):
  source = sources.open_source(fake_data_config.data, 'train')
  a, b = _epoch(source), _epoch(source)
  assert len(a) == 96 // 16
  seen = np.concatenate([x['index'] for x in a])
  assert sorted(seen) == list(range(96))                        # a permutation
  for x, y in zip(a, b):
    assert np.array_equal(x['index'], y['index']) and np.array_equal(x['image'], y['image'])
  labels = sources.read_labels(source)
  assert all(np.array_equal(x['label'], labels[x['index']]) for x in a)
  c = _epoch(source, epoch=1)
  assert not np.array_equal(seen, np.concatenate([x['index'] for x in c]))


def test_resume_mid_epoch_gives_the_same_batches(fake_data_config):
  source = sources.open_source(fake_data_config.data, 'train')
  full = _epoch(source)
  rest = _epoch(source, start_batch=4)
  assert len(rest) == 2
  for x, y in zip(full[4:], rest):
    assert np.array_equal(x['index'], y['index']) and np.array_equal(x['image'], y['image'])


def test_processes_split_each_global_batch(fake_data_config):
  source = sources.open_source(fake_data_config.data, 'train')
  full = _epoch(source)
  parts = [_epoch(source, process_index=i, process_count=2) for i in range(2)]
  for g, p0, p1 in zip(full, *parts):
    assert np.array_equal(np.concatenate([p0['index'], p1['index']]), g['index'])
    assert np.array_equal(np.concatenate([p0['image'], p1['image']]), g['image'])


def test_eval_batches_pad_and_mask(fake_data_config):
  source = sources.open_source(fake_data_config.data, 'test')    # 40 records
  batches = list(pipeline.eval_batches(source, global_batch_size=16, transform=_transform()))
  assert [b['image'].shape[0] for b in batches] == [16, 16, 16]
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == 40 and not mask[40:].any()
  assert np.array_equal(np.concatenate([b['index'] for b in batches])[mask], np.arange(40))


def test_crop_flip():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 255, size=(64, 28, 28, 1)).astype(np.uint8)
  rngs = [np.random.default_rng(i) for i in range(64)]
  y = transforms.random_crop_flip(x, rngs, pad=2)
  assert y.shape == x.shape and y.dtype == np.uint8
  # Every output is a shifted (and maybe flipped) window of the zero-padded input.
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(8):
    windows = [padded[i, a:a + 28, b:b + 28] for a in range(5) for b in range(5)]
    windows += [w[:, ::-1] for w in windows]
    assert any(np.array_equal(y[i], w) for w in windows)


def test_normalize_on_the_device():
  x = np.random.default_rng(0).integers(0, 256, size=(4, 5, 5, 3)).astype(np.uint8)
  mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  want = (x / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(np.asarray(models.normalize_images(x, mean, std)), want,
                             atol=1e-5)


def test_unknown_augmentation():
  with pytest.raises(ValueError, match="unknown augmentation 'imagenett'"):
    transforms.BatchTransform('imagenett', 224)


def test_worker_processes_give_the_same_batches(fake_data_config):
  from absl import flags
  flags.FLAGS.mark_as_parsed()            # grain's worker processes read absl flags
  source = sources.open_source(fake_data_config.data, 'train')
  with_workers = _epoch(source, worker_count=2)
  for x, y in zip(with_workers, _epoch(source)):
    assert np.array_equal(x['index'], y['index']) and np.array_equal(x['image'], y['image'])
  assert len(with_workers) == 6


def test_readers_derived_from_the_cores():
  most, per = pipeline.THREAD_CORES, pipeline.THREADS_PER_WORKER
  # Both derived: threads alone up to THREAD_CORES cores, then worker processes.
  assert [pipeline.readers(0, -1, c) for c in (1, 2, most)] == [(1, 0), (2, 0), (most, 0)]
  assert pipeline.readers(0, -1, 16) == (per, 16 // per)
  assert pipeline.readers(0, -1, 100) == (per, 100 // per)
  # An explicit value stands; the other fills the cores.
  assert pipeline.readers(3, -1, 2) == (3, 0) and pipeline.readers(2, -1, 16) == (2, 8)
  assert pipeline.readers(0, 0, 16) == (16, 0) and pipeline.readers(0, 8, 16) == (2, 8)
  assert pipeline.readers(0, 32, 16) == (1, 32) and pipeline.readers(5, 3, 2) == (5, 3)
  # Every recipe but the demo's derives both; the cores are the process's own.
  from configs import cifar10_resnet18, fashion_mnist, folder, imagenet_resnet50
  for recipe in (cifar10_resnet18.get_config(), folder.get_config(),
                 imagenet_resnet50.get_config('folder')):
    assert (recipe.data.num_threads, recipe.data.worker_count) == (0, -1)
  d = fashion_mnist.get_config().data
  assert (d.num_threads, d.worker_count) == (1, 0)
  cores = distributed.local_cores()
  assert pipeline.readers(0, -1) == ((cores, 0) if cores <= most else (per, cores // per))


@pytest.mark.parametrize('num_threads,worker_count,cores', [(1, 0, None), (3, 0, None),
                                                            (0, -1, 6)])
def test_a_run_reads_its_epochs_through_one_iterator(fake_data_config, num_threads,
                                                     worker_count, cores, monkeypatch):
  """run_batches from any step: the batches of train_batches, epoch after epoch, bit for bit,
  whatever the threads and worker processes (those a 6-core host derives: 3 workers of 2
  threads)."""
  from absl import flags
  flags.FLAGS.mark_as_parsed()            # grain's worker processes read absl flags
  if cores:
    monkeypatch.setattr(distributed, 'local_cores', lambda: cores)
  source = sources.open_source(fake_data_config.data, 'train')
  want = [b for e in range(3) for b in _epoch(source, epoch=e)]
  got = list(pipeline.run_batches(source, num_epochs=3, start_step=4, global_batch_size=16,
                                  seed=3, transform=_transform('crop_flip'),
                                  num_threads=num_threads, worker_count=worker_count))
  assert len(want) == 18 and len(got) == 14
  for x, y in zip(want[4:], got):
    assert set(x) == set(y)
    assert all(np.array_equal(x[k], y[k]) for k in x)
