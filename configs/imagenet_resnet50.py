"""ImageNet, ResNet-50: kNN top-1 76.57% published. The original trained deeper networks with
batch 128 and 2 accumulation steps (`-b 128 --iter-size 2`): the same 256 examples per update,
the bank and batch statistics updated every 128. Where memory allows, `--config.batch_size=256
--config.grad_accum_steps=1` is the same recipe without accumulation.

    python train.py --config configs/imagenet_resnet50.py --workdir runs/r50
    python train.py --config configs/imagenet_resnet50.py:folder --config.data.root=DIR \
        --workdir runs/r50
"""

from configs import imagenet_resnet18


def get_config(source: str = 'tfds'):
  c = imagenet_resnet18.get_config(source)
  c.model = 'resnet50'
  c.batch_size = 128
  c.grad_accum_steps = 2
  return c
