"""Batched numpy augmentation for datasets of fixed-size arrays (Fashion-MNIST), with one
`np.random.Generator` per example, seeded by (epoch seed, example index): an example's
augmentation does not depend on which batch, or which process, it lands in.

  Fashion-MNIST (ours): random crop 28 from the image padded by 2 pixels, horizontal flip.

The original's PIL transforms (ImageNet, CIFAR) are in `images.py`.
"""

import numpy as np


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
