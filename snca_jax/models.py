"""ResNet backbones with an L2-normalised embedding head (SPEC.md, "Model").

The ImageNet variants follow torchvision's layout exactly (7x7 stride-2 stem with padding 3,
3x3 stride-2 max-pool with padding 1, stride on the 3x3 conv of a bottleneck, 1x1 projection
shortcuts), and the CIFAR variants follow the original's ``models/resnet_cifar.py`` (3x3
stride-1 stem, no max-pool). Explicit paddings, rather than 'SAME', keep the arithmetic identical
to PyTorch's so that converted weights give the same embeddings.

Parameters are always float32; ``dtype`` sets the compute dtype (float32 or bfloat16). The
embedding is returned in float32 with unit L2 norm.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from snca_jax.errors import ConfigError

# BatchNorm as in torchvision: momentum 0.1 in PyTorch terms is 0.9 in Flax terms, eps 1e-5.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
# torchvision initialises convolutions with kaiming_normal_(mode='fan_out', nonlinearity='relu').
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


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
    low_dim: embedding size.
    widths: channels of each stage (before the bottleneck expansion).
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' (3x3/1 conv, no pool).
    stem_width: channels of the stem convolution.
    dtype: compute dtype; parameters stay float32.
  """
  stage_sizes: Sequence[int]
  block_cls: Any
  low_dim: int = 128
  widths: Sequence[int] = (64, 128, 256, 512)
  stem: str = 'imagenet'
  stem_width: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=_conv_init)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON,
                             dtype=self.dtype, param_dtype=jnp.float32)
    x = jnp.asarray(x, self.dtype)
    if self.stem == 'imagenet':
      x = conv(self.stem_width, (7, 7), 2, padding=_pad(7), name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == 'cifar':
      x = conv(self.stem_width, (3, 3), 1, padding=_pad(3), name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
    else:
      raise ValueError(f"unknown stem {self.stem!r}: use 'imagenet' or 'cifar'")
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(width, strides, conv=conv, norm=norm,
                           name=f'layer{i + 1}_{j}')(x)
    x = jnp.mean(x, axis=(1, 2))  # global average pool (= avg_pool2d(4) on a 4x4 map)
    x = nn.Dense(self.low_dim, dtype=self.dtype, param_dtype=jnp.float32, name='head')(x)
    return l2_normalize(x.astype(jnp.float32))


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
MODELS['tiny_resnet'] = functools.partial(
    ResNet, stage_sizes=(1, 1), block_cls=BasicBlock, widths=(8, 16), stem='cifar',
    stem_width=8)


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def model_from_config(config) -> ResNet:
  """The model of a run's config (`model`, `low_dim`, `dtype`)."""
  if config.dtype not in DTYPES:
    raise ConfigError(f"dtype {config.dtype!r} is not supported: use 'float32' or 'bfloat16'")
  return create_model(config.model, low_dim=config.low_dim, dtype=DTYPES[config.dtype])


def create_model(name: str, *, low_dim: int = 128, dtype: Any = jnp.float32) -> ResNet:
  """The model called `name` (see MODELS) with an embedding of size `low_dim`."""
  if name not in MODELS:
    raise ConfigError(f'unknown model {name!r}; choose one of: {", ".join(sorted(MODELS))}')
  return MODELS[name](low_dim=low_dim, dtype=dtype)
