"""Decoding and per-image transforms on PIL, with torchvision's semantics.

The original reads every image with PIL (`Image.open(f).convert('RGB')`) and transforms it with
torchvision's PIL path, whose resizes are PIL's bilinear filter, antialiased when reducing. This
module does the same operations with the same library (Pillow, or Pillow-SIMD where `make`
could build it: the same API and filters, several times faster resizes), one example at a time,
each example's random parameters drawn from its own `np.random.Generator`. Everything returns
uint8 HWC arrays: conversion to float and normalisation happen on the accelerator.

Colour and grayscale JPEGs (nearly all photos) are decoded by simplejpeg, libjpeg-turbo with the
same (exact) DCT and upsampling as PIL's decoder: the same pixels, about 30% sooner
(benchmarks/input_pipeline.py). Like PIL, it takes libjpeg's warnings ("Corrupt JPEG data": a
data segment that ends early, stray bytes before a marker; PIL decodes such files, so preparing
keeps them and the original trains on them) as no error, and a JPEG it cannot decode goes to
PIL. Other files (PNG, CMYK JPEGs, ...) are decoded by PIL.

One speed-up departs from the original, and only where it cannot be seen at the output size:
with `reduced=True`, a JPEG whose crop is at least twice the output size in both directions is
decoded at 1/2, 1/4 or 1/8 scale by libjpeg, the largest reduction that keeps the crop at
least as large as the output; the antialiased resize then does the rest.
"""

import io
import math

import numpy as np
import simplejpeg
from PIL import Image, ImageEnhance

# torchvision.datasets.folder.IMG_EXTENSIONS: the files an ImageFolder counts as images.
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
_MODES = {1: 'L', 3: 'RGB'}


def open_image(x) -> Image.Image:
  """Encoded bytes (not yet decoded: PIL reads the header only) or a uint8 HWC array -> PIL."""
  if isinstance(x, Image.Image):
    return x
  if isinstance(x, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(x))
  x = np.asarray(x)
  return Image.fromarray(x[..., 0] if x.ndim == 3 and x.shape[-1] == 1 else x)


def _jpeg_size(x):
  """(height, width) of a colour or grayscale JPEG that simplejpeg decodes exactly as PIL
  does, read from its header; None for anything else."""
  if not isinstance(x, bytes) or x[:2] != b'\xff\xd8':
    return None
  try:
    h, w, colorspace, _ = simplejpeg.decode_jpeg_header(x)
  except ValueError:
    return None
  return (h, w) if colorspace in ('YCbCr', 'Gray') else None


def _jpeg(x, height=0, width=0):
  """simplejpeg's RGB decode of at least height x width (libjpeg's scaled decoding), warnings
  not raised (PIL raises none); None where it cannot decode `x`, which PIL then tries."""
  try:
    return simplejpeg.decode_jpeg(x, 'RGB', min_height=height, min_width=width, strict=False)
  except ValueError:
    return None


