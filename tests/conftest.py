"""Tests run on the CPU with 8 simulated devices, so that every sharding is exercised.

Compiled programs are kept in a persistent XLA cache in the repository (`.cache/xla`, ignored
by git), shared by the test processes and by every train.py / eval_knn.py / worker process the
tests start (they inherit the environment): the same tiny programs are compiled once, not in
each of the dozens of processes that run them. A fresh clone starts with an empty cache.
"""

import gzip
import os
import subprocess
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.cache', 'xla'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
# XLA's backend (LLVM) optimisations cost the tiny test programs more compile time than they
# save in run time (a quarter of the suite's time): off in the tests and in every process they
# start. Results are checked against references with tolerances, or against runs made with the
# same flags.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def subprocess_env(devices=None, **extra):
  """The environment of a process a test starts: the repository on its path, the tests' XLA
  flags and cache, and `devices` simulated CPU devices (None: the program's default, one)."""
  env = dict(os.environ, PYTHONPATH=ROOT, **extra)
  env['XLA_FLAGS'] = TEST_XLA_FLAGS + (
      f' --xla_force_host_platform_device_count={devices}' if devices else '')
  return env


def write_idx(path, array):
  """Writes a uint8 array as a gzipped IDX file."""
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 8, array.ndim]) + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.tobytes())


