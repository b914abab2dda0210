"""Converts the original's released checkpoints, and torchvision ResNets, to snca-jax checkpoints.

    python -m snca_jax.convert snca_resnet50.pth.tar --workdir runs/r50 --labels_dataset imagenet2012
    python -m snca_jax.convert resnet18-f37072fd.pth --workdir runs/r18 --init_head

Input, read with torch (`pip install .[convert]`):
  - the original's checkpoint: a dict with `state_dict` (keys prefixed `module.`), the pickled
    memory module (`lib.LinearAverage.LinearAverage`: buffer `memory` is the bank, buffer
    `params` holds [temperature, memory momentum]), `epoch`, `best_prec1`, `optimizer`;
  - or a plain state dict of a torchvision ResNet (ImageNet layout) or of the original's
    CIFAR ResNet (`models/resnet_cifar.py`: conv1, layer1..4 with `shortcut`, `linear`).
The pickle is read by an unpickler that knows only an allow-list: torch's tensor and storage
rebuilders, plain containers, and the original's memory and loss classes, which become
`PickledModule` containers of their attributes. Anything else is refused, unread.

Output: an Orbax checkpoint of the train state (params, batch statistics, a fresh optimizer
state, the bank and, given `--labels` or `--labels_dataset`, its labels; otherwise every bank row
is unlabelled and `eval_knn.py --recompute` is the way to evaluate), with the run's config, so
that `eval_knn.py` evaluates it and `train.py` continues training it.
"""

import _compat_pickle
import os
import pickle
import re
import sys

import numpy as np

from snca_jax.errors import CheckpointError, ConfigError

# What a PyTorch checkpoint legitimately pickles.
_ALLOWED = {
    ('collections', 'OrderedDict'), ('builtins', 'set'), ('builtins', 'frozenset'),
    ('builtins', 'slice'), ('builtins', 'object'), ('copyreg', '_reconstructor'),
    ('torch._utils', '_rebuild_tensor'), ('torch._utils', '_rebuild_tensor_v2'),
    ('torch._utils', '_rebuild_tensor_v3'), ('torch._utils', '_rebuild_parameter'),
    ('torch._utils', '_rebuild_parameter_with_state'), ('torch.nn.parameter', 'Parameter'),
    ('torch._tensor', '_rebuild_from_type_v2'), ('torch', 'Tensor'), ('torch', 'Size'),
    ('torch', 'device'), ('torch.storage', 'UntypedStorage'), ('torch', 'UntypedStorage'),
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
    ('numpy', 'dtype'),
} | {('torch', f'{t}Storage') for t in ('Float', 'Double', 'Half', 'BFloat16', 'Long', 'Int',
                                         'Short', 'Char', 'Byte', 'Bool')} | {
    ('torch', t) for t in ('float32', 'float64', 'float16', 'bfloat16', 'int64', 'int32',
                           'int16', 'int8', 'uint8', 'bool')}
# The original's own classes that its checkpoints pickle whole (module path, class name).
_ORIGINAL_CLASSES = {('lib.LinearAverage', 'LinearAverage'), ('lib.NCA', 'NCACrossEntropy'),
                     ('lib.NCAAverage', 'NCAAverage')}


class PickledModule:
  """Stands in for a pickled nn.Module of the original's code: its attributes, as a dict."""

  def __init__(self, *args, **kwargs):
    del args, kwargs
    self.state = {}

  def __setstate__(self, state):
    self.state = state

  def buffer(self, name):
    for holder in (self.state.get('_buffers') or {}, self.state.get('_parameters') or {},
                   self.state):
      if name in holder and holder[name] is not None:
        return holder[name]
    return None


class _RestrictedUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    # Python 2 names (pickle protocol 2, as torch writes): __builtin__.set -> builtins.set.
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if (module, name) in _ORIGINAL_CLASSES:
      return PickledModule
    if (module, name) in _ALLOWED:
      return super().find_class(module, name)
    raise CheckpointError(f'refusing to unpickle {module}.{name}: it is not a tensor, a plain '
                          f'container or one of the original\'s memory classes, so this file '
                          f'is not a checkpoint of the original (or it is unsafe)')


