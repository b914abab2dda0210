"""Image folders: ImageFolder order, prepare (bytes as they are, no TensorFlow), bad files, and
a shrunk ImageNet recipe trained on real encoded files, interrupted, resumed exactly, evaluated."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from configs import imagenet_resnet18
from snca_jax.data import folder
from snca_jax.data import listing
from snca_jax.data import sources
from snca_jax.errors import DataError

from conftest import final_state, make_image_tree, run_until, subprocess_env

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
  assert listing.find_classes(str(tmp_path)) == ['A', 'a', 'b', 'b_extra']
  assert listing.list_images(str(tmp_path)) == [
      ('A/x.tif', 0), ('A/x.webp', 0), ('a/0.jpeg', 1),
      ('b/IMG3.JPG', 2), ('b/c.bmp', 2), ('b/img10.jpg', 2), ('b/img2.jpg', 2),
      ('b/a/y.PNG', 2), ('b/a/z.png', 2), ('b/zz/p.pgm', 2), ('b_extra/q.ppm', 3)]


def test_a_class_without_images_is_a_clear_error(tmp_path):
  _touch(str(tmp_path / 'cat' / 'a.jpg'))
  _touch(str(tmp_path / 'dog' / 'README'))
  with pytest.raises(DataError, match='dog.*hold no image'):
    listing.list_images(str(tmp_path))


def test_prepare_keeps_the_files_as_they_are(image_tree):
  config = imagenet_resnet18.get_config('folder')
  config.data.root = image_tree
  source = sources.open_source(config.data, 'train')
  files = listing.list_images(os.path.join(image_tree, 'train'))
  assert len(source) == len(files) == 40 and source.classes == ['Bird', 'cat', 'dog', 'zebra']
  records = source.__getitems__(range(len(source)))
  assert source.files() == [rel for rel, _ in files]
  for i, (record, (rel, label)) in enumerate(zip(records, files)):
    assert (record['index'], record['label']) == (i, label)
    with open(os.path.join(image_tree, 'train', rel), 'rb') as f:
      assert record['image'] == f.read()                  # the bytes, not re-encoded
  np.testing.assert_array_equal(sources.read_labels(source), [label for _, label in files])
  assert sources.num_classes(source) == 4
  again = sources.open_source(config.data, 'train')      # prepared once
  assert again.meta == source.meta


def _prepared(tmp_path, per_class=3):
  root = str(tmp_path / 'photos')
  make_image_tree(root, per_class={'train': per_class})
  out = str(tmp_path / 'prepared')
  folder.prepare(os.path.join(root, 'train'), out, show_progress=False)
  return out


def test_records_read_in_any_order_in_threads_and_after_pickling(tmp_path):
  """Batched reads in any order, from several threads at once (each `os.pread`, no shared file
  position), and from a copy sent to a worker process (pickled: it opens the file again)."""
  import pickle
  from concurrent.futures import ThreadPoolExecutor
  source = folder.FolderSource(_prepared(tmp_path))
  whole = [source[i] for i in range(len(source))]
  keys = np.random.default_rng(0).permutation(len(source)).tolist() * 4
  with ThreadPoolExecutor(4) as pool:
    read = list(pool.map(lambda k: source.__getitems__([k, 0]), keys))
  assert all(r == [whole[k], whole[0]] for k, r in zip(keys, read))
  assert pickle.loads(pickle.dumps(source)).__getitems__(keys[:5]) == [whole[k] for k in keys[:5]]
  assert source[3] == whole[3]                # the copy, gone, closed its own file only
  with pytest.raises(IndexError, match='out of 0..11'):
    source.__getitems__([3, 12])


def test_a_split_prepared_into_array_record_reads_the_same(tmp_path):
  """A split prepared before 2026-12-05 (an array_record file of msgpack records) is still read,
  with the same records."""
  import json
  import msgpack
  from array_record.python import array_record_module
  new = folder.FolderSource(_prepared(tmp_path))
  old = str(tmp_path / 'old')
  shutil.copytree(new.directory, old)
  writer = array_record_module.ArrayRecordWriter(
      os.path.join(old, 'records-00000-of-00001.array_record'), 'group_size:1,uncompressed')
  for r, rel in zip(new.__getitems__(range(len(new))), new.files()):
    writer.write(msgpack.packb(dict(r, file=rel)))
  writer.close()
  meta = dict(new.meta, shards=['records-00000-of-00001.array_record'])
  del meta['images']
  for name in ('images.bin', 'offsets.npy'):
    os.remove(os.path.join(old, name))
  with open(os.path.join(old, 'meta.json'), 'w') as f:
    json.dump(meta, f)
  source = folder.FolderSource(old)
  assert len(source) == len(new) and source.files() == new.files()
  for a, b in zip(source.__getitems__(range(len(new))), new.__getitems__(range(len(new)))):
    assert (a['image'], a['label'], a['index']) == (b['image'], b['label'], b['index'])


@pytest.mark.parametrize('damage', ['truncated', 'longer', 'offsets', 'labels', 'no_offsets',
                                    'while_open'])
def test_a_damaged_prepared_split_is_a_clear_error(tmp_path, damage):
  out = _prepared(tmp_path)
  images = os.path.join(out, 'images.bin')
  if damage == 'while_open':                  # cut short after it was opened
    source = folder.FolderSource(out)
    with open(images, 'r+b') as f:
      f.truncate(os.path.getsize(images) - 10)
    with pytest.raises(DataError, match=r'^[^\n]*images.bin ends before record 11: delete '
                                        r'[^\n]* to prepare it again$'):
      source.__getitems__([0, 11])
    return
  if damage in ('offsets', 'labels'):
    path = os.path.join(out, f'{damage}.npy')
    np.save(path, np.load(path)[:-1])
    message = r'holds 11 records but its meta.json says 12'
  elif damage == 'no_offsets':
    os.remove(os.path.join(out, 'offsets.npy'))
    message = r'cannot read [^\n]*offsets.npy \(FileNotFoundError[^\n]*\)'
  else:
    with open(images, 'r+b') as f:
      f.truncate(os.path.getsize(images) + (-10 if damage == 'truncated' else 10))
    message = r'images.bin holds \d+ bytes where its offsets.npy says \d+'
  with pytest.raises(DataError, match=rf'^[^\n]*{message}: delete [^\n]* to prepare it again$'):
    folder.FolderSource(out)


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
    sources.open_source(config.data, 'train')
  assert os.listdir(os.path.join(root, 'snca_prepared')) == []       # nothing half-written
  config.data.skip_bad_images = True
  source = sources.open_source(config.data, 'train')
  assert len(source) == 12 and source.meta['skipped'] == ['cat/cat_001b.jpg']
  assert 'cat/cat_001b.jpg' not in source.files() and len(source.files()) == 12
  assert [r['index'] for r in source.__getitems__(range(12))] == list(range(12))


def test_worker_processes_prepare_the_same_records_and_name_bad_files(tmp_path):
  """Preparing in worker processes (as on hosts of many cores) or in this thread alone writes
  the same files as the threads do, names a bad file the same way, and leaves nothing behind
  when it stops."""
  root = str(tmp_path / 'photos')
  make_image_tree(root, per_class={'train': 20, 'val': 1})
  _touch(os.path.join(root, 'train', 'cat', 'cat_bad.jpg'), b'\xff\xd8\xff\xe0 not a jpeg')
  split = os.path.join(root, 'train')
  with pytest.raises(DataError, match=r'cat/cat_bad\.jpg is not a decodable image'):
    folder.prepare(split, str(tmp_path / 'stopped'), num_workers=2, show_progress=False)
  assert sorted(os.listdir(tmp_path)) == ['photos']                  # nothing half-written
  with pytest.raises(DataError, match=r'cat/cat_bad\.jpg is not a decodable image'):
    folder.prepare(split, str(tmp_path / 'stopped'), num_threads=1, show_progress=False)
  assert sorted(os.listdir(tmp_path)) == ['photos']
  ways = {'threads': {'num_workers': 0}, 'workers': {'num_workers': 2},
          'one': {'num_workers': 0, 'num_threads': 1}}
  metas = {name: folder.prepare(split, str(tmp_path / name), skip_bad_images=True,
                                show_progress=False, **kwargs) for name, kwargs in ways.items()}
  for meta in metas.values():
    assert meta['skipped'] == ['cat/cat_bad.jpg'] and meta['num_records'] == 80
  for name in sorted(os.listdir(tmp_path / 'threads')):
    if name != 'meta.json':                                          # which holds the time
      threads = (tmp_path / 'threads' / name).read_bytes()
      assert threads == (tmp_path / 'workers' / name).read_bytes(), name
      assert threads == (tmp_path / 'one' / name).read_bytes(), name


def test_worker_processes_check_large_splits_on_many_cores():
  assert folder.check_workers(None, folder.PROCESS_MIN_FILES, cores=16) == 16
  assert folder.check_workers(None, folder.PROCESS_MIN_FILES - 1, cores=16) == 0
  assert folder.check_workers(None, 10 ** 6, cores=4) == 0           # threads on few cores
  assert folder.check_workers(3, 10, cores=2) == 3                   # as asked
  assert folder.check_workers(0, 10 ** 6, cores=16) == 0


def test_missing_root_or_split_is_a_clear_error(tmp_path):
  config = imagenet_resnet18.get_config('folder')
  with pytest.raises(DataError, match='--config.data.root'):
    sources.open_source(config.data, 'train')
  config.data.root = str(tmp_path)
  with pytest.raises(DataError, match='no folder .*train'):
    sources.open_source(config.data, 'train')


def test_changed_classes_after_prepare(tmp_path):
  root = str(tmp_path / 'p')
  make_image_tree(root, per_class={'train': 2})
  config = imagenet_resnet18.get_config('folder')
  config.data.root = root
  sources.open_source(config.data, 'train')
  shutil.copytree(os.path.join(root, 'train', 'cat'), os.path.join(root, 'train', 'cow'))
  with pytest.raises(DataError, match='changed since it was prepared'):
    sources.open_source(config.data, 'train')


def _config(root):
  config = imagenet_resnet18.get_config('folder')
  config.data.root = root
  return config


def _labels(config, split):
  return list(sources.read_labels(sources.open_source(config.data, split)))


def test_every_split_is_labelled_by_the_training_split_classes(tmp_path):
  """val/cat gets train's label of cat, not val's own class number; a val split with fewer
  classes is fine, and reopening it (prepared) neither re-labels it nor says it changed."""
  root = str(tmp_path / 'p')
  make_image_tree(root, per_class={'train': 2})                        # Bird, cat, dog, zebra
  make_image_tree(root, classes=('cat', 'dog'), per_class={'val': 2})
  config = _config(root)
  val = sources.open_source(config.data, 'val')
  assert val.classes == ['Bird', 'cat', 'dog', 'zebra'] and sources.num_classes(val) == 4
  assert val.meta['split_classes'] == ['cat', 'dog']
  assert _labels(config, 'val') == [1, 1, 2, 2]
  assert [r['label'] for r in val.__getitems__(range(4))] == [1, 1, 2, 2]
  assert _labels(config, 'train') == [0, 0, 1, 1, 2, 2, 3, 3]
  again = sources.open_source(config.data, 'val')                     # prepared: same labels
  assert again.meta == val.meta and _labels(config, 'val') == [1, 1, 2, 2]
  # The training split's classes change after val was prepared: val's labels are stale.
  make_image_tree(root, classes=('Ant',), per_class={'train': 1})
  with pytest.raises(DataError, match='training split .* changed since val was prepared'):
    sources.open_source(config.data, 'val')


def test_a_split_with_classes_the_training_split_lacks_is_a_clear_error(tmp_path):
  root = str(tmp_path / 'p')
  make_image_tree(root, classes=('cat', 'dog'), per_class={'train': 1})
  make_image_tree(root, classes=('cat', 'horse', 'dog'), per_class={'val': 1})
  config = _config(root)
  with pytest.raises(DataError, match=r'^[^\n]*horse[^\n]*training split[^\n]*$') as e:
    sources.open_source(config.data, 'val')
  assert 'class folder(s) horse that the training split' in str(e.value)    # horse alone
  assert not os.path.exists(os.path.join(root, 'snca_prepared', 'val'))
  with pytest.raises(DataError, match='horse'):                       # folder level too
    listing.list_images(os.path.join(root, 'val'), ['cat', 'dog'])


def _within(fn, seconds=20.0, on_timeout=None):
  """fn()'s result; fails (rather than hangs) when it has not returned within `seconds`."""
  result = {}

  def target():
    try:
      result['value'] = fn()
    except BaseException as e:  # noqa: BLE001  (re-raised below)
      result['error'] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(seconds)
  if thread.is_alive():
    if on_timeout is not None:
      on_timeout()
    pytest.fail(f'did not return within {seconds} s')
  if 'error' in result:
    raise result['error']
  return result['value']


