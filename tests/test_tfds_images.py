"""TFDS image datasets through `tfds.data_source`: encoded images decoded by the transform,
labels read without decoding, end to end. On a real array_record dataset of JPEG and PNG files
(written here without TensorFlow), and on TFDS's own mock data for cifar10 and imagenet2012."""


import os

import numpy as np
import pytest
from PIL import Image

from snca_jax import checkpoint
from snca_jax import evaluate
from snca_jax import train
from snca_jax.data import sources

from conftest import assert_accuracy_matches, weighted_knn_reference



def _config(name, data_dir, image_size=32, eval_augment='imagenet_eval'):
  from configs import imagenet_resnet18
  c = imagenet_resnet18.get_config()
  c.data.name, c.data.data_dir = name, data_dir
  c.data.eval_split = 'val' if name == 'photos_tfds' else c.data.eval_split
  c.data.num_classes = 0                        # from the dataset's ClassLabel
  c.data.image_size, c.data.eval_augment = image_size, eval_augment
  c.data.num_threads, c.data.worker_count = 2, 0
  c.model, c.low_dim, c.batch_size, c.num_epochs = 'tiny_resnet', 16, 8, 1
  c.knn.batch_size, c.log_every_steps = 8, 1
  return c


def test_records_are_the_encoded_files_and_labels_need_no_decode(photos_tfds, image_tree,
                                                                 monkeypatch):
  source = sources.open_source(_config('photos_tfds', photos_tfds).data, 'train')
  assert len(source) == 40 and source.num_classes == 4
  records = source.__getitems__(range(40))
  for r in records:
    with open(f'{image_tree}/train/{r["file_name"].decode()}', 'rb') as f:
      assert r['image'] == f.read()
  decoded = []
  monkeypatch.setattr(Image.Image, 'load', lambda self: decoded.append(1))
  labels = sources.read_labels(source)
  assert not decoded
  np.testing.assert_array_equal(labels, [r['label'] for r in records])
  assert sorted(r['file_name'].decode()[:3] for r in records) != [r['file_name'].decode()[:3]
                                                                  for r in records]


def test_train_and_evaluate_on_a_tfds_image_dataset(photos_tfds, tmp_path):
  config = _config('photos_tfds', photos_tfds)
  state = train.train_and_evaluate(config, str(tmp_path / 'w'))
  assert int(state.step) == 5
  result = evaluate.evaluate_checkpoint(str(tmp_path / 'w'), recompute=True, k=5)
  assert result['num_queries'] == 16 and result['top1'] > 0.5     # 4 colour classes


@pytest.mark.parametrize('name,image_size,eval_augment', [('cifar10', 32, 'none'),
                                                          ('imagenet2012', 24, 'imagenet_eval')])
def test_tfds_mock_end_to_end(tfds_mock, name, image_size, eval_augment, tmp_path):
  config = _config(name, str(tmp_path / 'tfds'), image_size, eval_augment)
  config.data.train_augment = 'cifar' if name == 'cifar10' else 'imagenet'
  source = sources.open_source(config.data, 'train')
  assert isinstance(source[0]['image'], bytes)            # decoded by the transform, not TFDS
  state = train.train_and_evaluate(config, str(tmp_path / 'w'))
  # num_classes 0: the dataset's own count, in the run's config (the caller's is left alone).
  mngr = checkpoint.manager(checkpoint.checkpoint_dir(str(tmp_path / 'w')), read_only=True)
  saved, _ = checkpoint.read_config(mngr, mngr.latest_step())
  assert int(state.step) == 3 and saved.data.num_classes == (10 if name == 'cifar10' else 1000)
  assert config.data.num_classes == 0
  result = evaluate.evaluate_checkpoint(str(tmp_path / 'w'), export_dir=str(tmp_path / 'x'))
  assert result['num_queries'] == 24
  x = {f[:-4]: np.load(tmp_path / 'x' / f) for f in os.listdir(tmp_path / 'x')}
  np.testing.assert_array_equal(x['query_labels'], sources.read_labels(
      sources.open_source(config.data, config.data.eval_split)))
  np.testing.assert_array_equal(x['database'], np.asarray(state.bank)[:24])
  assert_accuracy_matches(result, weighted_knn_reference(
      x['queries'], x['query_labels'], x['database'], x['database_labels'], k=30,
      sigma=0.05), 24)
