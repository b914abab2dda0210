"""CIFAR-100, CIFAR ResNet-18: the original's CIFAR recipe on 100 classes.

    python train.py --config configs/cifar100_resnet18.py --workdir runs/cifar100 \
        --config.data.data_dir=~/tensorflow_datasets
    python train.py --config configs/cifar100_resnet18.py:folder --config.data.root=DIR \
        --workdir runs/cifar100

Sub-category discovery (RESULTS.md): trained on the 20 superclasses (TFDS's `coarse_label`),
evaluated also on the 100 classes:

    python train.py --config configs/cifar100_resnet18.py:coarse --workdir runs/cifar100_coarse
"""

from configs import cifar10_resnet18


def get_config(source: str = 'tfds'):
  coarse = source == 'coarse'
  source = 'tfds' if coarse else source
  c = cifar10_resnet18.get_config(source)
  cifar10_resnet18.cifar_data(c, 'cifar100', 100, source)
  if coarse:
    c.data.label_key, c.data.num_classes = 'coarse_label', 20
  return c
