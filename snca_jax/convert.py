"""Converts the original's released checkpoints, and torchvision ResNets, to snca-jax checkpoints.

    python -m snca_jax.convert snca_resnet50.pth.tar --workdir runs/r50 --labels_dataset imagenet2012
    python -m snca_jax.convert resnet18-f37072fd.pth --workdir runs/r18 --init_head

Input, read with torch (`pip install .[convert]`):
  - the original's checkpoint: a dict with `state_dict` (keys prefixed `module.`), the pickled
    memory module (`lib.LinearAverage.LinearAverage`: buffer `memory` is the bank, buffer
    `params` holds [temperature, memory momentum]), `epoch`, `best_prec1`, `optimizer`;
  - or a plain state dict of a torchvision ResNet (ImageNet layout) or of the original's
    CIFAR ResNet (`models/resnet_cifar.py`: conv1, layer1..4 with `shortcut`, `linear`).
The pickle is read by `torch_pickle`'s unpickler, which runs no code the file names and
refuses any tensor larger than the data the file holds; `torch_weights` maps the weights.

Output: an Orbax checkpoint of the train state (params, batch statistics, a fresh optimizer
state, the bank and, given `--labels` or `--labels_dataset`, its labels; otherwise every bank row
is unlabelled and `eval_knn.py --recompute` is the way to evaluate), with the run's config, so
that `eval_knn.py` evaluates it and `train.py` continues training it.
"""

import os
import sys

import numpy as np

from snca_jax.errors import CheckpointError, ConfigError
from snca_jax.torch_pickle import load_torch_checkpoint
from snca_jax.torch_weights import infer_architecture, split_checkpoint, torch_to_flax, to_numpy

def _bank_array(memory, src) -> np.ndarray:
  """The original's memory bank as a C-ordered float32 (rows, dim) array. The pickled tensor
  may be any view that lies inside its storage (the unpickler refuses the others), e.g. an
  expanded, stride-0 one: its values are read through its strides, never its raw storage."""
  try:
    bank = np.ascontiguousarray(to_numpy(memory), dtype=np.float32)
  except (TypeError, ValueError, RuntimeError) as e:
    raise CheckpointError(f'the memory bank of {src} is not an array of numbers '
                          f'({type(e).__name__}: {e}): not a checkpoint the converter can '
                          f'read') from None
  if bank.ndim != 2 or not bank.shape[1]:
    raise CheckpointError(f'the memory bank of {src} has shape {bank.shape}, not (rows, dim): '
                          f'not a checkpoint the converter can read')
  return bank


def _labels_file(path):
  if path.endswith('.npy'):
    return np.load(path).astype(np.int32)
  return np.loadtxt(path, dtype=np.int64).astype(np.int32).reshape(-1)


def original_order(records) -> np.ndarray:
  """For records of a training split (dicts with 'label' and 'file_name' or 'id'), the row of
  each record in the original's order: torchvision `ImageFolder` order (by class, then by
  directory and file name, as `sorted(os.walk(...))` and sorted file names give it) where
  records name their files; the `<split>_<n>` number of TFDS's CIFAR `id`s (the order of
  the original data batches, torchvision's CIFAR order); else the record order itself."""
  text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
  n = len(records)
  if n and 'file_name' in records[0]:
    keys = [(int(r['label']),) + os.path.split(text(r['file_name'])) for r in records]
  elif n and 'id' in records[0] and all(text(r['id']).rpartition('_')[2].isdigit()
                                        for r in records):
    keys = [int(text(r['id']).rpartition('_')[2]) for r in records]
  else:
    return np.arange(n)
  rank = np.empty(n, np.int64)
  rank[sorted(range(n), key=keys.__getitem__)] = np.arange(n)
  return rank


def dataset_labels(config, name: str):
  """(labels in record order, original row of each record) of the training split of dataset
  `name` (any `data.name`: a TFDS dataset, 'folder' with data.root, 'fashion_mnist')."""
  from snca_jax.data import folder
  from snca_jax.data import sources
  data = config.data.copy_and_resolve_references()
  data.name = name
  source = sources.open_source(data, data.train_split)
  labels = sources.read_labels(source)
  if isinstance(source, folder.FolderSource):       # ImageFolder order by construction
    return labels, np.arange(len(labels))
  records = []
  for start in range(0, len(source), 4096):
    records += source.__getitems__(range(start, min(start + 4096, len(source))))
  return labels, original_order(records)


