"""Reading PyTorch checkpoints without running any code they name.

`load_torch_checkpoint` hands torch.load an unpickler that knows only an allow-list: torch's
tensor and storage rebuilders, plain containers, and the original's memory and loss classes,
which become `PickledModule` containers of their attributes. Anything else is refused, unread.

The original's released files were written by PyTorch 0.4 under Python 2, which pickled every
nn.Module's `_backend` attribute as a call of `torch.nn.backends.thnn._get_thnn_function_backend`;
that name is answered by a local function that returns None, never by torch's.
"""

import _compat_pickle
import os
import pickle

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


def _no_backend():
  """Stands in for PyTorch 0.4's `_backend` of a module: nothing."""
  return None


# Names that old torch versions pickled as calls, answered by local functions.
_LEGACY_CALLS = {('torch.nn.backends.thnn', '_get_thnn_function_backend'): _no_backend}


class _RestrictedUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    # Python 2 names (pickle protocol 2, as torch writes): __builtin__.set -> builtins.set.
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if (module, name) in _ORIGINAL_CLASSES:
      return PickledModule
    if (module, name) in _LEGACY_CALLS:
      return _LEGACY_CALLS[(module, name)]
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
