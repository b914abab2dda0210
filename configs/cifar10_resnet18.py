"""CIFAR-10, CIFAR ResNet-18: the original's `cifar.py` recipe (docs/METHOD.md).

From TFDS `cifar10` prepared as array_record (`tfds build cifar10 --file_format=array_record`):

    python train.py --config configs/cifar10_resnet18.py --workdir runs/cifar10 \
        --config.data.data_dir=~/tensorflow_datasets

From an image folder (DIR/train/<class>/*.png, DIR/test/<class>/*.png):

    python train.py --config configs/cifar10_resnet18.py:folder --config.data.root=DIR \
        --workdir runs/cifar10
"""

from configs import fashion_mnist


def cifar_data(c, name: str, num_classes: int, source: str):
  """The CIFAR data fields, from TFDS ('tfds': dataset `name`) or an image folder ('folder')."""
  if source not in ('tfds', 'folder'):
    raise ValueError(f'config argument {source!r}: use :tfds or :folder')
  c.data.name = name if source == 'tfds' else 'folder'
  c.data.train_split, c.data.eval_split = 'train', 'test'
  c.data.num_classes = num_classes
  c.data.image_size, c.data.channels = 32, 3
  c.data.mean = (0.4914, 0.4822, 0.4465)
  c.data.std = (0.2023, 0.1994, 0.2010)
  c.data.train_augment = 'cifar'     # resized crop (0.2-1), grayscale 0.2, jitter 0.4, flip
  c.data.eval_augment = 'none'
  c.data.num_threads, c.data.worker_count = 0, -1   # readers from the cores (schema.py)
  return c


def get_config(source: str = 'tfds'):
  c = cifar_data(fashion_mnist.get_config(), 'cifar10', 10, source)
  c.model = 'cifar_resnet18'
  c.dtype = 'bfloat16'           # mixed precision on accelerators: bfloat16 activations and
  c.nca_matmul_dtype = 'bfloat16'  # products; float32 parameters, optimizer state and bank
  c.model_init = 'pytorch'       # the original's CIFAR ResNet keeps PyTorch's initialisation
  c.monitor = 'knn'              # cifar.py: weighted kNN (K=30) each epoch, best kept
  c.num_epochs = 200
  c.batch_size = 128
  c.learning_rate = 0.1
  c.lr_schedule = 'step'
  c.lr_step_epochs = 50
  c.lr_decay = 0.1
  c.weight_decay = 5e-4
  c.memory_momentum = 0.5
  c.memory_momentum_steps = ()
  c.temperature = 0.05
  return c
