"""Image folders: ImageFolder order, prepare (bytes as they are, no TensorFlow), bad files, and
a shrunk ImageNet recipe trained on real encoded files, interrupted, resumed exactly, evaluated."""

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from configs import imagenet_resnet18
from snca_jax.data import folder
from snca_jax.data import pipeline
from snca_jax.errors import DataError

from conftest import final_state, make_image_tree, run_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _touch(path, data=b'x'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def test_order_is_torchvision_imagefolder_order(tmp_path):
  """Classes: sub-directories sorted by name (upper case before lower case); in each class,
  sorted(os.walk(...)) (a directory's files before its sub-directories' when the names sort
  so) and each directory's files sorted; only IMG_EXTENSIONS, case-insensitive."""
  for rel in ['b/img10.jpg', 'b/img2.jpg', 'b/IMG3.JPG', 'b/a/z.png', 'b/a/y.PNG', 'b/c.bmp',
              'b/notes.txt', 'b/.DS_Store', 'b/Thumbs.db', 'A/x.webp', 'A/x.tif', 'A/x.gif',
              'a/0.jpeg', 'b_extra/q.ppm', 'b/zz/p.pgm']:
    _touch(str(tmp_path / rel))
  _touch(str(tmp_path / 'README.md'))                       # a file beside the classes
  assert folder.find_classes(str(tmp_path)) == ['A', 'a', 'b', 'b_extra']
  assert folder.list_images(str(tmp_path)) == [
      ('A/x.tif', 0), ('A/x.webp', 0), ('a/0.jpeg', 1),
      ('b/IMG3.JPG', 2), ('b/c.bmp', 2), ('b/img10.jpg', 2), ('b/img2.jpg', 2),
      ('b/a/y.PNG', 2), ('b/a/z.png', 2), ('b/zz/p.pgm', 2), ('b_extra/q.ppm', 3)]


def test_a_class_without_images_is_a_clear_error(tmp_path):
  _touch(str(tmp_path / 'cat' / 'a.jpg'))
  _touch(str(tmp_path / 'dog' / 'README'))
  with pytest.raises(DataError, match='dog.*hold no image'):
    folder.list_images(str(tmp_path))


def test_prepare_keeps_the_files_as_they_are(image_tree):
  config = imagenet_resnet18.get_config('folder')
  config.data.root = image_tree
  source = pipeline.open_source(config.data, 'train')
  files = folder.list_images(os.path.join(image_tree, 'train'))
  assert len(source) == len(files) == 40 and source.classes == ['Bird', 'cat', 'dog', 'zebra']
  records = source.__getitems__(range(len(source)))
  for i, (record, (rel, label)) in enumerate(zip(records, files)):
    assert (record['index'], record['label'], record['file']) == (i, label, rel)
    with open(os.path.join(image_tree, 'train', rel), 'rb') as f:
      assert record['image'] == f.read()                  # the bytes, not re-encoded
  np.testing.assert_array_equal(pipeline.read_labels(source), [label for _, label in files])
  assert pipeline.num_classes(source) == 4
  again = pipeline.open_source(config.data, 'train')      # prepared once
  assert again.meta == source.meta


@pytest.mark.parametrize('bad', ['garbage', 'truncated'])
def test_an_undecodable_file_stops_the_prepare_and_names_it(tmp_path, bad):
  root = str(tmp_path / 'photos')
  make_image_tree(root, per_class={'train': 3, 'val': 1})
  src = os.path.join(root, 'train', 'cat', 'cat_001.jpeg')
  data = open(src, 'rb').read()
  data = data[:len(data) // 2] if bad == 'truncated' else b'\xff\xd8\xff\xe0 not a jpeg'
  _touch(os.path.join(root, 'train', 'cat', 'cat_001b.jpg'), data)
  config = imagenet_resnet18.get_config('folder')
  config.data.root = root
  with pytest.raises(DataError, match=r'cat/cat_001b\.jpg is not a decodable image.*'
                                      r'skip_bad_images'):
    pipeline.open_source(config.data, 'train')
  assert os.listdir(os.path.join(root, 'snca_prepared')) == []       # nothing half-written
  config.data.skip_bad_images = True
  source = pipeline.open_source(config.data, 'train')
  assert len(source) == 12 and source.meta['skipped'] == ['cat/cat_001b.jpg']
  assert 'cat/cat_001b.jpg' not in [r['file'] for r in source.__getitems__(range(12))]
  assert [r['index'] for r in source.__getitems__(range(12))] == list(range(12))


def test_missing_root_or_split_is_a_clear_error(tmp_path):
  config = imagenet_resnet18.get_config('folder')
  with pytest.raises(DataError, match='--config.data.root'):
    pipeline.open_source(config.data, 'train')
  config.data.root = str(tmp_path)
  with pytest.raises(DataError, match='no folder .*train'):
    pipeline.open_source(config.data, 'train')


def test_changed_classes_after_prepare(tmp_path):
  root = str(tmp_path / 'p')
  make_image_tree(root, per_class={'train': 2})
  config = imagenet_resnet18.get_config('folder')
  config.data.root = root
  pipeline.open_source(config.data, 'train')
  shutil.copytree(os.path.join(root, 'train', 'cat'), os.path.join(root, 'train', 'cow'))
  with pytest.raises(DataError, match='changed since it was prepared'):
    pipeline.open_source(config.data, 'train')


# --- End to end: the shrunk ImageNet recipe on the folder, through train.py and eval_knn.py.

def _env():
  env = dict(os.environ, PYTHONPATH=ROOT)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  return env


def _train_cmd(workdir, root):
  return [sys.executable, 'train.py', '--config', 'configs/imagenet_resnet18.py:folder',
          '--workdir', str(workdir), f'--config.data.root={root}',
          '--config.model=tiny_resnet', '--config.low_dim=16', '--config.data.image_size=32',
          '--config.batch_size=8', '--config.num_epochs=2', '--config.lr_step_epochs=1',
          '--config.memory_momentum_steps=((1, 0.8),)', '--config.data.num_threads=2',
          '--config.data.worker_count=0', '--config.knn.batch_size=8',
          '--config.log_every_steps=1', '--config.checkpoint_max_to_keep=5']


def test_train_interrupt_resume_evaluate_on_an_image_folder(image_tree, tmp_path):
  root = str(tmp_path / 'photos')
  shutil.copytree(image_tree, root, ignore=shutil.ignore_patterns('snca_prepared'))
  straight = tmp_path / 'straight'
  r = subprocess.run(_train_cmd(straight, root), cwd=ROOT, env=_env(), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'epoch 2/2: 1-NN top-1' in r.stdout and '16 val images' in r.stdout

  # SIGTERM after the 3rd of 10 steps; the same command resumes.
  resumed = tmp_path / 'resumed'
  code, out, err = run_until(_train_cmd(resumed, root), str(resumed / 'metrics.jsonl'), 3,
                             signal.SIGTERM, _env())
  assert code == 0 and 'stopped by SIGTERM' in out, err[-3000:]
  assert int(out.split(' at step ')[1].split(';')[0]) < 10
  r = subprocess.run(_train_cmd(resumed, root), cwd=ROOT, env=_env(), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  (step, want), (step2, got) = final_state(straight), final_state(resumed)
  assert step == step2 == 10
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)

  # After 10 steps the BatchNorm running statistics are still far from the batches', so the
  # bank (train-mode features) and the queries (eval mode) do not yet match; the re-embedded
  # training set does.
  r = subprocess.run([sys.executable, 'eval_knn.py', '--workdir', str(resumed), '--recompute',
                      '--k', '5'], cwd=ROOT, env=_env(), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  top1 = float(r.stdout.split('top-1 ')[1].split('%')[0])
  assert 'on 16 images' in r.stdout and top1 > 50.0, r.stdout    # 4 classes: chance is 25%
