"""Decoding and the original's transforms (images.py) against torchvision's documented rules,
on real encoded files: torchvision itself does not load beside this project's CPU torch, so
each rule is written out here from its documentation and checked pixel for pixel."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from snca_jax.data import folder
from snca_jax.data import images
from snca_jax.data import transforms

from conftest import FORMATS, class_image, encode_image


def _photo(h=375, w=500, seed=0):
  return class_image(seed % 4, h, w, np.random.default_rng(seed))


@pytest.mark.parametrize('fmt,mode,ext', FORMATS)
def test_decode_is_the_original_loader(fmt, mode, ext):
  """pil_loader: Image.open(f).convert('RGB'), whatever the file's mode."""
  data = encode_image(_photo(37, 53), fmt, mode)
  want = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
  got = images.decode(data, 3)
  assert got.shape == (37, 53, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, want)
  gray = images.decode(data, 1)
  np.testing.assert_array_equal(gray[..., 0], np.asarray(Image.open(io.BytesIO(data)).convert('L')))


def test_random_box_follows_get_params():
  """RandomResizedCrop.get_params: area fraction in scale, aspect ratio in ratio, inside the
  image; the centre-crop fallback for a very thin image."""
  rng = np.random.default_rng(0)
  for _ in range(500):
    top, left, h, w = images.random_box(rng, 375, 500)
    assert 0 <= top <= 375 - h and 0 <= left <= 500 - w
    assert 0.08 * 375 * 500 * 0.95 <= h * w <= 375 * 500 * 1.0001
    assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
  # 10 x 1000: no try fits (aspect ratio at most 4/3), so the fallback: h = height,
  # w = round(h * 4/3), centred.
  assert images.random_box(np.random.default_rng(1), 10, 1000) == (0, (1000 - 13) // 2, 10, 13)
  assert images.random_box(np.random.default_rng(1), 1000, 10) == ((1000 - 13) // 2, 0, 13, 10)


def _torchvision_train(data, rng_for_box, flip, size):
  """The original's transform with the box and flip given: crop, then resize (bilinear,
  PIL's antialiased filter), then flip: torchvision's F.resized_crop and F.hflip on PIL."""
  image = Image.open(io.BytesIO(data)).convert('RGB')
  top, left, h, w = rng_for_box
  image = image.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
  return np.asarray(image.transpose(Image.FLIP_LEFT_RIGHT) if flip else image)


@pytest.mark.parametrize('fmt,mode,ext', FORMATS[:5])
def test_imagenet_train_is_the_original_transform(fmt, mode, ext):
  data = encode_image(_photo(333, 500, seed=3), fmt, mode)
  for seed in range(6):
    got = images.imagenet_train(data, np.random.default_rng(seed), 224, reduced=False)
    r = np.random.default_rng(seed)            # the same draws, in the same order
    box = images.random_box(r, 333, 500)
    want = _torchvision_train(data, box, r.random() < 0.5, 224)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('damage', ['cut', 'stray'])
@pytest.mark.parametrize('mode', ['RGB', 'L'])
def test_jpegs_that_libjpeg_warns_about_decode_as_pil_does(mode, damage, tmp_path, monkeypatch):
  """A JPEG whose data segment ends early, or with stray bytes before its end marker: libjpeg
  warns ("Corrupt JPEG data: ..."), PIL decodes it, so preparing keeps it and the original
  trains on it. Every transform must decode it too, to PIL's pixels; and a JPEG that simplejpeg
  cannot decode goes to PIL."""
  whole = encode_image(_photo(333, 500, seed=5), 'JPEG', mode)
  data = (whole[:len(whole) // 2] if damage == 'cut' else whole[:-2] + b'\xab' * 240) + whole[-2:]
  path = tmp_path / 'damaged.jpg'
  path.write_bytes(data)
  assert folder._read_or_error(str(path)) == (data, None)        # preparing keeps it
  pil = Image.open(io.BytesIO(data)).convert('RGB')
  np.testing.assert_array_equal(images.decode(data), np.asarray(pil))
  for seed in range(4):
    r = np.random.default_rng(seed)
    want = _torchvision_train(data, images.random_box(r, 333, 500), r.random() < 0.5, 224)
    got = images.imagenet_train(data, np.random.default_rng(seed), 224, reduced=False)
    np.testing.assert_array_equal(got, want)

  def reduced():     # libjpeg's scaled decoding: by simplejpeg, else through PIL's draft
    return ([images.imagenet_train(data, np.random.default_rng(s), 64) for s in range(4)]
            + [images.imagenet_eval(data, 64)])
  fast = reduced()

  def cannot(*args, **kwargs):
    raise ValueError('cannot decode')
  monkeypatch.setattr(images.simplejpeg, 'decode_jpeg', cannot)
  np.testing.assert_array_equal(reduced(), fast)
  np.testing.assert_array_equal(images.decode(data), np.asarray(pil))


def test_reduced_jpeg_decode_matches_full_decode_closely():
  """A crop at least twice the output size: libjpeg's reduced decode, then the antialiased
  resize; close to the full-size decode's result, not equal."""
  data = encode_image(_photo(600, 800, seed=1), 'JPEG', 'RGB')
  close = 0
  for seed in range(20):
    full = images.imagenet_train(data, np.random.default_rng(seed), 112, reduced=False)
    fast = images.imagenet_train(data, np.random.default_rng(seed), 112, reduced=True)
    assert fast.shape == full.shape == (112, 112, 3)
    diff = np.abs(fast.astype(int) - full.astype(int))
    assert diff.mean() < 4.0, (seed, diff.mean())
    close += diff.max() == 0
  assert close < 20        # some crops were decoded at reduced scale


def test_imagenet_eval_is_resize_then_center_crop():
  for h, w in ((375, 500), (500, 333), (256, 256), (240, 300)):
    data = encode_image(_photo(h, w, seed=h), 'PNG', 'RGB')
    got = images.imagenet_eval(data, 224, reduced=False)
    image = Image.open(io.BytesIO(data)).convert('RGB')
    short, long = min(h, w), max(h, w)
    new_long = int(256 * long / short)           # torchvision's Resize(256) size rule
    size = (256, new_long) if w <= h else (new_long, 256)
    if (w, h) != size:
      image = image.resize(size, Image.BILINEAR)
    top, left = int(round((image.size[1] - 224) / 2.0)), int(round((image.size[0] - 224) / 2.0))
    want = np.asarray(image.crop((left, top, left + 224, top + 224)))
    np.testing.assert_array_equal(got, want)


def test_antialiased_like_pil():
  """A fine stripe pattern reduced 4x averages out to grey (aliasing would keep stripes)."""
  x = np.zeros((400, 400, 3), np.uint8)
  x[:, ::2] = 255
  out = images.imagenet_eval(encode_image(x, 'PNG', 'RGB'), 87, reduced=False).astype(float)
  assert abs(out.mean() - 127.5) < 3 and out.std() < 3


def test_color_jitter_is_torchvisions_on_pil():
  """ColorJitter(0.4, 0.4, 0.4, 0.4): factors and hue drawn, applied in a random order with
  PIL's ImageEnhance and torchvision's uint8 hue shift."""
  from PIL import ImageEnhance
  image = Image.fromarray(_photo(32, 32, seed=5))
  for seed in range(5):
    got = np.asarray(images.color_jitter(image, np.random.default_rng(seed), 0.4))
    r = np.random.default_rng(seed)
    b, c, s = r.uniform(0.6, 1.4, size=3)
    hue = r.uniform(-0.4, 0.4)
    want = image
    for i in r.permutation(4):
      if i == 0:
        want = ImageEnhance.Brightness(want).enhance(b)
      elif i == 1:
        want = ImageEnhance.Contrast(want).enhance(c)
      elif i == 2:
        want = ImageEnhance.Color(want).enhance(s)
      else:
        hh, ss, vv = want.convert('HSV').split()
        np_h = np.array(hh, dtype=np.uint8)
        with np.errstate(over='ignore'):
          np_h += np.array(np.int8(hue * 255)).astype(np.uint8)
        want = Image.merge('HSV', (Image.fromarray(np_h, 'L'), ss, vv)).convert('RGB')
    np.testing.assert_array_equal(got, np.asarray(want))


@pytest.mark.parametrize('kind,size', [('cifar', 32), ('imagenet', 24), ('imagenet_eval', 24),
                                       ('center', 24)])
def test_transforms_on_a_batch_of_mixed_files(kind, size):
  files = [encode_image(_photo(h, w, seed=i), fmt, mode)
           for i, ((fmt, mode, _), (h, w)) in enumerate(zip(FORMATS, ((40, 50), (32, 32),
                                                                       (64, 36), (20, 24),
                                                                       (600, 410), (33, 33),
                                                                       (90, 91))))]
  t = transforms.BatchTransform(kind, size, 3)
  batch = {'image': files, 'index': np.arange(len(files))}
  out = t(batch, 5)['image']
  assert out.shape == (len(files), size, size, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, t(batch, 5)['image'])          # a pure function
  if kind in ('cifar', 'imagenet'):
    assert not np.array_equal(out, t(batch, 6)['image'])
  moved = t({'image': files[::-1], 'index': np.arange(len(files))[::-1]}, 5)['image']
  np.testing.assert_array_equal(moved[::-1], out)   # an example's result is its own


def test_images_of_the_wrong_size_are_a_clear_error():
  t = transforms.BatchTransform('none', 28, 3)
  batch = {'image': [encode_image(_photo(30, 30), 'PNG', 'RGB')], 'index': np.arange(1)}
  with pytest.raises(Exception, match='image_size'):
    t(batch, 0)


def test_reduced_decode_keeps_enough_pixels():
  """The reduced scale (1/2, 1/4 or 1/8) never leaves the crop smaller than the output."""
  data = encode_image(_photo(600, 800, seed=2), 'JPEG', 'RGB')
  scales = set()
  for seed in range(40):
    top, left, h, w = images.random_box(np.random.default_rng(seed), 600, 800)
    image, full = images._pixels(data, 3, 800 * 64 / w, 600 * 64 / h, reduced=True)
    assert full == (800, 600)
    scale = image.shape[1] / 800
    scales.add(800 // image.shape[1])
    assert math.floor(w * scale) >= 63 and math.floor(h * scale) >= 63
  assert {2, 4} <= scales <= {1, 2, 4, 8}
