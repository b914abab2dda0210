"""A TFDS image dataset written without TensorFlow, for the tests: the image-folder tree's JPEG
and PNG files as `tfds.features.Image` bytes in array_record, in a shuffled record order."""

import os

import numpy as np
import tensorflow_datasets as tfds

from snca_jax.data import listing


class PhotosTfds(tfds.core.GeneratorBasedBuilder):
  """`image` (encoded JPEG/PNG of any size), `label` (4 classes), `file_name`."""

  VERSION = tfds.core.Version('1.0.0')
  ROOT = None        # set by the test: an image-folder tree with train/ and val/

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(num_classes=4),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in ('train', 'val')}

  def _generate_examples(self, split):
    split_dir = os.path.join(self.ROOT, split)
    files = listing.list_images(split_dir)
    for i in np.random.default_rng(0).permutation(len(files)):
      rel, label = files[i]
      with open(os.path.join(split_dir, rel), 'rb') as f:
        data = f.read()
      yield rel, {'image': data, 'label': label, 'file_name': rel}
