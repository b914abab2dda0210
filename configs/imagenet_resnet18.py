"""ImageNet, ResNet-18: the original's `main.py` recipe (docs/METHOD.md); kNN top-1 70.59%
published.

From TFDS `imagenet2012` prepared as array_record (manual download of the ILSVRC2012 tars):

    python train.py --config configs/imagenet_resnet18.py --workdir runs/r18 \
        --config.data.data_dir=/path/to/tensorflow_datasets

From the image-folder tree the original reads (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG),
prepared once on first use into <root>/snca_prepared (or --config.data.prepared_dir):

    python train.py --config configs/imagenet_resnet18.py:folder --workdir runs/r18 \
        --config.data.root=/path/to/imagenet
"""

from configs import fashion_mnist


def imagenet_data(c, source: str):
  """The ImageNet data fields, from TFDS ('tfds') or an image folder ('folder')."""
  if source not in ('tfds', 'folder'):
    raise ValueError(f'config argument {source!r}: use :tfds or :folder')
  if source == 'folder':
    c.data.name = 'folder'
    c.data.train_split, c.data.eval_split = 'train', 'val'
  else:
    c.data.name = 'imagenet2012'
    c.data.train_split, c.data.eval_split = 'train', 'validation'
  c.data.num_classes = 1000
  c.data.image_size, c.data.channels = 224, 3
  c.data.mean = (0.485, 0.456, 0.406)
  c.data.std = (0.229, 0.224, 0.225)
  c.data.train_augment = 'imagenet'       # random resized crop 224, flip
  c.data.eval_augment = 'imagenet_eval'   # resize 256, centre crop 224
  c.data.num_threads, c.data.worker_count = 0, -1   # readers from the cores (schema.py)
  return c


def get_config(source: str = 'tfds'):
  c = imagenet_data(fashion_mnist.get_config(), source)
  c.model = 'resnet18'
  c.dtype = 'bfloat16'           # mixed precision on accelerators: bfloat16 activations and
  c.nca_matmul_dtype = 'bfloat16'  # products; float32 parameters, optimizer state and bank
  c.num_epochs = 130
  c.batch_size = 256
  c.grad_accum_steps = 1
  c.learning_rate = 0.1
  c.lr_schedule = 'step'
  c.lr_step_epochs = 40
  c.lr_decay = 0.1
  c.weight_decay = 1e-4
  c.memory_momentum = 0.5
  c.memory_momentum_steps = ((80, 0.8), (120, 0.9))
  c.temperature = 0.05
  c.low_dim = 128
  c.knn.batch_size = 1024
  c.log_every_steps = 100
  return c
