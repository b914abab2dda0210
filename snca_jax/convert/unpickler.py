"""Reading PyTorch checkpoints without running any code they name.

`load_torch_checkpoint` hands torch.load an unpickler that knows only an allow-list: torch's
tensor and storage rebuilders, plain containers, and the original's memory and loss classes,
which become `PickledModule` containers of their attributes. Anything else is refused, unread.

The original's released files were written by PyTorch 0.4 under Python 2, which pickled every
nn.Module's `_backend` attribute as a call of `torch.nn.backends.thnn._get_thnn_function_backend`;
that name is answered by a local function that returns None, never by torch's.

Every tensor must lie inside the data the file holds: torch's rebuilders are answered by local
ones that refuse a tensor whose declared shape needs more elements than its storage has (an
expanded, stride-0 view of a few bytes declaring 10^9 rows would otherwise be materialised by
the converter), and the classes torch names as types (`torch.Tensor`, `torch.UntypedStorage`)
are answered by stand-ins that refuse to be called (a call would conjure an uninitialised tensor
or storage of any size, backed by nothing in the file).
"""

import _compat_pickle
import math
import operator
import os
import pickle
import tarfile

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
# Classes a checkpoint names as types, never legitimately calls.
_TYPES_ONLY = {('torch', 'Tensor'), ('torch', 'UntypedStorage'),
               ('torch.storage', 'UntypedStorage')}
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

_NOT_READABLE = 'this file is not a checkpoint the converter can read'


def _ints(values, what):
  try:
    values = tuple(operator.index(v) for v in values)
  except TypeError:
    values = None
  if values is None or any(v < 0 for v in values):
    raise CheckpointError(f'a tensor declares {what} that are not counts; {_NOT_READABLE}')
  return values


def _check_view(storage, storage_offset, size, stride, dtype=None):
  """Refuses a tensor (storage, storage_offset, size, stride) that does not lie inside its
  storage: more elements declared than the storage holds past the offset, or an element
  addressed beyond its end (torch would grow the storage to fit, out of nothing)."""
  import torch
  untyped = getattr(storage, '_untyped_storage', None)
  dtype = dtype if dtype is not None else getattr(storage, 'dtype', None)
  if not isinstance(untyped, torch.UntypedStorage) or not isinstance(dtype, torch.dtype):
    raise CheckpointError(f'a tensor is rebuilt from a {type(storage).__name__}, not from a '
                          f'storage of the file; {_NOT_READABLE}')
  (offset,) = _ints((storage_offset,), 'a storage offset')
  size, stride = _ints(size, 'sizes'), _ints(stride, 'strides')
  if len(size) != len(stride):
    raise CheckpointError(f'a tensor declares shape {size} with strides {stride}; '
                          f'{_NOT_READABLE}')
  held = untyped.nbytes() // torch._utils._element_size(dtype)
  numel = math.prod(size)
  end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if numel else offset
  if numel > held - offset or end > held:
    raise CheckpointError(
        f'a tensor declares shape {size} ({numel} elements, strides {stride}, storage offset '
        f'{offset}) in a storage of {held} {str(dtype).replace("torch.", "")} elements; '
        f'{_NOT_READABLE} (a tensor must lie inside the data the file holds: this one is '
        f'damaged, or made to exhaust memory)')


def _check_tensor(t):
  import torch
  if isinstance(t, torch.Tensor):
    _check_view(torch.storage.TypedStorage(wrap_storage=t.untyped_storage(), dtype=t.dtype,
                                           _internal=True),
                t.storage_offset(), tuple(t.shape), t.stride())


def _rebuild_tensor(storage, storage_offset, size, stride):
  import torch
  _check_view(storage, storage_offset, size, stride)
  return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *args, **kwargs):
  import torch
  _check_view(storage, storage_offset, size, stride)
  return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, *args, **kwargs)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, *args, **kwargs):
  import torch
  _check_view(storage, storage_offset, size, stride, dtype)
  return torch._utils._rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                                         backward_hooks, dtype, *args, **kwargs)


def _rebuild_parameter(data, *args, **kwargs):
  import torch
  _check_tensor(data)
  return torch._utils._rebuild_parameter(data, *args, **kwargs)


def _rebuild_parameter_with_state(data, *args, **kwargs):
  import torch
  _check_tensor(data)
  return torch._utils._rebuild_parameter_with_state(data, *args, **kwargs)


class _TypeOnly:
  """Stands in for a class that a checkpoint names as a type (the type of a rebuilt tensor, the
  type of a storage in a persistent id): it has the dtype torch's loader reads from it, and
  refuses to be called."""

  def __init__(self, module, name):
    import torch
    self.module, self.name = module, name
    self.cls = getattr(torch, name)
    self.dtype = self._dtype = torch.uint8      # what torch.load reads an UntypedStorage as

  def __call__(self, *args, **kwargs):
    raise CheckpointError(f'refusing to call {self.module}.{self.name}: a checkpoint names it '
                          f'as a type only, and a call makes a tensor or storage out of no data '
                          f'of the file; {_NOT_READABLE}')


def _rebuild_from_type_v2(func, new_type, args, state):
  import torch
  if isinstance(new_type, _TypeOnly):
    new_type = new_type.cls
  return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


# Torch's tensor rebuilders (all in _ALLOWED), answered by the checking ones above.
_CHECKED_REBUILDERS = {('torch._utils', f.__name__): f for f in (
    _rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
    _rebuild_parameter_with_state)} | {
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2}


class _RestrictedUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    # Python 2 names (pickle protocol 2, as torch writes): __builtin__.set -> builtins.set.
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if (module, name) in _ORIGINAL_CLASSES:
      return PickledModule
    if (module, name) in _LEGACY_CALLS:
      return _LEGACY_CALLS[(module, name)]
    if (module, name) in _CHECKED_REBUILDERS:
      return _CHECKED_REBUILDERS[(module, name)]
    if (module, name) in _TYPES_ONLY:
      return _TypeOnly(module, name)
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
  try:      # as torch.load tries it: that format rebuilds tensors without any rebuilder above
    with tarfile.open(path, 'r:'):
      raise CheckpointError(f'{path} is in the tar format of PyTorch\'s first releases, which '
                            f'the converter does not read: load it with that PyTorch and save '
                            f'it again with torch.save')
  except tarfile.TarError:
    pass
  try:
    return torch.load(path, map_location='cpu', pickle_module=_RestrictedPickle,
                      weights_only=False)
  except CheckpointError:
    raise
  except Exception as e:
    raise CheckpointError(f'{path} could not be read as a PyTorch checkpoint '
                          f'({type(e).__name__}: {e})') from e
