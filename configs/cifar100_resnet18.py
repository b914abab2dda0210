"""CIFAR-100, CIFAR ResNet-18: the original's CIFAR recipe on 100 classes.

    python train.py --config configs/cifar100_resnet18.py --workdir runs/cifar100 \
        --config.data.data_dir=~/tensorflow_datasets
    python train.py --config configs/cifar100_resnet18.py:folder --config.data.root=DIR \
        --workdir runs/cifar100
"""

from configs import cifar10_resnet18


def get_config(source: str = 'tfds'):
  c = cifar10_resnet18.get_config(source)
  cifar10_resnet18.cifar_data(c, 'cifar100', 100, source)
  return c
