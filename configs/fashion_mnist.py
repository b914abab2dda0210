"""Fashion-MNIST, a small CIFAR-style ResNet: the default config and `make demo`.

    python train.py --config configs/fashion_mnist.py --workdir workdir

Reads Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) by default. The
paper's experiments (RESULTS.md) take options after a colon, comma-separated:

    configs/fashion_mnist.py:softmax        the softmax baseline (same network and schedule)
    configs/fashion_mnist.py:coarse         trained on 4 coarse classes (COARSE), evaluated
                                            also on the 10 fine ones (sub-category discovery)
    configs/fashion_mnist.py:novel          trained on classes 0-4, evaluated also on 5-9
                                            (novel classes: few-shot episodes)
    configs/fashion_mnist.py:softmax,coarse and so on.
"""

import ml_collections

# Fashion-MNIST's classes in four coarse groups: tops (T-shirt/top, Pullover, Coat, Shirt),
# bottoms and dresses (Trouser, Dress), footwear (Sandal, Sneaker, Ankle boot), bags (Bag).
COARSE = (0, 1, 0, 1, 0, 2, 0, 2, 3, 2)
COARSE_NAMES = ('tops', 'bottoms and dresses', 'footwear', 'bags')
TRAIN_CLASSES = (0, 1, 2, 3, 4)     # 'novel': T-shirt/top, Trouser, Pullover, Dress, Coat


def get_config(options: str = ''):
  options = [o for o in options.split(',') if o]
  unknown = set(options) - {'nca', 'softmax', 'coarse', 'novel'}
  if unknown:
    raise ValueError(f'config options {sorted(unknown)}: use nca, softmax, coarse, novel')
  c = ml_collections.ConfigDict()
  c.model = 'small_resnet'
  c.low_dim = 128
  c.dtype = 'float32'
  c.model_init = 'torchvision'  # or 'pytorch' (PyTorch's defaults, the original's CIFAR net)
  c.bn_per_device = False       # True: BatchNorm statistics per device, as DataParallel's

  c.data = ml_collections.ConfigDict()
  c.data.name = 'fashion_mnist'  # or 'folder', or a TFDS dataset name ('cifar10', ...)
  c.data.data_dir = ''          # TFDS data dir; '' = ~/tensorflow_datasets
  c.data.root = ''              # folder: DIR holding DIR/<split>/<class>/<image>
  c.data.prepared_dir = ''      # folder: where it is prepared; '' = <root>/snca_prepared
  c.data.skip_bad_images = False  # folder: leave out undecodable images instead of stopping
  c.data.idx_dir = ''           # IDX files; '' = /usr/share/datasets/fashion-mnist
  c.data.download = True        # fetch the IDX files where idx_dir has none
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.num_classes = 10       # 0 = as many as the dataset declares (folders, TFDS labels)
  c.data.image_size = 28
  c.data.channels = 1
  c.data.mean = (0.2860,)
  c.data.std = (0.3530,)
  c.data.train_augment = 'crop_flip'  # see snca_jax.data.transforms
  c.data.eval_augment = 'none'
  c.data.label_map = ()         # fine class -> the class trained on (e.g. COARSE); () = same
  c.data.label_key = 'label'    # the record field trained on (cifar100: 'coarse_label')
  c.data.train_classes = ()     # train on these classes only; () = all
  c.data.reduced_decode = True  # let libjpeg decode large JPEGs at 1/2-1/8 scale when cropping
  c.data.num_threads = 1        # threads reading and transforming batches (training and eval)
  c.data.worker_count = 0       # grain worker processes (training and eval)

  c.seed = 0
  c.num_epochs = 5
  c.batch_size = 128
  c.grad_accum_steps = 1
  c.learning_rate = 0.1
  c.lr_schedule = 'cosine'      # 'step': x lr_decay every lr_step_epochs (the original's)
  c.lr_step_epochs = 3
  c.lr_decay = 0.1
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 5e-4

  c.loss = 'nca'                # or 'softmax': the paper's baseline (no bank in training)
  c.temperature = 0.05
  c.margin = 0.0
  c.memory_momentum = 0.5
  c.memory_momentum_steps = ()   # ((epoch, value), ...)
  c.nca_chunk_size = 0          # bank rows per step of the NCA kernel; 0 = by batch size
  c.nca_matmul_dtype = 'float32'  # or 'bfloat16' (float32 accumulation)

  c.knn = ml_collections.ConfigDict()
  c.knn.k = 30
  c.knn.sigma = 0.0             # 0 = the temperature
  c.knn.batch_size = 1000

  c.monitor = '1nn'             # per-epoch: '1nn' (the original's main.py) or 'knn' (cifar.py)
  c.keep_best = True            # keep the best epoch's state in <workdir>/best
  c.log_every_steps = 50
  c.checkpoint_max_to_keep = 2
  if 'softmax' in options:
    c.loss = 'softmax'
  if 'coarse' in options:
    c.data.label_map, c.data.num_classes = COARSE, len(COARSE_NAMES)
  if 'novel' in options:
    c.data.train_classes = TRAIN_CLASSES
  return c