class _RestrictedPickle:
  """A `pickle_module` for torch.load."""
  Unpickler = _RestrictedUnpickler
  __name__ = 'snca_jax_restricted_pickle'

  @staticmethod
  def load(f, **kwargs):
    return _RestrictedUnpickler(f, **kwargs).load()


def load_torch_checkpoint(path: str):
  """The checkpoint at `path`, read with the restricted unpickler (no code of the original)."""
  try:
    import torch
  except ImportError as e:
    raise ConfigError('reading .pth files needs torch: pip install ".[convert]" '
                      '(or torch==2.13.0, the CPU build)') from e
  if not os.path.isfile(path):
    raise CheckpointError(f'{path} does not exist: give the path of a .pth / .pth.tar file')
  try:
    return torch.load(path, map_location='cpu', pickle_module=_RestrictedPickle,
                      weights_only=False)
  except CheckpointError:
    raise
  except Exception as e:
    raise CheckpointError(f'{path} could not be read as a PyTorch checkpoint '
                          f'({type(e).__name__}: {e})') from e


def _np(t):
  return t.detach().cpu().numpy() if hasattr(t, 'detach') else np.asarray(t)


def split_checkpoint(obj):
  """(state_dict, memory module or None, epoch) of the original's dict or a plain state dict."""
  if isinstance(obj, dict) and 'state_dict' in obj:
    memory = next((v for v in obj.values() if isinstance(v, PickledModule)
                   and v.buffer('memory') is not None), None)
    return obj['state_dict'], memory, int(obj.get('epoch', 0) or 0)
  if isinstance(obj, dict) and all(hasattr(v, 'shape') for v in obj.values()):
    return obj, None, 0
  raise CheckpointError('not a checkpoint of the original (no state_dict) nor a ResNet state '
                        'dict')


_BLOCK = re.compile(r'^layer(\d)\.(\d+)\.(.+)$')


def infer_architecture(state_dict):
  """('resnet50', 'imagenet') or ('cifar_resnet18', 'cifar') etc. from the keys and shapes."""
  keys = set(state_dict)
  cifar = any('.shortcut.' in k for k in keys) or 'linear.weight' in keys or (
      'conv1.weight' in keys and tuple(state_dict['conv1.weight'].shape[2:]) == (3, 3))
  blocks = {}
  for k in keys:
    m = _BLOCK.match(k)
    if m:
      blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  sizes = tuple(len(blocks.get(i, ())) for i in range(1, 5))
  bottleneck = any(k.endswith('.conv3.weight') for k in keys)
  from snca_jax import models
  for depth, (stage_sizes, block) in models._STAGES.items():
    if tuple(stage_sizes) == sizes and (block is models.Bottleneck) == bottleneck:
      return (f'cifar_resnet{depth}' if cifar else f'resnet{depth}'), (
          'cifar' if cifar else 'imagenet')
  raise CheckpointError(f'not a ResNet of a known depth (blocks per stage {sizes}, '
                        f'bottleneck={bottleneck})')


def _flax_name(torch_name: str):
  """'layer2.0.downsample.1' / 'layer2.0.shortcut.1' -> ('layer2_0', 'downsample_bn')."""
  m = _BLOCK.match(torch_name)
  if not m:
    return (torch_name,)
  inner = m.group(3)
  inner = re.sub(r'^(downsample|shortcut)\.0$', 'downsample_conv', inner)
  inner = re.sub(r'^(downsample|shortcut)\.1$', 'downsample_bn', inner)
  return (f'layer{m.group(1)}_{m.group(2)}', inner)


def torch_to_flax(state_dict):
  """(params, batch_stats, head_present) from a torchvision / original-CIFAR state dict."""
  params, stats = {}, {}
  head = False

  def put(tree, path, value):
    for p in path[:-1]:
      tree = tree.setdefault(p, {})
    tree[path[-1]] = value

  for key, value in state_dict.items():
    key = key[len('module.'):] if key.startswith('module.') else key
    module, _, leaf = key.rpartition('.')
    v = _np(value).astype(np.float32) if leaf != 'num_batches_tracked' else None
    if module in ('fc', 'linear'):
      head = True
      put(params, ('head', 'kernel' if leaf == 'weight' else 'bias'),
          v.T if leaf == 'weight' else v)
      continue
    path = _flax_name(module)
    if leaf == 'num_batches_tracked':
      continue
    if v.ndim == 4:                                           # conv: OIHW -> HWIO
      put(params, path + ('kernel',), v.transpose(2, 3, 1, 0))
    elif leaf == 'weight':
      put(params, path + ('scale',), v)
    elif leaf == 'bias':
      put(params, path + ('bias',), v)
    elif leaf == 'running_mean':
      put(stats, path + ('mean',), v)
    elif leaf == 'running_var':
      put(stats, path + ('var',), v)
    else:
      raise CheckpointError(f'unexpected entry {key} in the state dict')
  return params, stats, head