def _scale(height, width, need_h, need_w, reduced) -> int:
  """The largest of 8, 4, 2 (else 1) that leaves at least need_h x need_w of height x width."""
  for s in ((8, 4, 2) if reduced else ()):
    if -(-height // s) >= need_h and -(-width // s) >= need_w:
      return s
  return 1


def _pixels(x, channels, need_w=0.0, need_h=0.0, reduced=False):
  """(the image, its full (width, height)): an RGB uint8 array where simplejpeg decodes it,
  else a PIL image in the mode for `channels`; a JPEG at reduced scale where `reduced` allows
  and need_w x need_h of the full size's pixels remain."""
  size = _jpeg_size(x) if channels == 3 else None
  if size is not None:
    h, w = size
    s = _scale(h, w, math.ceil(need_h), math.ceil(need_w), reduced)
    pixels = _jpeg(x, -(-h // s), -(-w // s))
    if pixels is not None:
      return pixels, (w, h)
  image = open_image(x)
  full = image.size
  if reduced and image.format == 'JPEG':         # libjpeg's scaled decoding, through PIL
    s = _scale(full[1], full[0], math.ceil(need_h), math.ceil(need_w), reduced)
    if s > 1:   # draft scales by the largest of 8, 4, 2, 1 not above full // size: s itself
      image.draft(image.mode, (max(full[0] // s, 1), max(full[1] // s, 1)))
  return _as_mode(image, channels), full


def _as_mode(image: Image.Image, channels: int) -> Image.Image:
  """The original's loader: `.convert('RGB')` (grayscale, CMYK, palette, RGBA all become RGB;
  alpha is dropped); 'L' for single-channel datasets."""
  mode = _MODES[channels]
  return image if image.mode == mode else image.convert(mode)


def _to_array(image: Image.Image, channels: int) -> np.ndarray:
  x = np.asarray(image, np.uint8)
  return x[..., None] if channels == 1 else x


def decode(x, channels: int = 3) -> np.ndarray:
  """The whole image at full size, as (H, W, channels) uint8."""
  pixels = _jpeg(x) if channels == 3 and _jpeg_size(x) is not None else None
  if pixels is not None:
    return pixels
  return _to_array(_as_mode(open_image(x), channels), channels)


def random_box(rng, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop.get_params: (top, left, h, w) of a crop of random area
  and aspect ratio; 10 tries, then the centre crop of the allowed aspect ratio."""
  area = height * width
  log_ratio = np.log(ratio)
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def _crop_resize(image, box, full_size, out_size) -> Image.Image:
  """The crop `box` = (top, left, h, w) of the full-size image, resized bilinearly (antialiased)
  to out_size = (width, height). At full size this is torchvision's `crop` then `resize`; on a
  reduced decode the box is scaled to it."""
  top, left, h, w = box
  if isinstance(image, np.ndarray):
    if image.shape[1::-1] == tuple(full_size):            # crop the array: copy only the crop
      return Image.fromarray(image[top:top + h, left:left + w]).resize(out_size, Image.BILINEAR)
    image = Image.fromarray(image)
  if image.size == tuple(full_size):
    return image.crop((left, top, left + w, top + h)).resize(out_size, Image.BILINEAR)
  sx, sy = image.size[0] / full_size[0], image.size[1] / full_size[1]
  return image.resize(out_size, Image.BILINEAR,
                      box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))


def _full_size(x):
  """(width, height), from the header alone."""
  size = _jpeg_size(x)
  return (size[1], size[0]) if size is not None else open_image(x).size


def random_resized_crop(x, rng, size: int, *, channels: int = 3, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), reduced: bool = True) -> Image.Image:
  """torchvision's RandomResizedCrop(size, scale, ratio) on the image `x` (bytes or array)."""
  full = _full_size(x)
  box = random_box(rng, full[1], full[0], scale, ratio)
  image, _ = _pixels(x, channels, full[0] * size / box[3], full[1] * size / box[2], reduced)
  return _crop_resize(image, box, full, (size, size))


def resize_center_crop(x, resize: int, crop: int, *, channels: int = 3,
                       reduced: bool = True) -> Image.Image:
  """torchvision's Resize(resize) (shorter side to `resize`, bilinear, antialiased) then
  CenterCrop(crop)."""
  w, h = _full_size(x)
  if w <= h:
    new_w, new_h = resize, int(resize * h / w)
  else:
    new_w, new_h = int(resize * w / h), resize
  image, _ = _pixels(x, channels, new_w, new_h, reduced)
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  if image.size != (new_w, new_h):         # from full size, or the rest of the way
    image = image.resize((new_w, new_h), Image.BILINEAR)
  top = int(round((new_h - crop) / 2.0))
  left = int(round((new_w - crop) / 2.0))
  return image.crop((left, top, left + crop, top + crop))


def random_flip(image: Image.Image, rng, p: float = 0.5) -> Image.Image:
  return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < p else image


def random_grayscale(image: Image.Image, rng, p: float = 0.2) -> Image.Image:
  """torchvision's RandomGrayscale on an RGB image: L = ITU-R 601-2 luma, copied to 3 channels."""
  if rng.random() < p:
    return image.convert('L').convert('RGB')
  return image


def _adjust_hue(image: Image.Image, hue: float) -> Image.Image:
  """torchvision's adjust_hue on PIL: shift H of PIL's HSV by hue * 255, modulo 256."""
  h, s, v = image.convert('HSV').split()
  shifted = np.asarray(h, np.uint8) + np.array(np.int8(hue * 255)).astype(np.uint8)
  return Image.merge('HSV', (Image.fromarray(shifted, 'L'), s, v)).convert(image.mode)


def color_jitter(image: Image.Image, rng, strength: float = 0.4) -> Image.Image:
  """torchvision's ColorJitter(s, s, s, min(s, 0.5)): brightness, contrast and saturation
  factors in [1 - s, 1 + s] and a hue shift in [-s, s], applied in a random order."""
  factors = rng.uniform(1 - strength, 1 + strength, size=3)
  hue = rng.uniform(-min(strength, 0.5), min(strength, 0.5))
  ops = (lambda im: ImageEnhance.Brightness(im).enhance(factors[0]),
         lambda im: ImageEnhance.Contrast(im).enhance(factors[1]),
         lambda im: ImageEnhance.Color(im).enhance(factors[2]),
         lambda im: _adjust_hue(im, hue))
  for i in rng.permutation(4):
    image = ops[i](image)
  return image


def imagenet_train(x, rng, size: int, channels: int = 3, reduced: bool = True) -> np.ndarray:
  """The original's ImageNet training transform: RandomResizedCrop(size), RandomHorizontalFlip."""
  # Flipped by PIL, which lets go of the GIL while it copies; a flipped numpy view, copied
  # into the batch pixel by pixel, held it (BENCHMARKS.md, the input pipeline).
  image = random_flip(random_resized_crop(x, rng, size, channels=channels, reduced=reduced),
                      rng)
  return _to_array(image, channels)


def imagenet_eval(x, size: int, channels: int = 3, reduced: bool = True) -> np.ndarray:
  """The original's ImageNet evaluation transform: Resize(size * 256 / 224), CenterCrop(size)."""
  return _to_array(resize_center_crop(x, size * 256 // 224, size, channels=channels,
                                      reduced=reduced), channels)


def cifar_train(x, rng, size: int, channels: int = 3) -> np.ndarray:
  """The original's CIFAR training transform (its cifar.py): RandomResizedCrop(size,
  scale=(0.2, 1)), RandomGrayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4), RandomHorizontalFlip."""
  image = random_resized_crop(x, rng, size, channels=channels, scale=(0.2, 1.0), reduced=False)
  if channels == 3:
    image = color_jitter(random_grayscale(image, rng), rng, 0.4)
  return _to_array(random_flip(image, rng), channels)


def center(x, size: int, channels: int = 3) -> np.ndarray:
  """Decoded as it is when it has the model's size; otherwise resized and centre-cropped like
  the evaluation transform (Resize(size), CenterCrop(size))."""
  image = _as_mode(open_image(x), channels)     # small images: PIL throughout
  if image.size != (size, size):
    return _to_array(resize_center_crop(image, size, size, channels=channels, reduced=False),
                     channels)
  return _to_array(image, channels)
