"""Batch augmentations in numpy, with one `np.random.Generator` per example.

Each example draws its random parameters from its own generator, seeded by (epoch seed,
example index): an example's augmentation does not depend on which batch, or which process,
it lands in.

The original's recipes (SPEC.md, "Training recipes"):
  CIFAR:    random resized crop 32 (scale 0.2-1), grayscale p=0.2, colour jitter 0.4 (brightness,
            contrast, saturation, hue), horizontal flip.
  ImageNet: random resized crop 224 (scale 0.08-1), horizontal flip; evaluation: resize 256,
            centre crop 224.
  Fashion-MNIST (ours): random crop 28 from the image padded by 2 pixels, horizontal flip.

Images enter as uint8 (B, H, W, C) batches, or lists of (H, W, C) arrays of different sizes, and
leave as normalised float32 (B, h, w, C). Resizing is bilinear with half-pixel centres (as
torchvision's tensor path without antialiasing). ColorJitter applies its four factors in a fixed
order (brightness, contrast, saturation, hue) rather than torchvision's random order.
"""

import numpy as np

_GRAY = np.array([0.299, 0.587, 0.114], np.float32)


def normalize(images, mean, std):
  """Images in [0, 1] -> (x - mean) / std, float32."""
  x = np.asarray(images, np.float32)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


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


def _crop_resize_one(image, box, size):
  """Bilinear resize of image[y0:y0+h, x0:x0+w] (float box) to (size, size)."""
  y0, x0, h, w = box
  ih, iw = image.shape[:2]
  ys = np.clip(y0 + (np.arange(size) + 0.5) * h / size - 0.5, 0, ih - 1)
  xs = np.clip(x0 + (np.arange(size) + 0.5) * w / size - 0.5, 0, iw - 1)
  y_lo = np.floor(ys).astype(np.int64)
  x_lo = np.floor(xs).astype(np.int64)
  y_hi = np.minimum(y_lo + 1, ih - 1)
  x_hi = np.minimum(x_lo + 1, iw - 1)
  wy = (ys - y_lo)[:, None, None].astype(np.float32)
  wx = (xs - x_lo)[None, :, None].astype(np.float32)
  img = np.asarray(image, np.float32)
  top = img[y_lo][:, x_lo] * (1 - wx) + img[y_lo][:, x_hi] * wx
  bottom = img[y_hi][:, x_lo] * (1 - wx) + img[y_hi][:, x_hi] * wx
  return top * (1 - wy) + bottom * wy


def _random_box(rng, ih, iw, scale, ratio):
  """torchvision RandomResizedCrop.get_params: 10 tries, then a centre crop fallback."""
  area = ih * iw
  log_ratio = np.log(ratio)
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*log_ratio))
    w = int(round(np.sqrt(target * aspect)))
    h = int(round(np.sqrt(target / aspect)))
    if 0 < w <= iw and 0 < h <= ih:
      return rng.integers(0, ih - h + 1), rng.integers(0, iw - w + 1), h, w
  in_ratio = iw / ih
  if in_ratio < ratio[0]:
    w, h = iw, int(round(iw / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = ih, int(round(ih * ratio[1]))
  else:
    h, w = ih, iw
  return (ih - h) // 2, (iw - w) // 2, h, w


def random_resized_crop(images, rngs, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """Random area/aspect crop resized to (size, size); images in [0, 255] -> float32."""
  out = []
  for image, rng in zip(images, rngs):
    ih, iw = image.shape[:2]
    out.append(_crop_resize_one(image, _random_box(rng, ih, iw, scale, ratio), size))
  return np.stack(out)


def resize_center_crop(images, resize: int, crop: int):
  """Resize the shorter side to `resize`, then take the central (crop, crop)."""
  out = []
  for image in images:
    ih, iw = image.shape[:2]
    side = crop * min(ih, iw) / resize            # the crop, in input pixels
    out.append(_crop_resize_one(image, ((ih - side) / 2, (iw - side) / 2, side, side), crop))
  return np.stack(out)


def random_flip(images, rngs):
  flip = _draw(rngs, lambda r: r.random() < 0.5)
  return np.where(flip[:, None, None, None], images[:, :, ::-1], images)


def _blend(a, b, factor):
  return np.clip(factor * a + (1 - factor) * b, 0.0, 1.0)


def _rgb_to_hsv(rgb):
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc = rgb.max(-1)
  minc = rgb.min(-1)
  delta = maxc - minc
  s = np.where(maxc > 0, delta / np.maximum(maxc, 1e-12), 0.0)
  safe = np.maximum(delta, 1e-12)
  rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
  h = np.where(maxc == r, bc - gc, np.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  return np.stack([h, s, maxc], -1)


def _hsv_to_rgb(hsv):
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  i = np.floor(h * 6.0)
  f = h * 6.0 - i
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  i = i.astype(np.int64) % 6
  choices = [np.stack(c, -1) for c in
             ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
  return np.choose(i[..., None], choices)


def color_jitter(images, rngs, strength=0.4):
  """Brightness, contrast, saturation (factors in [1-s, 1+s]) and hue (shift in [-s, s],
  capped at 0.5) on float images in [0, 1]."""
  h = min(strength, 0.5)
  draws = _draw(rngs, lambda r: np.concatenate(
      [r.uniform(1 - strength, 1 + strength, size=3), r.uniform(-h, h, size=1)]))
  draws = draws.astype(np.float32)[:, None, None, :]               # (B, 1, 1, 4)
  x = images
  x = _blend(x, np.zeros_like(x), draws[..., 0:1])
  mean = (x @ _GRAY).mean(axis=(1, 2))[:, None, None, None]
  x = _blend(x, mean, draws[..., 1:2])
  x = _blend(x, (x @ _GRAY)[..., None], draws[..., 2:3])
  hue = draws[..., 3]
  hsv = _rgb_to_hsv(x)
  hsv[..., 0] = (hsv[..., 0] + hue) % 1.0
  return _hsv_to_rgb(hsv).astype(np.float32)


def random_grayscale(images, rngs, p=0.2):
  gray = (images @ _GRAY)[..., None]
  pick = _draw(rngs, lambda r: r.random() < p)
  return np.where(pick[:, None, None, None], np.broadcast_to(gray, images.shape), images)
