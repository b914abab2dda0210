"""Every config loads, names a known model, and carries the original's recipe (docs/METHOD.md)."""

import importlib
import os

import jax
import jax.numpy as jnp
import pytest

from snca_jax import models
from snca_jax import optim
from snca_jax import validate

NAMES = ['fashion_mnist', 'cifar10_resnet18', 'cifar100_resnet18', 'imagenet_resnet18',
         'imagenet_resnet34', 'imagenet_resnet50', 'folder', 'fashion_mnist_resnet18']


@pytest.mark.parametrize('name', NAMES)
def test_config_is_valid_and_builds_its_model(name):
  """Every config passes the checks train.py makes, and its model maps the config's images to
  unit-norm `low_dim` embeddings (shapes only: nothing is compiled)."""
  c = importlib.import_module(f'configs.{name}').get_config()
  if c.data.name == 'folder':          # the one field a user must give
    c.data.root = '/photos'
  validate.check_config(c)
  assert c.temperature == 0.05 and c.low_dim == 128          # the paper's (docs/METHOD.md)
  model = models.model_from_config(c)
  images = jax.ShapeDtypeStruct((2, c.data.image_size, c.data.image_size, c.data.channels),
                                jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert out.shape == (2, c.low_dim) and out.dtype == jnp.float32


def test_imagenet_recipe():
  c = importlib.import_module('configs.imagenet_resnet18').get_config()
  assert (c.num_epochs, c.batch_size, c.weight_decay) == (130, 256, 1e-4)
  lr = [optim.learning_rate_at(c, 100, e * 100) for e in (0, 39, 40, 79, 80, 120, 129)]
  assert lr == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.0001, 0.0001])
  mm = optim.memory_momentum_schedule(c, 100)
  assert [float(mm(e * 100)) for e in (0, 79, 80, 119, 120, 129)] == pytest.approx(
      [0.5, 0.5, 0.8, 0.8, 0.9, 0.9])
  r50 = importlib.import_module('configs.imagenet_resnet50').get_config()
  assert (r50.model, r50.batch_size, r50.grad_accum_steps) == ('resnet50', 128, 2)


def test_cifar_recipe():
  c = importlib.import_module('configs.cifar10_resnet18').get_config()
  assert (c.num_epochs, c.batch_size, c.weight_decay, c.model) == (200, 128, 5e-4,
                                                                    'cifar_resnet18')
  lr = [optim.learning_rate_at(c, 10, e * 10) for e in (0, 49, 50, 100, 150, 199)]
  assert lr == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.0001, 0.0001])


@pytest.mark.parametrize('name', ['cifar10_resnet18', 'cifar100_resnet18', 'imagenet_resnet18',
                                  'imagenet_resnet34', 'imagenet_resnet50'])
def test_recipes_take_either_source(name):
  """`--config configs/NAME.py:folder` is the same recipe read from an image folder."""
  module = importlib.import_module(f'configs.{name}')
  tfds_config, folder_config = module.get_config(), module.get_config('folder')
  assert tfds_config.data.name != 'folder' and folder_config.data.name == 'folder'
  for c in (tfds_config, folder_config):
    c.data.name = c.data.eval_split = None
  assert tfds_config.to_dict() == folder_config.to_dict()
  with pytest.raises(ValueError, match='folder'):
    module.get_config('imagefolder')


def test_the_demo_recipe(monkeypatch):
  """configs/fashion_mnist.py:demo, what `make demo` trains: the default recipe with the stem of
  stride 2 and six epochs, the NCA products in bfloat16 only where the CPU multiplies bfloat16
  in hardware (elsewhere they would be slower than float32)."""
  from configs import fashion_mnist
  from snca_jax import hardware
  default = fashion_mnist.get_config()
  for in_hardware, dtype in ((True, 'bfloat16'), (False, 'float32')):
    monkeypatch.setattr(hardware, 'bfloat16_in_hardware', lambda: in_hardware)
    c = fashion_mnist.get_config('demo')
    validate.check_config(c)
    assert (c.model, c.num_epochs, c.nca_matmul_dtype) == ('small_resnet_s2', 6, dtype)
    c.model, c.num_epochs, c.nca_matmul_dtype = (default.model, default.num_epochs,
                                                 default.nca_matmul_dtype)
    assert c.to_dict() == default.to_dict()
  makefile = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'Makefile')).read()
  assert 'train.py --config configs/fashion_mnist.py:demo ' in makefile
