"""Converts the original's released checkpoints, and torchvision ResNets, to snca-jax checkpoints
(the library; the command is the repository's `convert.py`).

Input, read with torch (`pip install .[convert]`):
  - the original's checkpoint: a dict with `state_dict` (keys prefixed `module.`), the pickled
    memory module (`lib.LinearAverage.LinearAverage`: buffer `memory` is the bank, buffer
    `params` holds [temperature, memory momentum]), `epoch`, `best_prec1`, `optimizer`;
  - or a plain state dict of a torchvision ResNet (ImageNet layout) or of the original's
    CIFAR ResNet (`models/resnet_cifar.py`: conv1, layer1..4 with `shortcut`, `linear`).
The pickle is read by `unpickler`'s unpickler, which runs no code the file names and
refuses any tensor larger than the data the file holds; `weights` maps the weights.

Output: an Orbax checkpoint of the train state (params, batch statistics, a fresh optimizer
state, the bank and, given `labels` or `labels_dataset`, its labels; otherwise every bank row
is unlabelled and `eval_knn.py --recompute` is the way to evaluate), with the run's config, so
that `eval_knn.py` evaluates it and `train.py` continues training it.
"""

import os
from typing import NamedTuple

import numpy as np

from snca_jax.convert.unpickler import load_torch_checkpoint
from snca_jax.convert.weights import infer_architecture, split_checkpoint, strip_module_prefix
from snca_jax.convert.weights import torch_to_flax, to_numpy
from snca_jax.errors import CheckpointError


class Original(NamedTuple):
  """What a .pth file holds, as host arrays (see `read_original`)."""
  source: str                    # the file's path
  arch: str                      # e.g. 'resnet50', 'cifar_resnet18'
  layout: str                    # 'imagenet' (torchvision's) or 'cifar' (the original's CIFAR)
  params: dict                   # the Flax ResNet's params, with 'head' where `head`
  batch_stats: dict
  head: bool                     # whether the file has a head (fc / linear)
  bank: np.ndarray | None        # the memory bank, (rows, dim), in the original's row order
  temperature: float | None      # the memory module's [temperature, memory momentum]
  memory_momentum: float | None
  epoch: int


def read_original(src: str) -> Original:
  """Reads `src` (the original's checkpoint or a plain ResNet state dict) without running any
  code it names; a file that is not one raises CheckpointError, in one line."""
  state_dict, memory, epoch = split_checkpoint(load_torch_checkpoint(src))
  state_dict = strip_module_prefix(state_dict)
  arch, layout = infer_architecture(state_dict)
  params, stats, head = torch_to_flax(state_dict)
  bank = temperature = memory_momentum = None
  if memory is not None:
    bank = _bank_array(memory.buffer('memory'), src)
    mem_params = memory.buffer('params')
    if mem_params is not None:
      temperature = float(to_numpy(mem_params)[0])
      memory_momentum = float(to_numpy(mem_params)[1])
  return Original(source=src, arch=arch, layout=layout, params=params, batch_stats=stats,
                  head=head, bank=bank, temperature=temperature,
                  memory_momentum=memory_momentum, epoch=epoch)


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


def convert(src, *, checkpoint_dir: str, config, labels=None, labels_dataset=None,
            init_head=False, seed=0):
  """Converts `src` (a path, or what `read_original` read from one); returns (step written,
  summary dict). `config` is the run's config; its model, low_dim, temperature and memory
  momentum are set from the checkpoint.

  The original's bank is in its own order (ImageFolder's); with `labels_dataset` its rows are
  put in that dataset's record order, which is this project's bank order. `labels` (a file)
  is taken to be in the bank's own order. The checkpoint carries no optimizer state of its
  own and the original's epoch: `train.py` starts a fresh optimizer for its recipe and
  resumes at that epoch, whatever the recipe's batch size."""
  import jax
  from snca_jax import bank as bank_lib
  from snca_jax import checkpoint
  from snca_jax import mesh as mesh_lib
  from snca_jax import models
  from snca_jax import optim
  from snca_jax import state as state_lib

  original = src if isinstance(src, Original) else read_original(src)
  src, arch, layout, epoch = original.source, original.arch, original.layout, original.epoch
  # a copy of the params, whose head is dropped or replaced below: `original` stays as read
  params, stats, head = dict(original.params), original.batch_stats, original.head
  config = config.copy_and_resolve_references()
  config.model = arch
  bank = original.bank
  if original.temperature is not None:
    config.temperature = original.temperature
    config.memory_momentum = original.memory_momentum
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
    fresh = jax.jit(model.init)(jax.random.key(seed), example)   # not op by op
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
    bank = np.asarray(bank_lib.init(jax.random.key(seed), n, config.low_dim))
  elif order is not None and len(order) == len(bank):
    bank = bank[order]              # record r of the dataset is the original's row order[r]
  if bank_labels is None:
    bank_labels = np.full(len(bank), bank_lib.PAD_LABEL, np.int32)
  if len(bank_labels) != len(bank):
    raise CheckpointError(f'{len(bank_labels)} labels for a bank of {len(bank)} rows: give '
                          f'the labels of the training set the bank was made from')

  mesh = mesh_lib.make_mesh()
  tx = optim.make_optimizer(config, max(1, len(bank) // config.batch_size))
  state = state_lib.from_arrays(params=params, batch_stats=stats, bank=bank,
                                bank_labels=bank_labels, tx=tx, mesh=mesh)
  mngr = checkpoint.manager(checkpoint_dir, max_to_keep=config.checkpoint_max_to_keep)
  checkpoint.save(mngr, 0, state, config, {
      'num_examples': len(bank),
      'converted': {'source': os.path.abspath(src), 'epoch': epoch}})
  mngr.wait_until_finished()
  return 0, {'model': arch, 'layout': layout, 'low_dim': config.low_dim,
             'temperature': config.temperature, 'bank_rows': len(bank), 'epoch': epoch,
             'labelled': bool(np.any(bank_labels >= 0)), 'head_initialised': not head,
             'reordered': order is not None and not np.array_equal(order, np.arange(len(bank)))}
