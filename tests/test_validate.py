"""Every config field is checked before any work (snca_jax/validate.py)."""

import importlib
import math

import pytest

from snca_jax import validate
from snca_jax.errors import ConfigError

# Fields any value of their type suits: paths ('' = the default place) and switches.
FREE = {'data.data_dir', 'data.idx_dir', 'data.root', 'data.prepared_dir', 'data.download',
        'data.skip_bad_images', 'data.reduced_decode', 'nesterov', 'bn_per_device',
        'bn_float32_statistics', 'keep_best'}


def leaves(config, prefix=''):
  for key, value in config.items():
    if hasattr(value, 'items'):
      yield from leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def bad_values(value):
  if isinstance(value, bool):
    return []
  if isinstance(value, int):
    return [-1, -2]                 # -1 means 'from the cores' for data.worker_count
  if isinstance(value, float):
    return [-1.0, math.nan, math.inf]
  if isinstance(value, str):
    return ['', 'nonsense']
  return [('x',), ((1,),)]


def _set(config, field, value):
  *parents, leaf = field.split('.')
  for p in parents:
    config = config[p]
  with config.ignore_type():
    config[leaf] = value


@pytest.mark.parametrize('name', ['fashion_mnist', 'cifar10_resnet18', 'imagenet_resnet50'])
def test_every_field_is_checked(name):
  module = importlib.import_module(f'configs.{name}')
  assert validate.problems(module.get_config()) == []
  unchecked = []
  for field, value in leaves(module.get_config()):
    if field in FREE:
      continue
    reported = False
    for bad in bad_values(value):
      config = module.get_config()
      _set(config, field, bad)
      reported |= any(p.startswith(field + '=') for p in validate.problems(config))
    if not reported:
      unchecked.append(field)
  assert unchecked == []


def test_combinations():
  from configs import fashion_mnist
  c = fashion_mnist.get_config()
  c.data.channels = 3                  # mean and std still have one value each
  c.memory_momentum_steps = ((80, 0.8), (40, 0.9))
  c.nca_kernel, c.nca_class_index = 'pallas', 'sometimes'
  found = validate.problems(c)
  assert [p.split('=')[0] for p in found] == ['data.mean', 'data.std', 'memory_momentum_steps',
                                              'nca_class_index']
  with pytest.raises(ConfigError) as e:
    validate.check_config(c)
  assert str(e.value).startswith('bad config: data.mean=(0.286,)') and '\n' not in str(e.value)


def test_label_map_and_train_classes_against_the_class_count():
  """With num_classes 0 a label map makes max(label_map) + 1 classes, every one used; the
  training classes are fine classes: below len(label_map), or below num_classes."""
  from configs import cifar100_resnet18, fashion_mnist

  def fields(**data):
    c = fashion_mnist.get_config()
    for key, value in data.items():
      c.data[key] = value
    return [p.split('=')[0] for p in validate.problems(c)], validate.problems(c)

  assert fields(num_classes=0, label_map=(0, 2, 0))[0] == ['data.label_map']   # 1 unused
  assert 'num_classes=0: each of 0..max(label_map)' in fields(num_classes=0,
                                                              label_map=(0, 2, 0))[1][0]
  assert fields(num_classes=0, label_map=(0, 1, 0)) == ([], [])
  assert fields(train_classes=(0, 11))[1] == [
      'data.train_classes=(0, 11): distinct class numbers >= 0, each below num_classes = 10']
  assert fields(train_classes=(0, 9)) == ([], [])
  coarse = fashion_mnist.COARSE
  assert fields(label_map=coarse, num_classes=4, train_classes=(9, 10))[0] == [
      'data.train_classes']
  assert fields(label_map=coarse, num_classes=0, train_classes=(0, 9)) == ([], [])
  c = cifar100_resnet18.get_config('coarse')      # coarse labels from the records: 100 fine
  c.data.train_classes = (0, 50, 99)
  assert validate.problems(c) == []