def make_fake_fashion_mnist(directory, n_train=96, n_test=40, seed=0):
  """IDX files of a small, learnable stand-in for Fashion-MNIST: class y is noise brightened
  by 20 y, with a brighter 12 x 12 square at a random place. What tells the classes apart
  (brightness) survives the crops, flips and global pooling of a ResNet."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for prefix, n in (('train', n_train), ('t10k', n_test)):
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 28, 28))
    for i, y in enumerate(labels):
      r, c = rng.integers(0, 16, 2)
      images[i] += 20 * y
      images[i, r:r + 12, c:c + 12] += 40
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


# An image-folder tree of real encoded files in the formats photo collections hold.
FORMATS = (('JPEG', 'RGB', '.jpg'), ('PNG', 'RGB', '.png'), ('JPEG', 'L', '.JPEG'),
           ('PNG', 'RGBA', '.PNG'), ('JPEG', 'CMYK', '.jpeg'), ('PNG', 'L', '.png'),
           ('PNG', 'P', '.png'))
SIZES = ((20, 24), (37, 53), (64, 48), (150, 120), (333, 500), (600, 410), (96, 96))
COLOURS = ((220, 40, 40), (40, 200, 60), (50, 60, 230), (230, 220, 40))


def encode_image(array, fmt, mode, quality=90):
  """uint8 RGB array -> bytes of `fmt` in PIL `mode`."""
  import io
  from PIL import Image
  image = Image.fromarray(array, 'RGB')
  image = image.convert(mode) if mode != 'P' else image.convert('P', palette=Image.ADAPTIVE)
  buf = io.BytesIO()
  image.save(buf, fmt, **({'quality': quality} if fmt == 'JPEG' else {}))
  return buf.getvalue()


def class_image(label, h, w, rng):
  """A learnable picture: the class's colour, a darker square at a random place, noise."""
  x = np.empty((h, w, 3), np.float32)
  x[:] = COLOURS[label]
  y0, x0 = rng.integers(0, max(h // 2, 1)), rng.integers(0, max(w // 2, 1))
  x[y0:y0 + h // 3, x0:x0 + w // 3] *= 0.4
  x += rng.normal(0, 12, x.shape)
  return x.clip(0, 255).astype(np.uint8)


def make_image_tree(root, classes=('Bird', 'cat', 'dog', 'zebra'), per_class=None, seed=0):
  """root/{train,val}/<class>/... with JPEG and PNG files, RGB, grayscale, RGBA, CMYK and
  palette, 20 to 600 pixels, one colour JPEG in 14 with stray bytes before its end marker
  (libjpeg warns, PIL decodes it); a nested sub-folder, and files that are not images. Returns
  {split: number of images}."""
  per_class = per_class or {'train': 10, 'val': 4}
  rng = np.random.default_rng(seed)
  k = 0
  for split, n in per_class.items():
    for label, name in enumerate(classes):
      d = os.path.join(root, split, name)
      os.makedirs(os.path.join(d, 'more'), exist_ok=True)
      for i in range(n):
        fmt, mode, ext = FORMATS[k % len(FORMATS)]
        h, w = SIZES[k % len(SIZES)]
        k += 1
        sub = 'more' if i == n - 1 else ''
        data = encode_image(class_image(label, h, w, rng), fmt, mode)
        if (fmt, mode) == ('JPEG', 'RGB') and k % 14 == 1:       # 'Corrupt JPEG data'
          data = data[:-2] + b'\xab' * 64 + data[-2:]
        with open(os.path.join(d, sub, f'{name}_{i:03d}{ext}'), 'wb') as f:
          f.write(data)
      for junk in ('.DS_Store', 'Thumbs.db', 'README.txt'):
        with open(os.path.join(d, junk), 'wb') as f:
          f.write(b'not an image')
  return {split: n * len(classes) for split, n in per_class.items()}


@pytest.fixture(scope='session')
def image_tree(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('photos'))
  make_image_tree(root)
  return root


@pytest.fixture(scope='session')
def photos_tfds(image_tree, tmp_path_factory):
  """A TFDS data dir holding `photos_tfds`: image_tree's files, records in shuffled order."""
  import fake_tfds
  data_dir = str(tmp_path_factory.mktemp('tfds_photos'))
  fake_tfds.PhotosTfds.ROOT = image_tree
  fake_tfds.PhotosTfds(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return data_dir


def final_state(workdir):
  """(latest step, {leaf path: array}) of a workdir's latest checkpoint, on one device."""
  from snca_jax import checkpoint
  from snca_jax import mesh as mesh_lib
  mngr = checkpoint.manager(checkpoint.checkpoint_dir(workdir), read_only=True)
  step = mngr.latest_step()
  state = checkpoint.restore_as_saved(mngr, step, mesh_lib.make_mesh(jax.devices()[:1]))
  return step, {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(state)}


def use_devices(monkeypatch, n):
  """Whatever makes the default mesh (train.train_and_evaluate, the evaluator) uses the first n
  of this process's devices: a run on n devices without a process of its own."""
  from snca_jax import mesh as mesh_lib
  original = getattr(mesh_lib.make_mesh, 'original', mesh_lib.make_mesh)

  def make_mesh(devices=None):
    return original(jax.devices()[:n] if devices is None else devices)
  make_mesh.original = original
  monkeypatch.setattr(mesh_lib, 'make_mesh', make_mesh)


def run_until(cmd, metrics, lines, sig, env):
  """Runs `cmd` in the repository, sends `sig` once the file `metrics` has `lines` lines;
  returns (exit code, stdout, stderr)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  p = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
  try:
    deadline = time.time() + 300
    while p.poll() is None and time.time() < deadline:
      if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= lines:
        p.send_signal(sig)
        break
      time.sleep(0.002)
    out, err = p.communicate(timeout=300)
  finally:
    if p.poll() is None:
      p.kill()
  return p.returncode, out, err


@pytest.fixture
def tfds_mock(monkeypatch):
  """TFDS's mock data as a prepared dataset gives it: images as encoded bytes. Without
  TensorFlow the mock cannot encode its fake images, so PNG-encode them with PIL; and its
  source answers `source[i]` only (tfds 4.9.10's mock `__getitems__` misses its argument), so
  read batches one record at a time."""
  import io
  import tensorflow_datasets as tfds
  from PIL import Image
  from tensorflow_datasets.core.data_sources import array_record as tfds_array_record
  from tensorflow_datasets.core.features import image_feature

  def encode_png(self, np_image):
    buf = io.BytesIO()
    Image.fromarray(np_image[..., 0] if np_image.shape[-1] == 1 else np_image).save(buf, 'PNG')
    return buf.getvalue()

  monkeypatch.setattr(image_feature._ImageEncoder, '_encode_image', encode_png)
  monkeypatch.setattr(tfds_array_record.ArrayRecordDataSource, '__getitems__',
                      lambda self, keys: [self[k] for k in keys])
  with tfds.testing.mock_data(num_examples=24):
    yield


def weighted_knn_reference(queries, query_labels, database, database_labels, *, k, sigma,
                           ks=(1, 5)):
  """Weighted kNN top-k accuracies from the definition (docs/METHOD.md), in float64 numpy:
  each query's k most similar database rows (rows labelled < 0 are padding) vote for their
  label with weight exp(similarity / sigma); ties between classes go to the lower index."""
  queries, database = np.asarray(queries, np.float64), np.asarray(database, np.float64)
  query_labels, database_labels = np.asarray(query_labels), np.asarray(database_labels)
  sims = queries @ database.T
  sims[:, database_labels < 0] = -np.inf
  nearest = np.argsort(-sims, axis=1, kind='stable')[:, :k]
  weights = np.exp(np.take_along_axis(sims, nearest, 1) / sigma)
  scores = np.zeros((len(queries), int(max(query_labels.max(), database_labels.max())) + 1))
  np.add.at(scores, (np.arange(len(queries))[:, None], database_labels[nearest]), weights)
  order = np.argsort(-scores, axis=1, kind='stable')
  return {j: float(np.mean(np.any(order[:, :j] == query_labels[:, None], axis=1)))
          for j in ks}


def assert_accuracy_matches(result, reference, num_queries, prefix='top'):
  """The evaluator's top-k against the float64 reference: equal but for at most one query
  whose neighbours or votes are tied to float32's last bit."""
  for j, want in reference.items():
    assert abs(result[f'{prefix}{j}'] - want) <= 1 / num_queries + 1e-9, (j, result, reference)


# The slowest files first (seconds of a 2-core run from a fresh clone, most first: 110 to 11 on
# the AMD EPYC, 2026-12-05). `make test` hands whole files to its two pytest-xdist workers
# (--dist loadfile) in collection order: a long file started last would leave the other worker
# idle at the end.
SLOW_FIRST = ('test_robustness', 'test_benchmarks', 'test_convert', 'test_multihost', 'test_nca',
              'test_train', 'test_folder', 'test_state', 'test_experiments', 'test_models',
              'test_knn', 'test_cli_errors', 'test_tfds_images', 'test_data')


def pytest_collection_modifyitems(items):
  def rank(item):
    name = os.path.splitext(os.path.basename(str(item.fspath)))[0]
    return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)
  items.sort(key=rank)         # stable: each file's tests keep their order
