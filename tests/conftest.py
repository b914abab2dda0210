"""Tests run on the CPU with 8 simulated devices, so that every sharding is exercised."""

import gzip
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def write_idx(path, array):
  """Writes a uint8 array as a gzipped IDX file."""
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 8, array.ndim]) + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.tobytes())


def make_fake_fashion_mnist(directory, n_train=96, n_test=40, seed=0):
  """IDX files of a small, learnable stand-in for Fashion-MNIST: each class is a bright
  horizontal band at its own height, plus noise."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for prefix, n in (('train', n_train), ('t10k', n_test)):
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, y in enumerate(labels):
      images[i, 2 + 2 * y:5 + 2 * y, 4:24] = 220
    write_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'), images)
    write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'), labels)
  return directory


@pytest.fixture(scope='session')
def fake_idx_dir(tmp_path_factory):
  return make_fake_fashion_mnist(str(tmp_path_factory.mktemp('idx')))


@pytest.fixture(scope='session')
def fake_data_config(fake_idx_dir, tmp_path_factory):
  """A data config that reads the fake Fashion-MNIST into a private TFDS dir."""
  from configs import fashion_mnist
  config = fashion_mnist.get_config()
  config.data.idx_dir = fake_idx_dir
  config.data.data_dir = str(tmp_path_factory.mktemp('tfds'))
  return config