def _special_tree(tmp_path):
  """train/{cat,dog} with one image each, a symlink cycle across the two class folders (two
  links each way, so a walk that follows it never ends), a FIFO `x.png`, a symlink to
  /dev/zero `z.jpg` and a symlinked directory that is not a cycle."""
  root = str(tmp_path / 'p')
  make_image_tree(root, classes=('cat', 'dog'), per_class={'train': 1})
  train = os.path.join(root, 'train')
  for a, b in (('cat', 'dog'), ('dog', 'cat')):
    for name in ('loop1', 'loop2'):
      os.symlink(os.path.join('..', b), os.path.join(train, a, name))
  os.mkfifo(os.path.join(train, 'cat', 'x.png'))
  os.symlink('/dev/zero', os.path.join(train, 'dog', 'z.jpg'))
  make_image_tree(str(tmp_path / 'elsewhere'), classes=('extra',), per_class={'train': 1})
  os.symlink(os.path.join(str(tmp_path), 'elsewhere', 'train', 'extra'),
             os.path.join(train, 'dog', 'linked'))
  return root


def test_special_files_are_ignored_and_cycles_end(tmp_path):
  """Regular files only (after following links), each directory walked once."""
  root = _special_tree(tmp_path)
  files = _within(lambda: listing.list_images(os.path.join(root, 'train')))
  # Each class walks dog's folder once (through loop1, not again through loop2), and the
  # linked folder that is no cycle; not x.png nor z.jpg.
  assert files == [('cat/loop1/linked/more/extra_000.jpg', 0),
                   ('cat/loop1/more/dog_000.png', 0),
                   ('cat/more/cat_000.jpg', 0),
                   ('dog/linked/more/extra_000.jpg', 1),
                   ('dog/loop1/more/cat_000.jpg', 1),
                   ('dog/more/dog_000.png', 1)]
  source = _within(lambda: sources.open_source(_config(root).data, 'train'))
  assert len(source) == 6 and source.meta['skipped'] == []
  assert source.files() == [f for f, _ in files]


