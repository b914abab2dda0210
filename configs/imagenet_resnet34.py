"""ImageNet, ResNet-34: the ResNet-18 recipe; kNN top-1 74.41% published.

    python train.py --config configs/imagenet_resnet34.py --workdir runs/r34
    python train.py --config configs/imagenet_resnet34.py:folder --config.data.root=DIR \
        --workdir runs/r34
"""

from configs import imagenet_resnet18


def get_config(source: str = 'tfds'):
  c = imagenet_resnet18.get_config(source)
  c.model = 'resnet34'
  return c
