"""Fashion-MNIST as a TFDS dataset of plain tensors, written as array_record (no TensorFlow).

TFDS's own `fashion_mnist` builder encodes PNG images, which needs TensorFlow. This builder
stores the raw pixels as a `tfds.features.Tensor`, so it is prepared and read with numpy alone.

Source files, in this order of preference:
  1. the four IDX files in `idx_dir` (default: Debian's `dataset-fashion-mnist` package,
     /usr/share/datasets/fashion-mnist), gzipped or not;
  2. otherwise, unless `download=False`, TFDS's download manager fetches them from the URLs
     that TFDS's own `fashion_mnist` builder uses.

Records are written in file order (`disable_shuffling`), so the record position is the
example's dense index; it is stored as `index` too, and the tests check that they agree.
"""

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

DEFAULT_IDX_DIR = '/usr/share/datasets/fashion-mnist'
URL = 'https://storage.googleapis.com/tensorflow/tf-keras-datasets/'
_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
               'Sneaker', 'Bag', 'Ankle boot')


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally gzipped) into a numpy array."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f'{path} is not an IDX file of unsigned bytes')
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  offset = 4 + 4 * ndim
  if len(data) - offset != int(np.prod(shape)):
    raise ValueError(f'{path} is truncated: expected {int(np.prod(shape))} values of shape '
                     f'{shape}, found {len(data) - offset}')
  return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def find_idx_file(idx_dir: str, stem: str):
  for name in (stem + '.gz', stem):
    path = os.path.join(idx_dir, name)
    if os.path.exists(path):
      return path
  return None


def has_idx_files(idx_dir: str) -> bool:
  return all(find_idx_file(idx_dir, stem) for stems in _FILES.values() for stem in stems)


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from IDX files, as uint8 tensors with their dense index."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Raw uint8 pixels, label and dense index; array_record.'}

  def __init__(self, *, idx_dir: str = DEFAULT_IDX_DIR, download: bool = True, **kwargs):
    self._idx_dir = idx_dir
    self.download = download
    super().__init__(**kwargs)

  def _info(self):
    return self.dataset_info_from_configs(
        description='Fashion-MNIST (Xiao et al. 2017) read from its IDX files.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            'label': tfds.features.Tensor(shape=(), dtype=np.int64),
            'index': tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    paths = {}
    for split, stems in _FILES.items():
      local = [find_idx_file(self._idx_dir, stem) for stem in stems]
      if all(local):
        paths[split] = local
      elif not self.download:
        raise FileNotFoundError(f'no {" and ".join(stems)} in {self._idx_dir}')
      else:
        paths[split] = [dl_manager.download(URL + stem + '.gz') for stem in stems]
    return {split: self._generate_examples(*map(str, p)) for split, p in paths.items()}

  def _generate_examples(self, images_path, labels_path):
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.shape[0] != labels.shape[0]:
      raise ValueError(f'{images_path} has {images.shape[0]} images but {labels_path} has '
                       f'{labels.shape[0]} labels')
    for i in range(images.shape[0]):
      yield i, {'image': images[i][:, :, None], 'label': int(labels[i]), 'index': i}
