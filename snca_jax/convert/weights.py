"""Mapping torch ResNet weights to the Flax ResNet's (torchvision's layout, the original's
CIFAR layout), and finding the parts of the original's checkpoint dict."""

import re

import numpy as np

from snca_jax.convert.unpickler import PickledModule
from snca_jax.errors import CheckpointError


def to_numpy(t):
  return t.detach().cpu().numpy() if hasattr(t, 'detach') else np.asarray(t)


def strip_module_prefix(state_dict):
  """`state_dict` with the `module.` prefix taken off its keys: the original saved its model
  wrapped in DataParallel, whose state dict names every entry `module.<name>`. Plain
  torchvision state dicts have no prefix and pass as they are."""
  return {k[len('module.'):] if k.startswith('module.') else k: v
          for k, v in state_dict.items()}


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

  for key, value in strip_module_prefix(state_dict).items():
    module, _, leaf = key.rpartition('.')
    v = to_numpy(value).astype(np.float32) if leaf != 'num_batches_tracked' else None
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
