"""Input pipeline throughput per core: the ImageNet training transform from JPEG bytes.

    python benchmarks/input_pipeline.py [--n 256] [--batch 32]
    python benchmarks/input_pipeline.py --end_to_end [--n 12800] [--threads 3,4]

Everything runs on one thread of one core, on the same JPEGs of ImageNet size (500x375, quality
90), in one run:
  decode       the full-size decode to RGB, nothing else, by PIL (the original's decoder) and
               by simplejpeg (ours, for colour and grayscale JPEGs: the same pixels): the
               floor for any transform that looks at every pixel
  original     the original's transform, written from torchvision's documented PIL path:
               PIL decode, RandomResizedCrop(224) (get_params with torch's generator, crop,
               bilinear antialiased resize), RandomHorizontalFlip, ToTensor, Normalize
  ours         snca_jax's `BatchTransform('imagenet', 224)` on batches (decode, the same crop rule,
               flip, uint8 batch; normalisation happens on the accelerator), with and without
               libjpeg's reduced-size decoding
  eval         both sides' evaluation transform, Resize(256) + CenterCrop(224)
Then the cores needed to feed 3,000 images/s, and the rate of preparing an image folder.

`--end_to_end` measures what training gets instead, on a folder of --n such JPEGs (256 photos
repeated): preparing it with one thread, with two threads a core and with a worker process a
core, against the cores times the one-thread rate; then whole epochs read as train.py reads
them (`pipeline.run_batches`, the ImageNet training transform, batches of 128, each epoch
starting its readers) with each recipe's reader settings and with grain worker processes, in
three rounds in turns, each epoch against the cores times that round's rate of the same
transform on one core; medians over the rounds.

The images are real photos where scikit-learn is installed (its two sample images, China and
a flower, cut into 500x375 views and re-encoded), else synthetic pictures with noise.
"""

import argparse
import io
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import PIL
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from snca_jax.data import folder  # noqa: E402
from snca_jax.data import images  # noqa: E402
from snca_jax.data import transforms  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def sample_photos():
  """scikit-learn's two sample photos (China, a flower) as RGB arrays, as its
  `load_sample_images` gives them, read from its package files without importing it (which
  brings joblib's loky: on the GPU host's Python 3.12 its semaphores drew 441 lines of
  resource-tracker warnings into gpu.sh's log once grain's workers ran); None without it."""
  import importlib.util
  spec = importlib.util.find_spec('sklearn')
  if spec is None:
    return None
  directory = os.path.join(spec.submodule_search_locations[0], 'datasets', 'images')
  return [np.asarray(Image.open(os.path.join(directory, name)).convert('RGB'))
          for name in sorted(os.listdir(directory)) if name.endswith('.jpg')]


def photos(n, seed=0):
  """n JPEGs of 500x375 (quality 90)."""
  rng = np.random.default_rng(seed)
  sources = sample_photos()
  kind = 'real photos (scikit-learn sample images)' if sources else 'synthetic pictures'
  out = []
  for i in range(n):
    if sources is not None:
      src = sources[i % len(sources)]
      s = rng.uniform(0.75, 0.85)
      h, w = int(375 * s * 427 / 375), int(500 * s * 427 / 375)
      top, left = rng.integers(0, src.shape[0] - h + 1), rng.integers(0, src.shape[1] - w + 1)
      image = Image.fromarray(src[top:top + h, left:left + w]).resize((500, 375), Image.BICUBIC)
      if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    else:
      y, x = np.mgrid[0:375, 0:500] / 40.0
      a = np.stack([np.sin(x + rng.uniform(0, 6)), np.cos(y * rng.uniform(0.5, 2)),
                    np.sin(x * y / 10)], -1) * 60 + 128 + rng.normal(0, 10, (375, 500, 3))
      image = Image.fromarray(a.clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, 'JPEG', quality=90)
    out.append(buf.getvalue())
  return out, kind