def test_reading_a_fifo_does_not_block(tmp_path):
  fifo = str(tmp_path / 'x.png')
  os.mkfifo(fifo)

  def unblock():                          # lets a reader blocked in open() go on
    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

  data, error = _within(lambda: folder._read_or_error(fifo), 10, unblock)
  assert data is None and 'not a regular file' in error


def test_a_dangling_symlink_is_a_bad_file(tmp_path):
  root = str(tmp_path / 'p')
  make_image_tree(root, per_class={'train': 2})
  os.symlink('missing', os.path.join(root, 'train', 'cat', 'a.jpg'))
  config = _config(root)
  with pytest.raises(DataError, match=r'^[^\n]*cat/a\.jpg is not a decodable image[^\n]*'
                                      r'skip_bad_images[^\n]*$'):
    sources.open_source(config.data, 'train')
  config.data.skip_bad_images = True
  source = sources.open_source(config.data, 'train')
  assert len(source) == 8 and source.meta['skipped'] == ['cat/a.jpg']


def test_stale_temporaries_of_a_killed_prepare_are_removed(tmp_path):
  root = str(tmp_path / 'p')
  make_image_tree(root, per_class={'train': 1})
  stale = os.path.join(root, 'snca_prepared', 'train.incomplete-99999')
  _touch(os.path.join(stale, 'images.bin'), b'\0' * 1000)
  source = sources.open_source(_config(root).data, 'train')
  assert len(source) == 4
  assert os.listdir(os.path.join(root, 'snca_prepared')) == ['train']     # no lock file left


