"""Fashion-MNIST, a small CIFAR-style ResNet: the default config and `make demo`.

    python train.py --config configs/fashion_mnist.py --workdir workdir

Reads Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) by default. The
paper's experiments (RESULTS.md) take options after a colon, comma-separated:

    configs/fashion_mnist.py:demo           `make demo`'s recipe: the network with a stem of
                                            stride 2 (small_resnet_s2), 6 epochs, the NCA
                                            products in bfloat16 where the CPU multiplies it in
                                            hardware (README, "The demo": rate and accuracy)
    configs/fashion_mnist.py:softmax        the paper's softmax baseline: the same network and
                                            schedule, its classifier on the pooled features (no
                                            embedding layer), evaluated on those features
    configs/fashion_mnist.py:softmax_embedding   a variant: the classifier on a 128-d linear
                                            layer added after the pooling, which it embeds with
    configs/fashion_mnist.py:coarse         trained on 4 coarse classes (COARSE), evaluated
                                            also on the 10 fine ones (sub-category discovery)
    configs/fashion_mnist.py:novel          trained on classes 0-4, evaluated also on 5-9
                                            (novel classes: few-shot episodes)
    configs/fashion_mnist.py:novel_rotated  the split rotated: trained on 5-9, novel 0-4
    configs/fashion_mnist.py:softmax,coarse and so on.
"""

from snca_jax import hardware
from snca_jax import schema

# Fashion-MNIST's classes in four coarse groups: tops (T-shirt/top, Pullover, Coat, Shirt),
# bottoms and dresses (Trouser, Dress), footwear (Sandal, Sneaker, Ankle boot), bags (Bag).
COARSE = (0, 1, 0, 1, 0, 2, 0, 2, 3, 2)
COARSE_NAMES = ('tops', 'bottoms and dresses', 'footwear', 'bags')
TRAIN_CLASSES = (0, 1, 2, 3, 4)     # 'novel': T-shirt/top, Trouser, Pullover, Dress, Coat
TRAIN_CLASSES_ROTATED = (5, 6, 7, 8, 9)  # 'novel_rotated': Sandal, Shirt, Sneaker, Bag, Ankle boot


def get_config(options: str = ''):
  options = [o for o in options.split(',') if o]
  unknown = set(options) - {'nca', 'demo', 'softmax', 'softmax_embedding', 'coarse', 'novel',
                            'novel_rotated'}
  if unknown:
    raise ValueError(f'config options {sorted(unknown)}: use nca, demo, softmax, '
                     f'softmax_embedding, coarse, novel, novel_rotated')
  c = schema.default_config()    # every field and its default: this recipe, but for
  # one reading thread: Fashion-MNIST's batches (28x28 arrays in memory, batched numpy) cost
  # little to make, and the cores are the network's.
  c.data.num_threads, c.data.worker_count = 1, 0
  if 'demo' in options:
    c.model, c.num_epochs = 'small_resnet_s2', 6
    if hardware.bfloat16_in_hardware():
      c.nca_matmul_dtype = 'bfloat16'
  if 'softmax' in options or 'softmax_embedding' in options:
    c.loss = 'softmax'
  if 'softmax' in options:
    c.low_dim = 0                # the pooled features, L2-normalised, as the NCA ones are
  if 'coarse' in options:
    c.data.label_map, c.data.num_classes = COARSE, len(COARSE_NAMES)
  if 'novel' in options:
    c.data.train_classes = TRAIN_CLASSES
  if 'novel_rotated' in options:
    c.data.train_classes = TRAIN_CLASSES_ROTATED
  return c
