"""The batch transforms by name: a batch -> the same batch with uint8 images
(B, size, size, channels). Each example is transformed with its own `np.random.Generator`,
seeded by (seed, example index): an example's augmentation does not depend on which batch, or
which process, it lands in.

    'none'           images as they are (all of the model's size)
    'crop_flip'      random crop from the image zero-padded by 2 (4 from 32 pixels up), flip
                     (ours, for Fashion-MNIST: batched numpy, `random_crop_flip`)
    'cifar'          the original's CIFAR training transform
    'imagenet'       the original's ImageNet training transform (random resized crop, flip)
    'imagenet_eval'  the original's ImageNet evaluation transform (resize, centre crop)
    'center'         images as they are where they have the model's size, else resize and
                     centre crop to it

Encoded images (bytes) are decoded here, with PIL; the original's PIL transforms (ImageNet,
CIFAR) are in `images.py`. Normalisation happens on the device (`models.normalize_images`).
"""

import dataclasses
from typing import Callable

import numpy as np

from snca_jax.data import images
from snca_jax.errors import DataError

# name -> fn(images, rngs, transform) -> uint8 array (B, H, W, C); `images` is a list of
# encoded images (bytes) or arrays, `rngs` one generator per example, `transform` the
# BatchTransform (its image_size, channels, reduced_decode).
TRANSFORMS: dict[str, Callable] = {}


def register(name: str):
  """Adds the decorated function to TRANSFORMS as `name`."""
  def add(fn):
    TRANSFORMS[name] = fn
    return fn
  return add


def _draw(rngs, fn):
  return np.array([fn(r) for r in rngs])


def random_crop_flip(images, rngs, pad: int):
  """Random crop of the original size from the zero-padded images, then a random flip."""
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = _draw(rngs, lambda r: r.integers(0, 2 * pad + 1, size=2)).reshape(b, 2)
  rows = offsets[:, :1] + np.arange(h)[None, :]                   # (B, h)
  cols = offsets[:, 1:] + np.arange(w)[None, :]                   # (B, w)
  flip = _draw(rngs, lambda r: r.random() < 0.5)
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _stacked(arrays, n: int) -> np.ndarray:
  """np.stack of the `n` same-shaped arrays that `arrays` yields, each written into the batch as
  it comes: np.stack would first hold all of them (a batch of 224x224 images: 128 allocations of
  150 KB, each its own mmap and page faults), at 4x the cost of this copy, with the GIL held."""
  out = None
  for i, a in enumerate(arrays):
    if out is None:
      out = np.empty((n,) + a.shape, a.dtype)
    out[i] = a
  return out


def _encoded(x) -> bool:
  return isinstance(x, (bytes, bytearray, memoryview))


def _arrays(x, channels):
  return np.stack([images.decode(im, channels) if _encoded(im) else np.asarray(im) for im in x])


@register('none')
def _none(x, rngs, t):
  return _arrays(x, t.channels)


@register('crop_flip')
def _crop_flip(x, rngs, t):
  return random_crop_flip(_arrays(x, t.channels), rngs, pad=4 if t.image_size >= 32 else 2)


@register('cifar')
def _cifar(x, rngs, t):
  return _stacked((images.cifar_train(im, r, t.image_size, t.channels)
                   for im, r in zip(x, rngs)), len(x))


@register('imagenet')
def _imagenet(x, rngs, t):
  return _stacked((images.imagenet_train(im, r, t.image_size, t.channels, t.reduced_decode)
                   for im, r in zip(x, rngs)), len(x))


@register('imagenet_eval')
def _imagenet_eval(x, rngs, t):
  return _stacked((images.imagenet_eval(im, t.image_size, t.channels, t.reduced_decode)
                   for im in x), len(x))


@register('center')
def _center(x, rngs, t):
  return _stacked((images.center(im, t.image_size, t.channels) for im in x), len(x))


KINDS = tuple(TRANSFORMS)       # the names, for validate.py


@dataclasses.dataclass(frozen=True)
class BatchTransform:
  """The transform `kind` (a name of TRANSFORMS) to the model's image size and channels:
  (batch, seed) -> batch, a pure function of both."""
  kind: str
  image_size: int
  channels: int = 3
  reduced_decode: bool = True

  def __post_init__(self):
    if self.kind not in TRANSFORMS:
      raise ValueError(f'unknown augmentation {self.kind!r}: use one of {", ".join(KINDS)}')

  def __call__(self, batch, seed: int = 0):
    rngs = [np.random.default_rng((seed, int(i))) for i in batch['index']]
    x = TRANSFORMS[self.kind](batch['image'], rngs, self)
    size, c = self.image_size, self.channels
    if x.shape[1:] != (size, size, c):
      raise DataError(f'images of shape {x.shape[1:]} where the model takes '
                      f'{(size, size, c)}: set --config.data.image_size and channels, or an '
                      f'augmentation that resizes (center, imagenet_eval)')
    return dict(batch, image=x)


def from_config(data_config, kind: str) -> BatchTransform:
  """The transform `kind` (data.train_augment or data.eval_augment) for `data_config`'s
  images."""
  return BatchTransform(kind, data_config.image_size, data_config.channels,
                        data_config.reduced_decode)