def test_concurrent_prepares_of_one_split_prepare_it_once(tmp_path, monkeypatch):
  root = str(tmp_path / 'p')
  make_image_tree(root, per_class={'train': 2})
  config = _config(root)
  write, calls = folder._write, []

  def slow_write(*args, **kwargs):          # long enough for the other run to start meanwhile
    calls.append(1)
    time.sleep(0.3)
    return write(*args, **kwargs)

  monkeypatch.setattr(folder, '_write', slow_write)
  barrier = threading.Barrier(2)

  def open_train():
    barrier.wait()
    source = sources.open_source(config.data, 'train')
    return source, list(sources.read_labels(source))

  results, errors = [None, None], []

  def run(i):
    try:
      results[i] = open_train()
    except BaseException as e:  # noqa: BLE001  (reported below)
      errors.append(e)

  threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(20)
  assert not any(t.is_alive() for t in threads), 'a prepare did not return within 20 s'
  assert not errors, errors
  assert len(calls) == 1
  (a, la), (b, lb) = results
  assert la == lb == [0, 0, 1, 1, 2, 2, 3, 3] and a.meta == b.meta
  assert len(a.__getitems__(range(8))) == len(b.__getitems__(range(8))) == 8
  assert os.listdir(os.path.join(root, 'snca_prepared')) == ['train']


# --- End to end: the shrunk ImageNet recipe on the folder, through train.py and eval_knn.py.

def _env():
  env = subprocess_env(2)
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
