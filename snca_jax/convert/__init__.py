"""The original's `.pth.tar` files and torchvision ResNets to snca-jax (Orbax) checkpoints.

  - `unpickler`: reads a PyTorch checkpoint without running any code it names, refusing any
    tensor larger than the data the file holds;
  - `weights`: the parts of the original's checkpoint dict, and torch ResNet weights mapped to
    the Flax ResNet's;
  - `original`: the conversion: the file read (`read_original`), the bank, its labels and its
    order (`dataset_labels`, `original_order`), the train state built and saved (`convert`).

The command is the repository's `convert.py`:
`python convert.py snca_resnet50.pth.tar --workdir runs/r50 --labels_dataset imagenet2012`.
"""

from snca_jax.convert.original import Original
from snca_jax.convert.original import convert
from snca_jax.convert.original import dataset_labels
from snca_jax.convert.original import original_order
from snca_jax.convert.original import read_original
from snca_jax.convert.unpickler import load_torch_checkpoint

__all__ = ['Original', 'convert', 'dataset_labels', 'load_torch_checkpoint', 'original_order',
           'read_original']