def original_train(torch):
  """The original's training transform, torchvision's PIL path written out."""
  import math
  mean = torch.as_tensor(MEAN).view(-1, 1, 1)
  std = torch.as_tensor(STD).view(-1, 1, 1)
  log_ratio = torch.log(torch.tensor((3 / 4, 4 / 3)))

  def get_params(width, height):
    area = height * width
    for _ in range(10):
      target_area = area * torch.empty(1).uniform_(0.08, 1.0).item()
      aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
      w = int(round(math.sqrt(target_area * aspect)))
      h = int(round(math.sqrt(target_area / aspect)))
      if 0 < w <= width and 0 < h <= height:
        i = torch.randint(0, height - h + 1, size=(1,)).item()
        j = torch.randint(0, width - w + 1, size=(1,)).item()
        return i, j, h, w
    return 0, 0, height, width

  def to_tensor_normalize(image):
    t = torch.from_numpy(np.array(image, np.uint8, copy=True))
    t = t.view(image.size[1], image.size[0], 3).permute((2, 0, 1)).contiguous()
    t = t.to(dtype=torch.float32).div(255)
    return t.sub_(mean).div_(std)

  def transform(data):
    with open_bytes(data) as f:
      image = Image.open(f).convert('RGB')
    i, j, h, w = get_params(*image.size)
    image = image.crop((j, i, j + w, i + h)).resize((224, 224), Image.BILINEAR)
    if torch.rand(1) < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor_normalize(image)

  def eval_transform(data):
    with open_bytes(data) as f:
      image = Image.open(f).convert('RGB')
    w, h = image.size
    size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    image = image.resize(size, Image.BILINEAR)
    top, left = int(round((size[1] - 224) / 2.0)), int(round((size[0] - 224) / 2.0))
    return to_tensor_normalize(image.crop((left, top, left + 224, top + 224)))

  return transform, eval_transform


def open_bytes(data):
  return io.BytesIO(data)


def rate(fn, items, repeat):
  """Images per second of fn over items (fn takes one item, or a batch where items are
  batches), best of `repeat` passes."""
  fn(items[0])
  best = 0.0
  for _ in range(repeat):
    t0 = time.perf_counter()
    count = 0
    for x in items:
      fn(x)
      count += len(x['image']) if isinstance(x, dict) else 1
    best = max(best, count / (time.perf_counter() - t0))
  return best


def gil_share(transform, batches):
  """The share of the transform's time (one thread) spent outside libjpeg-turbo's decoding and
  PIL's crops, resizes and flips, the calls that release the GIL: the rest holds it (Python,
  numpy, copies)."""
  import simplejpeg
  inside = [0.0]

  def timed(fn):
    def call(*args, **kwargs):
      t0 = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        inside[0] += time.perf_counter() - t0
    return call

  decode, resize = simplejpeg.decode_jpeg, Image.Image.resize
  crop, transpose = Image.Image.crop, Image.Image.transpose
  simplejpeg.decode_jpeg, Image.Image.resize = timed(decode), timed(resize)
  Image.Image.crop, Image.Image.transpose = timed(crop), timed(transpose)
  try:
    transform(batches[0], 1)
    inside[0] = 0.0
    t0 = time.perf_counter()
    for b in batches:
      transform(b, 1)
    total = time.perf_counter() - t0
  finally:
    simplejpeg.decode_jpeg, Image.Image.resize = decode, resize
    Image.Image.crop, Image.Image.transpose = crop, transpose
  return 1 - inside[0] / total


