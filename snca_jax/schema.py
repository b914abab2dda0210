"""The one config schema: every field a run has, with its default (the Fashion-MNIST recipe of
`make demo`). Every recipe in configs/ starts from `default_config()` and overrides fields;
`validate.check_config` checks every field before any work.

A checkpoint stores its run's config as JSON. `upgrade` turns what an older version wrote into
today's schema, on restore, in this one place: fields it lacks take their defaults, tuples come
back as tuples, and the run facts stored beside the config (`RUN_FACTS`) are split off. Code
therefore reads every field as `config.field`, never `config.get(field, default)`.

What a config means, asked in one place: `is_softmax` (the paper's baseline, no bank),
`trains_on_coarse_labels` (sub-category discovery), `trains_on_class_subset` (novel classes).
"""

import ast

import ml_collections

# What a checkpoint stores beside the config: the training set's size (its bank's padded
# length does not tell it), whether the epoch that ends at the step was evaluated, the best
# checkpoint's monitored value, the converter's record of the original file.
RUN_FACTS = ('num_examples', 'epoch_evaluated', 'monitor_value', 'converted')


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = 'small_resnet'
  c.low_dim = 128               # embedding size; 0 = the pooled features (the softmax baseline)
  c.dtype = 'float32'           # the network's compute dtype; or 'bfloat16', 'float16' (with
                                # dynamic loss scaling: optim.loss_scaled)
  c.model_init = 'torchvision'  # or 'pytorch' (PyTorch's defaults, the original's CIFAR net)
  c.bn_per_device = False       # True: BatchNorm statistics per device, as DataParallel's
  c.bn_float32_statistics = True  # False: batch statistics summed in the compute dtype (a
                                  # speed lever with bfloat16; benchmarks/train_step.py)

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
  # Readers of training and evaluation batches, derived from the cores of each process where
  # 0 and -1 (snca_jax.data.pipeline.readers): threads on up to 4 cores (on 2, a whole epoch
  # read at 0.81-0.86 of 2 x one core's transform rate; grain's worker processes, which copy
  # every batch back, at 0.60-0.70: benchmarks/input_pipeline.py --end_to_end), worker
  # processes of 2 threads on more. An explicit value stands.
  c.data.num_threads = 0        # threads in each reading process; 0 = from the cores
  c.data.worker_count = -1      # grain worker processes; -1 = from the cores, 0 = none

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
  c.nca_kernel = 'auto'         # 'pallas': each device's pass as one Pallas kernel; 'xla';
                                # 'auto': Pallas on GPUs with bfloat16 products (step.py)
  c.nca_class_index = 'auto'    # 'on', 'off': same-class sums through an index of the bank's
                                # rows by class; 'auto' where no class has over 1/50 of the rows

  c.knn = ml_collections.ConfigDict()
  c.knn.k = 30
  c.knn.sigma = 0.0             # 0 = the temperature
  c.knn.batch_size = 1000

  c.monitor = '1nn'             # per-epoch: '1nn' (the original's main.py) or 'knn' (cifar.py)
  c.keep_best = True            # keep the best epoch's state in <workdir>/best
  c.log_every_steps = 50
  c.checkpoint_max_to_keep = 2
  c.stop_check_steps = 10        # several processes agree on a stop every this many steps
  return c


def is_softmax(config) -> bool:
  """The paper's softmax baseline: no bank in training; kNN searches re-embedded training
  images."""
  return config.loss == 'softmax'


def trains_on_coarse_labels(config) -> bool:
  """Trained on coarse labels (`data.label_map`, or a record field such as cifar100's
  'coarse_label'): evaluated on the fine ones too (sub-category discovery)."""
  return bool(config.data.label_map) or config.data.label_key != 'label'


def trains_on_class_subset(config) -> bool:
  """Trained on `data.train_classes` only: evaluated on the others too (novel classes)."""
  return bool(config.data.train_classes)


def override(config, item: str):
  """Sets `FIELD=VALUE` (FIELD dotted, e.g. `data.num_threads`) on `config`: VALUE read as a
  Python literal where it is one (`False`, `16`, `(1, 2)`), else as the string; the config
  checks its type. A field it lacks or a value of another type is a ValueError saying so."""
  field, _, text = item.partition('=')
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  try:
    target = config
    *parents, leaf = field.split('.')
    for name in parents:
      target = target[name]
    if leaf not in target:
      raise KeyError(leaf)
    target[leaf] = value
  except (KeyError, AttributeError, TypeError) as e:
    raise ValueError(f'--override {item} cannot be set ({type(e).__name__}: {e}): give '
                     f'FIELD=VALUE with a field of the config and a value of its type') from None


def _merge(target: ml_collections.ConfigDict, saved: dict, path: str = ''):
  for key, value in saved.items():
    if key not in target:              # a field of an older version: kept as it was
      with target.unlocked():
        target[key] = value
    elif isinstance(target[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _merge(target[key], value, f'{path}{key}.')
    else:
      default = target[key]
      if isinstance(default, tuple) and isinstance(value, list):      # JSON has no tuples
        value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
      with target.ignore_type():
        target[key] = value


def upgrade(saved: dict) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, run facts) of a config dict a checkpoint stored, of any version: the config in
  today's schema (defaults for the fields it lacks), and the `RUN_FACTS` it carried."""
  saved = dict(saved)
  facts = {k: saved.pop(k) for k in RUN_FACTS if k in saved}
  config = default_config()
  _merge(config, saved)
  return config, facts
