"""ResNet backbones with an L2-normalised embedding head (docs/METHOD.md, "Model").

The ImageNet variants follow torchvision's layout exactly (7x7 stride-2 stem with padding 3,
3x3 stride-2 max-pool with padding 1, stride on the 3x3 conv of a bottleneck, 1x1 projection
shortcuts), and the CIFAR variants follow the original's ``models/resnet_cifar.py`` (3x3
stride-1 stem, no max-pool). Explicit paddings, rather than 'SAME', keep the arithmetic identical
to PyTorch's so that converted weights give the same embeddings.

Parameters are always float32; ``dtype`` sets the compute dtype (float32, bfloat16 or float16,
the last trained with loss scaling: optim.py). The embedding is returned in float32 with unit L2
norm.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from snca_jax import schema
from snca_jax.errors import ConfigError

# BatchNorm as in torchvision: momentum 0.1 in PyTorch terms is 0.9 in Flax terms, eps 1e-5.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
# Initialisations, by name (config field `model_init`):
#   'torchvision': convolutions kaiming_normal_(mode='fan_out', nonlinearity='relu'), as
#                  torchvision's ResNets; the head Flax's default.
#   'pytorch':     PyTorch's defaults, which the original's CIFAR ResNet keeps: convolution and
#                  linear weights and biases uniform in +-1/sqrt(fan_in); BatchNorm scale 1.
#                  (PyTorch 0.4, which the original ran on, drew the BatchNorm scale uniformly
#                  from [0, 1); today's default, 1, is used.)
INITS = ('torchvision', 'pytorch')
_torch_uniform = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def _conv_init(init: str):
  return (_torch_uniform if init == 'pytorch'
          else nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'))


class GroupBatchNorm(nn.Module):
  """BatchNorm whose statistics are computed separately over `groups` equal, contiguous parts
  of the batch: with the batch split over devices, each device's own rows, as the original's
  `nn.DataParallel` did per GPU. The running statistics follow the first part's (the module on
  GPU 0 is the one DataParallel keeps). Variables are named as nn.BatchNorm's."""
  groups: int
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (c,), self.param_dtype)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
      y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    else:
      g = x.reshape(self.groups, x.shape[0] // self.groups, -1, c).astype(jnp.float32)
      mean = g.mean(axis=(1, 2))                                     # (groups, C)
      var = jnp.maximum((g * g).mean(axis=(1, 2)) - mean * mean, 0.0)
      y = (g - mean[:, None, None]) * jax.lax.rsqrt(var[:, None, None] + self.epsilon)
      y = y.reshape(x.shape)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean[0]
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var[0]
    return (y * scale + bias).astype(self.dtype)


def _pad(k: int):
  return ((k // 2, k // 2), (k // 2, k // 2))


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34)."""
  features: int
  strides: int
  conv: Callable
  norm: Callable
  expansion = 1

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.features, (3, 3), self.strides, padding=_pad(3), name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), 1, padding=_pad(3), name='conv2')(y)
    y = self.norm(name='bn2')(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = self.conv(self.features, (1, 1), self.strides, padding='VALID', name='downsample_conv')(x)
      x = self.norm(name='downsample_bn')(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1, 3x3 (strided), 1x1 x4 convolutions (ResNet-50/101/152)."""
  features: int
  strides: int
  conv: Callable
  norm: Callable
  expansion = 4

  @nn.compact
  def __call__(self, x):
    out = self.features * self.expansion
    y = self.conv(self.features, (1, 1), 1, padding='VALID', name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), self.strides, padding=_pad(3), name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(out, (1, 1), 1, padding='VALID', name='conv3')(y)
    y = self.norm(name='bn3')(y)
    if self.strides != 1 or x.shape[-1] != out:
      x = self.conv(out, (1, 1), self.strides, padding='VALID', name='downsample_conv')(x)
      x = self.norm(name='downsample_bn')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet backbone + linear embedding head + L2 normalisation.

  Attributes:
    stage_sizes: blocks per stage.
    block_cls: BasicBlock or Bottleneck.
    low_dim: embedding size; 0: no embedding layer, the embedding is the pooled feature (the
      paper's softmax baseline: its classifier on the pooled features).
    widths: channels of each stage (before the bottleneck expansion).
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' (3x3 conv, no pool).
    stem_strides: the 'cifar' stem convolution's stride (1; 2 halves every stage's maps).
    stem_width: channels of the stem convolution.
    dtype: compute dtype; parameters stay float32.
    init_scheme: 'torchvision' or 'pytorch' (see INITS).
    bn_groups: BatchNorm statistics over this many equal parts of the batch (1: the whole
      batch; the device count: per device, as the original's DataParallel).
    num_classes: with > 0, a linear classifier on the `low_dim` layer (or with low_dim = 0 on
      the pooled features: the paper's softmax baseline), whose logits are sown as
      'intermediates'/'logits'; the embedding stays that layer, L2-normalised.
  """
  stage_sizes: Sequence[int]
  block_cls: Any
  low_dim: int = 128
  widths: Sequence[int] = (64, 128, 256, 512)
  stem: str = 'imagenet'
  stem_width: int = 64
  dtype: Any = jnp.float32
  init_scheme: str = 'torchvision'
  bn_groups: int = 1
  num_classes: int = 0
  bn_float32_statistics: bool = True
  stem_strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=_conv_init(self.init_scheme))
    if self.bn_groups > 1:
      norm = functools.partial(GroupBatchNorm, groups=self.bn_groups,
                               use_running_average=not train, momentum=_BN_MOMENTUM,
                               epsilon=_BN_EPSILON, dtype=self.dtype)
    else:
      norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                               momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON,
                               dtype=self.dtype, param_dtype=jnp.float32,
                               force_float32_reductions=self.bn_float32_statistics)
    x = jnp.asarray(x, self.dtype)
    if self.stem == 'imagenet':
      x = conv(self.stem_width, (7, 7), 2, padding=_pad(7), name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == 'cifar':
      x = conv(self.stem_width, (3, 3), self.stem_strides, padding=_pad(3), name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
    else:
      raise ValueError(f"unknown stem {self.stem!r}: use 'imagenet' or 'cifar'")
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(width, strides, conv=conv, norm=norm,
                           name=f'layer{i + 1}_{j}')(x)
    x = jnp.mean(x, axis=(1, 2))  # global average pool (= avg_pool2d(4) on a 4x4 map)
    dense = {}
    if self.init_scheme == 'pytorch':
      bound = 1 / x.shape[-1] ** 0.5
      dense = dict(kernel_init=_torch_uniform,
                   bias_init=lambda key, shape, dtype: jax.random.uniform(
                       key, shape, dtype, -bound, bound))
    if self.low_dim:
      x = nn.Dense(self.low_dim, dtype=self.dtype, param_dtype=jnp.float32, name='head',
                   **dense)(x)
    if self.num_classes:     # the softmax baseline's classifier, on the layer it embeds with
      logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                        name='classifier')(x)
      self.sow('intermediates', 'logits', logits.astype(jnp.float32))
    return l2_normalize(x.astype(jnp.float32))


def normalize_images(images, mean, std):
  """uint8 images -> (x / 255 - mean) / std in float32: the input normalisation, done on the
  device inside the jitted step (the host sends uint8, a quarter of float32's bytes)."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def l2_normalize(x, axis=-1, eps=1e-12):
  """x / max(||x||, eps), as torch.nn.functional.normalize."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


_STAGES = {
    18: ([2, 2, 2, 2], BasicBlock),
    34: ([3, 4, 6, 3], BasicBlock),
    50: ([3, 4, 6, 3], Bottleneck),
    101: ([3, 4, 23, 3], Bottleneck),
    152: ([3, 8, 36, 3], Bottleneck),
}

MODELS = {}
for _depth, (_sizes, _block) in _STAGES.items():
  MODELS[f"resnet{_depth}"] = functools.partial(ResNet, stage_sizes=tuple(_sizes), block_cls=_block)
  MODELS[f'cifar_resnet{_depth}'] = functools.partial(
      ResNet, stage_sizes=tuple(_sizes), block_cls=_block, stem='cifar')
# Small CIFAR-style networks for 28x28 / 32x32 inputs on a CPU: the demo and the tests.
MODELS['small_resnet'] = functools.partial(
    ResNet, stage_sizes=(1, 1, 1), block_cls=BasicBlock, widths=(16, 32, 64), stem='cifar',
    stem_width=16)
# The demo's (configs/fashion_mnist.py:demo): small_resnet with a stem of stride 2, its stages
# at 14x14, 7x7 and 4x4 on Fashion-MNIST: a quarter of the convolutions' work (README, "The
# demo", for its rate and accuracy).
MODELS['small_resnet_s2'] = functools.partial(MODELS['small_resnet'], stem_strides=2)
MODELS['tiny_resnet'] = functools.partial(
    ResNet, stage_sizes=(1, 1), block_cls=BasicBlock, widths=(8, 16), stem='cifar',
    stem_width=8)


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
NCA_DTYPES = ('bfloat16', 'float32')      # the NCA kernel's products


def embedding_dim(config) -> int:
  """The size of a run's embedding (and bank rows): `low_dim`, or where it is 0 the width of
  the network's pooled features."""
  if config.low_dim:
    return config.low_dim
  model = create_model(config.model)
  return model.widths[-1] * model.block_cls.expansion


def model_from_config(config, num_devices: int = 1) -> ResNet:
  """The model of a run's config (`model`, `low_dim`, `dtype`, `model_init`, and with
  `bn_per_device` BatchNorm statistics per device of `num_devices`)."""
  if config.dtype not in DTYPES:
    raise ConfigError(f"dtype {config.dtype!r} is not supported: use 'float32', 'bfloat16' or "
                      f"'float16'")
  return create_model(config.model, low_dim=config.low_dim, dtype=DTYPES[config.dtype],
                      init=config.model_init,
                      bn_groups=num_devices if config.bn_per_device else 1,
                      num_classes=config.data.num_classes if schema.is_softmax(config) else 0,
                      bn_float32_statistics=config.bn_float32_statistics)


def create_model(name: str, *, low_dim: int = 128, dtype: Any = jnp.float32,
                 init: str = 'torchvision', bn_groups: int = 1, num_classes: int = 0,
                 bn_float32_statistics: bool = True) -> ResNet:
  """The model called `name` (see MODELS) with an embedding of size `low_dim`."""
  if name not in MODELS:
    raise ConfigError(f'unknown model {name!r}; choose one of: {", ".join(sorted(MODELS))}')
  return MODELS[name](low_dim=low_dim, dtype=dtype, init_scheme=init, bn_groups=bn_groups,
                      num_classes=num_classes, bn_float32_statistics=bn_float32_statistics)
