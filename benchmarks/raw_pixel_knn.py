"""kNN on raw pixels: the baseline the demo's learned embedding is compared with.

    python benchmarks/raw_pixel_knn.py [--idx_dir /usr/share/datasets/fashion-mnist]

Fashion-MNIST test images against the 60,000 training images, both as raw pixels scaled to
[0, 1] and L2-normalised (cosine similarity), classified by snca_jax.knn.knn_classify with the
demo's evaluation settings (K = 30, weights exp(similarity / 0.05)) and by plain 1-NN.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from snca_jax import knn  # noqa: E402
from snca_jax.data import fashion_mnist  # noqa: E402


def load(idx_dir, prefix):
  read = lambda stem: fashion_mnist.read_idx(fashion_mnist.find_idx_file(idx_dir, stem))
  images = read(f'{prefix}-images-idx3-ubyte')
  labels = read(f'{prefix}-labels-idx1-ubyte')
  x = images.reshape(len(images), -1).astype(np.float32) / 255.0
  return x / np.linalg.norm(x, axis=1, keepdims=True), labels.astype(np.int32)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--idx_dir', default=fashion_mnist.DEFAULT_IDX_DIR)
  p.add_argument('--smoke', action='store_true', help='the first 500 training and 100 test '
                 'images only, to check that it runs')
  args = p.parse_args()
  train_x, train_y = load(args.idx_dir, 'train')
  test_x, test_y = load(args.idx_dir, 't10k')
  if args.smoke:
    print('smoke run: tiny sizes, to check that the benchmark runs; its figures mean nothing')
    train_x, train_y, test_x, test_y = train_x[:500], train_y[:500], test_x[:100], test_y[:100]
  for k in (30, 1):
    scores = knn.knn_classify(test_x, train_x, train_y, k=k, sigma=0.05, num_classes=10)
    acc = knn.top_k_accuracy(scores, test_y, ks=(1, 5))
    print(f'raw pixels, cosine, K={k:2d}: top-1 {100 * acc[1]:.2f}%  top-5 {100 * acc[5]:.2f}%')


if __name__ == '__main__':
  main()