def _labels(flags_labels, labels_dataset, config):
  if flags_labels:
    if flags_labels.endswith('.npy'):
      return np.load(flags_labels).astype(np.int32)
    return np.loadtxt(flags_labels, dtype=np.int64).astype(np.int32).reshape(-1)
  if labels_dataset:
    from snca_jax.data import pipeline
    data = config.data.copy_and_resolve_references()
    data.name = labels_dataset
    return pipeline.read_labels(pipeline.open_source(data, data.train_split))
  return None


def convert(src: str, *, checkpoint_dir: str, config=None, labels=None, labels_dataset=None,
            init_head=False, seed=0):
  """Converts `src`; returns (step written, summary dict). `config` is the run's config
  (default: configs/imagenet_resnet18.py or cifar10_resnet18.py by the layout); its model,
  low_dim, temperature and memory momentum are set from the checkpoint."""
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
    bank = _np(memory.buffer('memory')).astype(np.float32)
    mem_params = memory.buffer('params')
    if mem_params is not None:
      config.temperature = float(_np(mem_params)[0])
      config.memory_momentum = float(_np(mem_params)[1])
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

  bank_labels = _labels(labels, labels_dataset, config)
  if bank is None:
    n = len(bank_labels) if bank_labels is not None else 0
    if n == 0:
      raise CheckpointError('no memory bank in the checkpoint: give --labels or '
                            '--labels_dataset so that a bank of the right size can be made')
    bank = np.asarray(nca.init_bank(jax.random.key(seed), n, config.low_dim))
  if bank_labels is None:
    bank_labels = np.full(len(bank), nca.PAD_LABEL, np.int32)
  if len(bank_labels) != len(bank):
    raise CheckpointError(f'{len(bank_labels)} labels for a bank of {len(bank)} rows: give '
                          f'the labels of the training set the bank was made from')

  mesh = mesh_lib.make_mesh()
  steps_per_epoch = len(bank) // config.batch_size
  tx = optim.make_optimizer(config, steps_per_epoch)
  n_pad = mesh_lib.padded_rows(len(bank), mesh)
  pad = n_pad - len(bank)
  rep = mesh_lib.replicated(mesh)
  state = state_lib.TrainState(
      step=jax.device_put(np.int32(epoch * steps_per_epoch), rep),
      params=jax.device_put(params, rep),
      batch_stats=jax.device_put(stats, rep),
      opt_state=jax.device_put(tx.init(params), rep),
      bank=jax.device_put(np.pad(bank, ((0, pad), (0, 0))), mesh_lib.rows(mesh)),
      bank_labels=jax.device_put(np.pad(bank_labels.astype(np.int32), (0, pad),
                                        constant_values=nca.PAD_LABEL), mesh_lib.rows(mesh)))
  mngr = checkpoint.manager(checkpoint_dir, max_to_keep=config.checkpoint_max_to_keep)
  step = int(state.step)
  checkpoint.save(mngr, step, state, config.to_dict())
  mngr.wait_until_finished()
  return step, {'model': arch, 'layout': layout, 'low_dim': config.low_dim,
                'temperature': config.temperature, 'bank_rows': len(bank), 'epoch': epoch,
                'labelled': bool(np.any(bank_labels >= 0)), 'head_initialised': not head}


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
          f"), temperature {info['temperature']:g}"
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
  flags.DEFINE_string('labels_dataset', None, 'Bank labels: the training split of this TFDS '
                      'dataset (with the config\'s data_dir).')
  flags.DEFINE_bool('init_head', False, 'Initialise the embedding head at random where the '
                    'state dict has none of the right size.')


if __name__ == '__main__':
  from absl import app
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
  _define_flags()
  from snca_jax import cli
  app.run(main, flags_parser=cli.flags_parser('convert'))