def end_to_end(n, batch, smoke, more_threads=()):
  """Prepare rates and whole epochs through the pipeline, against cores x one core;
  `more_threads`: more rows, epochs read by that many threads in this process."""
  from configs import folder as folder_recipe
  from configs import imagenet_resnet50
  from snca_jax import distributed
  from snca_jax.data import pipeline
  from absl import flags
  flags.FLAGS.mark_as_parsed()            # grain's worker processes read absl flags
  cores = distributed.local_cores()
  unique, kind = photos(min(n, 256))
  data = [unique[i % len(unique)] for i in range(n)]
  print(f'{n} JPEGs of 500x375 ({len(unique)} {kind}, repeated), {cores} cores, '
        f'Pillow{"-SIMD" if "post" in PIL.__version__ else ""} {PIL.__version__}\n')
  tmp = tempfile.mkdtemp()
  try:
    split = os.path.join(tmp, 'train')
    for i, d in enumerate(data):
      os.makedirs(os.path.join(split, f'n{i % 8:08d}'), exist_ok=True)
      with open(os.path.join(split, f'n{i % 8:08d}', f'img_{i:05d}.JPEG'), 'wb') as f:
        f.write(d)
    prepares = [('one thread', 1, 0), ('threads, two per core', None, 0),
                (f'{cores} worker processes', None, cores)]
    prepares = prepares[:2] if smoke else prepares     # smoke: no spawning
    rounds = 1 if smoke else 3        # in turns, as the epochs below; medians over the rounds
    rates = {name: [] for name, _, _ in prepares}
    busy = {name: [] for name, _, _ in prepares}
    for r in range(rounds):
      for name, threads, workers in prepares:
        out = os.path.join(tmp, 'prepared' if r == 0 and threads == 1 else 'again')
        t0, cpu0 = time.perf_counter(), time.process_time()
        folder.prepare(split, out, num_threads=threads, num_workers=workers, show_progress=False)
        rates[name].append(n / (time.perf_counter() - t0))
        busy[name].append((time.process_time() - cpu0) * rates[name][-1] / n)
        if out.endswith('again'):
          shutil.rmtree(out)
    one = np.median(rates['one thread'])
    for name, values in rates.items():
      print(f'prepare, {name + ":":26s} {np.median(values):7.0f} images/s = '
            f'{np.median(values) / (cores * one):.2f} x cores x one thread, this process '
            f'{np.median(busy[name]):.2f} cores busy (median of {rounds}: '
            f'{", ".join(f"{v:.0f}" for v in values)} images/s)')
    default = folder.check_workers(None, n, cores)
    print(f'(preparing {n} files on {cores} cores reads them with '
          f'{f"{default} worker processes" if default else "threads"} by default)\n')
    source = folder.FolderSource(os.path.join(tmp, 'prepared'))
    order = np.random.default_rng(0).permutation(n)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(0, n, batch):
      source.__getitems__(order[i:i + batch])
    print(f'reading the prepared records in batches of {batch}, shuffled, one thread: '
          f'{(time.perf_counter() - t0) / n * 1e6:.1f} us an image '
          f'({(time.process_time() - cpu0) / n * 1e6:.1f} us of CPU)\n')
    transform = transforms.BatchTransform('imagenet', 224, 3, reduced_decode=True)
    batches = [{'image': data[i:i + batch], 'index': np.arange(i, min(i + batch, n))}
               for i in range(0, min(n, 1024), batch)]
    g = gil_share(transform, batches)
    print(f'of the transform\'s time, {1 - g:.0%} in decoding, cropping, resizing and flipping '
          f'(GIL released), {g:.0%} holding the GIL: one process\'s threads can use at most '
          f'about {1 / g:.0f} cores; {pipeline.THREADS_PER_WORKER} threads keep it '
          f'{pipeline.THREADS_PER_WORKER * g:.0%} busy\n')
    # The readers of each recipe (from the cores) and two more; rows of the same readers once.
    many = pipeline.THREAD_CORES + 1
    rows = {}
    for name, d in [('configs/imagenet_resnet50.py:folder', imagenet_resnet50.get_config(
                        'folder').data), ('configs/folder.py', folder_recipe.get_config().data)]:
      rows.setdefault(pipeline.readers(d.num_threads, d.worker_count), []).append(
          f'{name} (from the cores)')
    for t in more_threads:
      rows.setdefault((t, 0), []).append(f'{t} threads, no workers')
    rows.setdefault((1, cores), []).append('grain workers, 1 thread each')
    if cores < many:    # one worker's threads where they are most of the cores: the GIL's limit
      rows.setdefault((pipeline.readers(0, -1, many)[0], 1), []).append(
          f'1 grain worker, {pipeline.readers(0, -1, many)[0]} threads (as on >= {many} cores)')
    next(pipeline.run_batches(source, num_epochs=1, global_batch_size=batch, seed=1,
                              transform=transform))   # warm the process, as `rate` does
    # Rounds in turns, each with its own one-core rate, so that the machine's busy spells fall
    # on the epochs and the rate they are divided by alike; medians over the rounds.
    rounds = 1 if smoke else 3
    ones, results = [], {key: [] for key in rows}
    for _ in range(rounds):
      ones.append(rate(lambda b: transform(b, 1), batches, 1))
      for threads, workers in rows:
        t0, cpu0 = time.perf_counter(), time.process_time()
        count, first = 0, None
        for b in pipeline.run_batches(source, num_epochs=1, global_batch_size=batch, seed=0,
                                      transform=transform, num_threads=threads,
                                      worker_count=workers):
          count += len(b['index'])
          first = first or (time.perf_counter(), count)
        end = time.perf_counter()
        whole, steady = count / (end - t0), (count - first[1]) / max(end - first[0], 1e-9)
        results[threads, workers].append((whole, whole / (cores * ones[-1]),
                                          steady / (cores * ones[-1]),
                                          (time.process_time() - cpu0) / count * 1e6))
    print(f'one core, the transform alone (imagenet, 224): {np.median(ones):7.0f} images/s '
          f'(median of {rounds} rounds); {cores} cores: {cores * np.median(ones):.0f}')
    print(f'{"one epoch as train.py reads it (median of " + str(rounds) + " rounds)":52s} '
          f'{"threads":>7s} {"workers":>7s} {"img/s":>7s} {"x cores x one core":>19s} '
          f'{"after 1st batch":>16s} {"main CPU us/img":>16s}')
    for (threads, workers), names in rows.items():
      value, whole, steady, main_cpu = np.median(results[threads, workers], axis=0)
      print(f'{" = ".join(names):52s} {threads:7d} {workers:7d} {value:7.0f} {whole:19.2f} '
            f'{steady:16.2f} {main_cpu:16.0f}')
    print('(after 1st batch: the same ratio from the first batch on, without the start of the '
          'readers;\n main CPU: this process\'s CPU time over the images, its threads\' '
          'included; with worker processes, what receiving their batches costs it)')
  finally:
    shutil.rmtree(tmp)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--n', type=int, default=256, help='JPEGs')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--repeat', type=int, default=3)
  parser.add_argument('--smoke', action='store_true', help='8 JPEGs, one pass: to check that '
                      'it runs')
  parser.add_argument('--end_to_end', action='store_true', help='preparing a folder and whole '
                      'epochs through the pipeline, against cores x one core (--n default 12800)')
  parser.add_argument('--threads', default='', help='with --end_to_end: epochs also read by '
                      'these numbers of threads in this process, comma-separated (e.g. more '
                      'threads than cores)')
  args = parser.parse_args()
  if args.smoke:
    args.n, args.batch, args.repeat = 8, 4, 1
    print('smoke run: tiny sizes, to check that the benchmark runs; its figures mean nothing')
  if args.end_to_end:
    n = args.n if args.smoke or '--n' in sys.argv else 12800
    return end_to_end(n, 4 if args.smoke else 128, args.smoke,
                      [int(t) for t in args.threads.split(',') if t])
  import torch
  torch.set_num_threads(1)
  data, kind = photos(args.n)
  batches = [{'image': data[i:i + args.batch],
              'index': np.arange(i, min(i + args.batch, len(data)))}
             for i in range(0, len(data), args.batch)]
  simd = 'post' in PIL.__version__
  print(f'{args.n} JPEGs of 500x375, quality 90, {np.mean([len(d) for d in data]) / 1024:.0f} '
        f'KiB on average; {kind}. Pillow{"-SIMD" if simd else ""} {PIL.__version__}, '
        f'torch {torch.__version__}, one thread.\n')
  original, original_eval = original_train(torch)
  ours = transforms.BatchTransform('imagenet', 224, 3, reduced_decode=True)
  ours_full = transforms.BatchTransform('imagenet', 224, 3, reduced_decode=False)
  ours_eval = transforms.BatchTransform('imagenet_eval', 224, 3, reduced_decode=True)
  rows = [
      ('decode alone: PIL (as the original)', rate(
          lambda d: np.asarray(Image.open(io.BytesIO(d)).convert('RGB')), data, args.repeat)),
      ('decode alone: ours (simplejpeg)', rate(lambda d: images.decode(d), data, args.repeat)),
      ('original: train transform', rate(original, data, args.repeat)),
      ('ours: train transform', rate(lambda b: ours(b, 1), batches, args.repeat)),
      ('ours: train, no reduced decode', rate(lambda b: ours_full(b, 1), batches, args.repeat)),
      ('original: eval transform', rate(original_eval, data, args.repeat)),
      ('ours: eval transform', rate(lambda b: ours_eval(b, 1), batches, args.repeat)),
  ]
  r = dict(rows)
  print(f'{"images/s on one core":44s} {"img/s":>8s}')
  for name, value in rows:
    print(f'{name:44s} {value:8.0f}')
  print()
  train_ours, train_orig = r['ours: train transform'], r['original: train transform']
  print(f'train: ours / original = {train_ours / train_orig:.2f}x; ours / decode alone = '
        f'{train_ours / r["decode alone: PIL (as the original)"]:.2f}x (PIL), '
        f'{train_ours / r["decode alone: ours (simplejpeg)"]:.2f}x (simplejpeg)')
  eval_ratio = r['ours: eval transform'] / r['original: eval transform']
  print(f'eval:  ours / original = {eval_ratio:.2f}x')
  print(f'cores to feed 3,000 images/s (ResNet-50, one current GPU in bfloat16): ours '
        f'{3000 / train_ours:.1f}, original {3000 / train_orig:.1f}')

  tmp = tempfile.mkdtemp()
  try:
    for i, d in enumerate(data):
      os.makedirs(os.path.join(tmp, 'train', f'n{i % 8:08d}'), exist_ok=True)
      with open(os.path.join(tmp, 'train', f'n{i % 8:08d}', f'img_{i:05d}.JPEG'), 'wb') as f:
        f.write(d)
    t0 = time.perf_counter()
    folder.prepare(os.path.join(tmp, 'train'), os.path.join(tmp, 'prepared'), num_threads=1,
                   show_progress=False)
    dt = time.perf_counter() - t0
    mb = sum(len(d) for d in data) / 2**20
    print(f'prepare (read, check by decoding at 1/8 scale, write the bytes), one thread: '
          f'{len(data) / dt:.0f} images/s, {mb / dt:.0f} MiB/s; ImageNet train '
          f'(1,281,167 images) at that rate: {1281167 / (len(data) / dt) / 60:.0f} min per thread')
  finally:
    shutil.rmtree(tmp)


if __name__ == '__main__':
  main()