def convert(src: str, *, checkpoint_dir: str, config=None, labels=None, labels_dataset=None,
            init_head=False, seed=0):
  """Converts `src`; returns (step written, summary dict). `config` is the run's config
  (default: configs/imagenet_resnet18.py or cifar10_resnet18.py by the layout); its model,
  low_dim, temperature and memory momentum are set from the checkpoint.

  The original's bank is in its own order (ImageFolder's); with `labels_dataset` its rows are
  put in that dataset's record order, which is this project's bank order. `labels` (a file)
  is taken to be in the bank's own order. The checkpoint carries no optimizer state of its
  own and the original's epoch: `train.py` starts a fresh optimizer for its recipe and
  resumes at that epoch, whatever the recipe's batch size."""
  import jax
  from snca_jax import checkpoint
  from snca_jax import mesh as mesh_lib
  from snca_jax import models
  from snca_jax import nca
  from snca_jax import optim
  from snca_jax import state as state_lib

  state_dict, memory, epoch = split_checkpoint(load_torch_checkpoint(src))
  state_dict = {k[len('module.'):] if k.startswith('module.') else k: v
                for k, v in state_dict.items()}
  arch, layout = infer_architecture(state_dict)
  params, stats, head = torch_to_flax(state_dict)
  if config is None:        # the original's recipe for that layout
    from configs import cifar10_resnet18, imagenet_resnet18
    config = (cifar10_resnet18 if layout == 'cifar' else imagenet_resnet18).get_config()
  config = config.copy_and_resolve_references()
  config.model = arch
  bank = None
  if memory is not None:
    bank = _bank_array(memory.buffer('memory'), src)
    mem_params = memory.buffer('params')
    if mem_params is not None:
      config.temperature = float(to_numpy(mem_params)[0])
      config.memory_momentum = float(to_numpy(mem_params)[1])
  if bank is not None:
    config.low_dim = int(bank.shape[1])
  if head and params['head']['kernel'].shape[1] != config.low_dim:
    head = False                       # e.g. torchvision's 1000-way classifier: not an embedding
    del params['head']
  model = models.model_from_config(config)
  size = 32 if layout == 'cifar' else 224
  example = np.zeros((1, size, size, params['conv1']['kernel'].shape[2]), np.float32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(seed), example))
  if not head:
    if not init_head:
      raise CheckpointError(f'{src} has no {config.low_dim}-d embedding head (fc): pass '
                            f'--init_head to start one from random weights')
    fresh = model.init(jax.random.key(seed), example)
    params['head'] = jax.tree.map(np.asarray, fresh['params']['head'])
  want = jax.tree.map(lambda a: a.shape, abstract['params'])
  got = jax.tree.map(lambda a: a.shape, params)
  if want != got:
    raise CheckpointError(f'the weights do not fit {arch}: expected {want}, found {got}')

  bank_labels, order = None, None
  if labels:
    bank_labels = _labels_file(labels)
  elif labels_dataset:
    bank_labels, order = dataset_labels(config, labels_dataset)
  if bank is None:
    n = len(bank_labels) if bank_labels is not None else 0
    if n == 0:
      raise CheckpointError('no memory bank in the checkpoint: give --labels or '
                            '--labels_dataset so that a bank of the right size can be made')
    bank = np.asarray(nca.init_bank(jax.random.key(seed), n, config.low_dim))
  elif order is not None and len(order) == len(bank):
    bank = bank[order]              # record r of the dataset is the original's row order[r]
  if bank_labels is None:
    bank_labels = np.full(len(bank), state_lib.PAD_LABEL, np.int32)
  if len(bank_labels) != len(bank):
    raise CheckpointError(f'{len(bank_labels)} labels for a bank of {len(bank)} rows: give '
                          f'the labels of the training set the bank was made from')

  mesh = mesh_lib.make_mesh()
  tx = optim.make_optimizer(config, max(1, len(bank) // config.batch_size))
  state = state_lib.from_arrays(params=params, batch_stats=stats, bank=bank,
                                bank_labels=bank_labels, tx=tx, mesh=mesh)
  mngr = checkpoint.manager(checkpoint_dir, max_to_keep=config.checkpoint_max_to_keep)
  checkpoint.save(mngr, 0, state, dict(
      config.to_dict(), num_examples=len(bank),
      converted={'source': os.path.abspath(src), 'epoch': epoch}))
  mngr.wait_until_finished()
  return 0, {'model': arch, 'layout': layout, 'low_dim': config.low_dim,
             'temperature': config.temperature, 'bank_rows': len(bank), 'epoch': epoch,
             'labelled': bool(np.any(bank_labels >= 0)), 'head_initialised': not head,
             'reordered': order is not None and not np.array_equal(order, np.arange(len(bank)))}


def main(argv):
  from absl import flags

  from snca_jax import checkpoint
  from snca_jax import cli

  flags_ = flags.FLAGS

  def run():
    if len(argv) != 2:
      raise ConfigError('usage: python -m snca_jax.convert SRC.pth[.tar] --workdir DIR')
    src = argv[1]
    config = cli.config('convert')
    if not (flags_.workdir or flags_.checkpoint):
      raise ConfigError('give --workdir DIR (or --checkpoint PATH) to write the checkpoint to')
    target = flags_.checkpoint or checkpoint.checkpoint_dir(flags_.workdir)
    step, info = convert(src, checkpoint_dir=target, config=config, labels=flags_.labels,
                         labels_dataset=flags_.labels_dataset, init_head=flags_.init_head)
    print(f"converted {src}: {info['model']} ({info['layout']} layout), {info['low_dim']}-d, "
          f"bank of {info['bank_rows']} rows ({'labelled' if info['labelled'] else 'unlabelled'}"
          f"{', put in the dataset' + chr(39) + 's record order' if info['reordered'] else ''}"
          f"), temperature {info['temperature']:g}, epoch {info['epoch']}"
          f"{', head initialised at random' if info['head_initialised'] else ''}; "
          f"written to {target}/{step}")

  cli.run('convert', run)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Config of the converted run (default: '
                                  'configs/imagenet_resnet18.py or cifar10_resnet18.py, with '
                                  'the model, low_dim and temperature of the checkpoint).')
  flags.DEFINE_string('workdir', None, 'Workdir to write the checkpoint into.')
  flags.DEFINE_string('checkpoint', None, 'Checkpoints directory to write into instead.')
  flags.DEFINE_string('labels', None, 'Bank labels: a .npy file or a text file of one integer '
                      'per line, in the bank\'s row order.')
  flags.DEFINE_string('labels_dataset', None, 'Bank labels: the training split of this '
                      'dataset (a TFDS name with the config\'s data_dir, or "folder" with '
                      '--config.data.root); the bank is put in its record order.')
  flags.DEFINE_bool('init_head', False, 'Initialise the embedding head at random where the '
                    'state dict has none of the right size.')


if __name__ == '__main__':
  from absl import app
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
  _define_flags()
  from snca_jax import cli
  app.run(main, flags_parser=cli.flags_parser('convert'))
