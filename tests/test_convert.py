"""The converter: PyTorch models in the original's checkpoint format -> equal Flax embeddings."""

import collections
import gzip
import json
import os
import pickle
import sys
import types

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
nn = torch.nn
F = torch.nn.functional

from configs import imagenet_resnet18  # noqa: E402
from snca_jax import checkpoint  # noqa: E402
from snca_jax import convert  # noqa: E402
from snca_jax import evaluate  # noqa: E402
from snca_jax import mesh as mesh_lib  # noqa: E402
from snca_jax import models  # noqa: E402
from snca_jax import train  # noqa: E402
from snca_jax.errors import CheckpointError  # noqa: E402

from conftest import ROOT, subprocess_env, use_devices  # noqa: E402


# --- PyTorch ResNets in torchvision's layout and in the original's CIFAR layout -------------

class Block(nn.Module):
  def __init__(self, cin, width, stride, bottleneck, shortcut_name):
    super().__init__()
    self.bottleneck = bottleneck
    out = width * (4 if bottleneck else 1)
    if bottleneck:
      self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
      self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(width)
      self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
    else:
      self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
    self.shortcut_name = shortcut_name
    proj = (nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))
            if stride != 1 or cin != out else None)
    setattr(self, shortcut_name, proj)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    if self.bottleneck:
      y = F.relu(self.bn2(self.conv2(y)))
      y = self.bn3(self.conv3(y))
    else:
      y = self.bn2(self.conv2(y))
    proj = getattr(self, self.shortcut_name)
    return F.relu(y + (proj(x) if proj is not None else x))


class TorchResNet(nn.Module):
  def __init__(self, stages, bottleneck, cifar, low_dim=128, in_ch=3):
    super().__init__()
    self.cifar = cifar
    self.conv1 = (nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False) if cifar
                  else nn.Conv2d(in_ch, 64, 7, 2, 3, bias=False))
    self.bn1 = nn.BatchNorm2d(64)
    cin = 64
    for i, (n, width) in enumerate(zip(stages, (64, 128, 256, 512))):
      blocks = []
      for j in range(n):
        blocks.append(Block(cin, width, 2 if i and not j else 1, bottleneck,
                            'shortcut' if cifar else 'downsample'))
        cin = width * (4 if bottleneck else 1)
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
    setattr(self, 'linear' if cifar else 'fc', nn.Linear(cin, low_dim))

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    if not self.cifar:
      x = F.max_pool2d(x, 3, 2, 1)
    for i in range(1, 5):
      x = getattr(self, f'layer{i}')(x)
    x = x.mean(dim=(2, 3))
    x = (self.linear if self.cifar else self.fc)(x)
    return F.normalize(x, dim=1)


def randomize_bn(model, seed):
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
      m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
      m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=g))
      m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
  return model.eval()


def original_memory_class():
  """A stand-in for the original's lib.LinearAverage.LinearAverage, importable only while
  saving: the converter must read it without this code."""
  class LinearAverage(nn.Module):
    def __init__(self, dim, n, T, momentum):
      super().__init__()
      stdv = 1 / (dim / 3) ** 0.5
      self.register_buffer('params', torch.tensor([T, momentum]))
      self.register_buffer('memory', torch.rand(n, dim).mul_(2 * stdv).add_(-stdv))
  LinearAverage.__module__ = 'lib.LinearAverage'
  LinearAverage.__qualname__ = 'LinearAverage'
  return LinearAverage


class _Py2Pickler(pickle._Pickler):
  """Writes `str` as Python 2 wrote its byte strings (SHORT_BINSTRING / BINSTRING), the way
  the original's checkpoints, pickled under Python 2, hold every key and attribute name."""
  dispatch = dict(pickle._Pickler.dispatch)

  def save_py2_str(self, obj):
    data = obj.encode('latin-1')
    if len(data) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
    else:
      self.write(pickle.BINSTRING + len(data).to_bytes(4, 'little') + data)
    self.memoize(obj)

  dispatch[str] = save_py2_str


class _Py2PickleModule:
  Pickler = _Py2Pickler
  __name__ = 'pickle'

  @staticmethod
  def dump(obj, f, protocol=2):
    _Py2Pickler(f, protocol).dump(obj)


class _ThnnBackend:
  """PyTorch 0.4's `_backend` attribute of every nn.Module (a THNNFunctionBackend), which
  pickled as a call of torch.nn.backends.thnn._get_thnn_function_backend."""

  def __reduce__(self):
    import torch.nn.backends.thnn
    return (torch.nn.backends.thnn._get_thnn_function_backend, ())


def _pytorch04_module(cls, buffers):
  """An instance of `cls` holding what PyTorch 0.4 pickled for an nn.Module: its attributes of
  that era, `_backend` first, and the buffers."""
  from collections import OrderedDict
  obj = cls.__new__(cls)
  obj.__dict__.update({
      '_backend': _ThnnBackend(), '_parameters': OrderedDict(),
      '_buffers': OrderedDict(buffers), '_backward_hooks': OrderedDict(),
      '_forward_hooks': OrderedDict(), '_forward_pre_hooks': OrderedDict(),
      '_modules': OrderedDict(), 'training': True, 'nLem': len(buffers['memory'])})
  return obj


def save_original(path, model, n_bank, T=0.07, momentum=0.5, epoch=3, legacy=False,
                  bank=None, memory_tensor=None):
  """The original's checkpoint. `legacy`: as PyTorch 0.4 under Python 2 wrote it (the legacy
  serialization, pickle protocol 2, Python 2 strings, the memory module with 0.4's
  attributes); otherwise as today's torch writes the same dict. `memory_tensor`: the bank as
  that tensor, pickled as the view it is (its storage, offset, sizes and strides)."""
  lib, mod = types.ModuleType('lib'), types.ModuleType('lib.LinearAverage')
  cls = original_memory_class()
  mod.LinearAverage, lib.LinearAverage = cls, mod
  sys.modules['lib'], sys.modules['lib.LinearAverage'] = lib, mod
  try:
    memory = cls(128, n_bank, T, momentum)
    if bank is not None:
      memory.memory.copy_(torch.from_numpy(bank))
    if memory_tensor is not None:
      memory.memory = memory_tensor
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    saved = {'epoch': epoch, 'arch': 'x', 'best_prec1': 50.0, 'optimizer': opt.state_dict(),
             'state_dict': {'module.' + k: v for k, v in model.state_dict().items()}}
    if legacy:
      saved['lemniscate'] = _pytorch04_module(cls, {'params': memory.params,
                                                    'memory': memory.memory})
      torch.save(saved, path, _use_new_zipfile_serialization=False,
                 pickle_module=_Py2PickleModule, pickle_protocol=2)
    else:
      saved['lemniscate'] = memory
      torch.save(saved, path)
  finally:
    del sys.modules['lib'], sys.modules['lib.LinearAverage']
  return memory.memory.numpy().copy()


def flax_embed(workdir, x_nchw):
  mngr = checkpoint.manager(checkpoint.checkpoint_dir(workdir), read_only=True)
  step = mngr.latest_step()
  config = checkpoint.restore_config(mngr, step)        # as stored, with its run facts
  state = checkpoint.restore_as_saved(mngr, step, mesh_lib.make_mesh(jax.devices()[:1]))
  model = models.model_from_config(checkpoint.read_config(mngr, step)[0])
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(           # not op by op
      {'params': state['params'], 'batch_stats': state['batch_stats']},
      np.transpose(x_nchw, (0, 2, 3, 1)))
  return np.asarray(out), state, config


def _expanded_bank(n, dim=128):
  """A bank pickled as an expanded view inside its storage: every row is the storage's second
  `dim` elements (stride 0), in a storage of (n + 1) x dim random numbers. Read through its
  strides it has n equal rows; read as raw storage it would not."""
  return torch.rand((n + 1) * dim).as_strided((n, dim), (0, 1), dim)


@pytest.mark.parametrize('name,stages,bottleneck,cifar,size,legacy,expanded', [
    # as PyTorch 0.4 under Python 2 wrote it, the bank an expanded view
    ('resnet18', (2, 2, 2, 2), False, False, 64, True, True),
    ('resnet50', (3, 4, 6, 3), True, False, 64, False, False),
    ('cifar_resnet18', (2, 2, 2, 2), False, True, 32, False, True),
])
def test_converted_embeddings_equal_pytorch(name, stages, bottleneck, cifar, size, legacy,
                                            expanded, tmp_path):
  torch.manual_seed(0)
  model = randomize_bn(TorchResNet(stages, bottleneck, cifar), 1)
  src = str(tmp_path / 'snca.pth.tar')
  T, momentum, epoch = 0.07, 0.25, 3          # not the config's 0.05, 0.5 and 0
  memory = save_original(src, model, n_bank=50, T=T, momentum=momentum, epoch=epoch,
                         legacy=legacy, memory_tensor=_expanded_bank(50) if expanded else None)
  if expanded:
    assert np.array_equal(memory, np.broadcast_to(memory[0], memory.shape))
  labels = np.arange(50) % 7
  np.save(tmp_path / 'labels.npy', labels)
  config = imagenet_resnet18.get_config()
  config.dtype = 'float32'                    # compared with PyTorch's float32 to 1e-4
  step, info = convert.convert(src, checkpoint_dir=str(tmp_path / 'w' / 'checkpoints'),
                               config=config, labels=str(tmp_path / 'labels.npy'))
  assert info['model'] == name and not info['head_initialised']
  x = np.random.default_rng(0).normal(size=(4, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    want = model(torch.from_numpy(x)).numpy()
  got, state, config = flax_embed(tmp_path / 'w', x)
  # Unit vectors computed in float32 by two implementations (other summation orders, other
  # BLAS kernels on each CPU): rounding of ~1e-7 per operation, grown through ~50 layers and
  # BatchNorm rescalings, stays well inside 1e-4 of their norm, 1.
  np.testing.assert_allclose(np.linalg.norm(want, axis=1), 1, rtol=1e-5)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(state['bank'])[:50], memory)   # exact
  np.testing.assert_array_equal(np.asarray(state['bank_labels'])[:50], labels)
  # [temperature, memory momentum] as the file stores them, float32
  assert config['temperature'] == float(np.float32(T))
  assert config['memory_momentum'] == float(np.float32(momentum))
  assert config['model'] == name and step == 0 and config['converted']['epoch'] == epoch


def test_torchvision_state_dict_needs_a_head(tmp_path):
  model = TorchResNet((2, 2, 2, 2), False, False, low_dim=1000)     # an ImageNet classifier
  src = str(tmp_path / 'resnet18.pth')
  torch.save(model.state_dict(), src)
  labels = np.arange(20) % 3
  np.save(tmp_path / 'labels.npy', labels)
  config = imagenet_resnet18.get_config()
  kw = dict(checkpoint_dir=str(tmp_path / 'ck'), config=config,
            labels=str(tmp_path / 'labels.npy'))
  with pytest.raises(CheckpointError, match='--init_head'):
    convert.convert(src, **kw)
  _, info = convert.convert(src, init_head=True, **kw)
  assert info['head_initialised'] and info['bank_rows'] == len(labels)
  assert info['low_dim'] == config.low_dim != model.fc.out_features
  mngr = checkpoint.manager(str(tmp_path / 'ck'), read_only=True)
  state = checkpoint.restore_as_saved(mngr, 0, mesh_lib.make_mesh(jax.devices()[:1]))
  # the backbone is the file's (OIHW -> HWIO), the head a new one of the config's size
  np.testing.assert_array_equal(np.asarray(state['params']['conv1']['kernel']),
                                model.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
  assert state['params']['head']['kernel'].shape == (model.fc.in_features, config.low_dim)
  np.testing.assert_array_equal(np.asarray(state['bank_labels'])[:len(labels)], labels)


def test_the_pytorch04_file_is_what_0_4_wrote(tmp_path):
  """The legacy fixture holds what the released files hold: Python 2 strings, protocol 2,
  and 0.4's `_backend` attribute as a call of _get_thnn_function_backend."""
  import pickletools
  import tarfile
  src = str(tmp_path / 'old.pth.tar')
  save_original(src, TorchResNet((2, 2, 2, 2), False, True), n_bank=8, legacy=True)
  assert not tarfile.is_tarfile(src) and not __import__('zipfile').is_zipfile(src)
  with open(src, 'rb') as f:
    for _ in range(3):                    # magic number, protocol version, sys info
      pickle.load(f)
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(f)]
  assert ops[0] == ('PROTO', 2)
  assert ('SHORT_BINSTRING', 'lemniscate') in ops and ('SHORT_BINSTRING', '_backend') in ops
  assert not any(name == 'BINUNICODE' for name, _ in ops)
  assert ('GLOBAL', 'torch.nn.backends.thnn _get_thnn_function_backend') in ops


def test_unpickler_refuses_other_classes(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, ('echo pwned > ' + str(tmp_path / 'pwned'),))
  src = tmp_path / 'evil.pth'
  with open(src, 'wb') as f:
    pickle.dump({'state_dict': Evil()}, f)
  with pytest.raises(CheckpointError, match='refusing to unpickle'):
    convert.load_torch_checkpoint(str(src))
  assert not (tmp_path / 'pwned').exists()


def _idx_labels(path):
  """The labels of a gzipped IDX file, read here with numpy alone."""
  with gzip.open(path, 'rb') as f:
    data = f.read()
  return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).astype(np.int64)


def numpy_weighted_knn(queries, bank, bank_labels, labels, *, k, sigma, num_classes,
                       sim_error=2e-5):
  """Weighted kNN (the k most similar rows vote exp(sim / sigma) for their label), in float64:
  {1: (top-1 hits, undecided), 5: (top-5 hits, undecided)}. A query is undecided where a
  float32 evaluator may rank it otherwise: its k-th and (k+1)-th similarities, or the class
  scores either side of the top-1 (top-5) boundary, lie within float32 rounding of each other.
  `sim_error` bounds the rounding of a float32 dot product of D=128 terms of a unit query and
  a row of norm ~1 (D x 2^-24 ~ 8e-6); each vote then errs by a factor of at most
  exp(2 sim_error / sigma)."""
  sims = queries.astype(np.float64) @ bank.astype(np.float64).T
  order = np.argsort(-sims, axis=1, kind='stable')
  ranked = np.take_along_axis(sims, order, axis=1)
  w = np.exp((ranked[:, :k] - ranked[:, :1]) / sigma)
  scores = np.zeros((len(queries), num_classes))
  np.add.at(scores, (np.arange(len(queries))[:, None], bank_labels[order[:, :k]]), w)
  classes = np.argsort(-scores, axis=1, kind='stable')      # ties: lower class first
  top = np.take_along_axis(scores, classes, axis=1)
  rel = np.expm1(2 * sim_error / sigma) + 1e-6
  near_k = ranked[:, k - 1] - ranked[:, k] <= 2 * sim_error
  out = {}
  for j in (1, 5):
    hit = np.any(classes[:, :j] == np.asarray(labels)[:, None], axis=1)
    close = top[:, j - 1] - top[:, j] < rel * (top[:, j - 1] + top[:, j])
    out[j] = (int(hit.sum()), int((near_k | close).sum()))
  return out


def _epoch_records(workdir):
  """(step, epoch) of every end-of-epoch record of a run's metrics.jsonl, in order."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r['epoch']) for r in map(json.loads, f) if 'epoch' in r]


class _Forged:
  """Pickles as a call of torch's rebuilder `fn` with `args`, written by torch.save: a tensor
  whose offset, sizes and strides are whatever the file says, over a real storage."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _typed(t):
  return torch.storage.TypedStorage(wrap_storage=t.untyped_storage(), dtype=t.dtype,
                                    _internal=True)


_NO_HOOKS = collections.OrderedDict()
_TOO_LARGE = {      # name: (what the file pickles, the declared shape named in the refusal)
    # 4 floats declared as 10^9 rows: 16 GB materialised
    'expanded': (lambda: torch.zeros(4).expand(10**9, 4), (10**9, 4)),
    # the last element far past the storage's end: torch.set_ would grow the storage
    'past_the_end': (lambda: _Forged(torch._utils._rebuild_tensor_v2, _typed(torch.zeros(4)),
                                     0, (10**6, 4), (4, 1), False, _NO_HOOKS), (10**6, 4)),
    'offset': (lambda: _Forged(torch._utils._rebuild_tensor, _typed(torch.zeros(4)), 3, (2,),
                               (1,)), (2,)),
    'v3': (lambda: _Forged(torch._utils._rebuild_tensor_v3, _typed(torch.zeros(4)), 0,
                           (10**6,), (0,), False, _NO_HOOKS, torch.float32), (10**6,)),
    'parameter': (lambda: nn.Parameter(torch.zeros(4).expand(10**6, 4)), (10**6, 4)),
}


@pytest.mark.parametrize('legacy', [False, True])
@pytest.mark.parametrize('case', sorted(_TOO_LARGE))
def test_unpickler_refuses_tensors_larger_than_their_storage(case, legacy, tmp_path):
  make, shape = _TOO_LARGE[case]
  src = str(tmp_path / 'x.pth')
  torch.save({'state_dict': {'w': make()}}, src, _use_new_zipfile_serialization=not legacy)
  with pytest.raises(CheckpointError) as e:
    convert.load_torch_checkpoint(src)
  message = str(e.value)
  assert '\n' not in message
  assert f'declares shape {shape}' in message and 'in a storage of 4 float32 elements' in message
  assert 'not a checkpoint the converter can read' in message


@pytest.mark.parametrize('cls', ['Tensor', 'UntypedStorage'])
def test_unpickler_refuses_tensors_made_of_nothing(cls, tmp_path):
  """torch.Tensor(n, ...) and torch.UntypedStorage(n) make data the file does not hold."""
  src = str(tmp_path / 'x.pth')
  torch.save({'state_dict': {'w': _Forged(getattr(torch, cls), 10**6, 4)}}, src)
  with pytest.raises(CheckpointError, match=f'refusing to call torch.*{cls}'):
    convert.load_torch_checkpoint(src)


def test_unpickler_refuses_the_tar_format(tmp_path):
  """PyTorch's first format rebuilds tensors outside any rebuilder the unpickler answers."""
  import io
  import tarfile
  src = str(tmp_path / 'old.pth')
  with tarfile.open(src, 'w') as tar:
    info = tarfile.TarInfo('storages')
    info.size = 4
    tar.addfile(info, io.BytesIO(b'\x80\x02K\x00'))
  with pytest.raises(CheckpointError, match='tar format'):
    convert.load_torch_checkpoint(src)


def _peak_memory_growth(fn):
  """How far this process's peak resident memory rises while fn() runs, in bytes. The peak is
  first reset to the present use (/proc/self/clear_refs, Linux 4.0+), so that an earlier
  test's peak cannot hide a rise; elsewhere ru_maxrss, which it can."""
  import resource

  def status(field):
    with open('/proc/self/status') as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ':'))

  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    before, peak = status('VmRSS'), lambda: status('VmHWM')
  except (OSError, StopIteration):
    scale = 1 if sys.platform == 'darwin' else 1024
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    before = peak()
  fn()
  return peak() - before


@pytest.mark.parametrize('legacy', [False, True])
def test_an_expanded_bank_is_refused_before_it_is_made(legacy, tmp_path):
  """A bank pickled as one row expanded to 2 x 10^6 rows: 512 bytes of the file, 1 GiB once
  materialised. The converter refuses it in one line, its memory staying as it was."""
  rows = 2 * 10**6
  src = str(tmp_path / 'snca.pth.tar')
  save_original(src, TorchResNet((2, 2, 2, 2), False, True), n_bank=4, legacy=legacy,
                memory_tensor=torch.rand(128).expand(rows, 128))
  assert os.path.getsize(src) < rows * 128 * 4 / 10      # the weights, and one bank row
  ck = tmp_path / 'ck'
  errors = []

  def run():
    try:
      convert.convert(src, checkpoint_dir=str(ck), config=imagenet_resnet18.get_config())
    except CheckpointError as e:
      errors.append(str(e))

  growth = _peak_memory_growth(run)
  assert growth < 200 * 2**20, f'peak memory rose by {growth / 2**20:.0f} MiB'
  assert len(errors) == 1 and '\n' not in errors[0]
  assert f'declares shape ({rows}, 128)' in errors[0]
  assert 'in a storage of 128 float32 elements' in errors[0]
  assert 'not a checkpoint the converter can read' in errors[0]
  assert not ck.exists()


def test_converted_checkpoint_evaluates_and_resumes(fake_data_config, fake_idx_dir, tmp_path,
                                                    monkeypatch):
  torch.manual_seed(1)
  model = randomize_bn(TorchResNet((2, 2, 2, 2), False, True, in_ch=1), 2)
  src = str(tmp_path / 'snca_cifar.pth.tar')
  T, file_epoch = 0.07, 1                  # the kNN's sigma: the file's, not the config's 0.05
  train_labels = _idx_labels(os.path.join(fake_idx_dir, 'train-labels-idx1-ubyte.gz'))
  test_labels = _idx_labels(os.path.join(fake_idx_dir, 't10k-labels-idx1-ubyte.gz'))
  memory = save_original(src, model, n_bank=len(train_labels), T=T, epoch=file_epoch)
  config = fake_data_config.copy_and_resolve_references()
  config.batch_size, config.num_epochs, config.knn.batch_size = 16, 2, 16
  workdir = tmp_path / 'w'
  step, info = convert.convert(src, checkpoint_dir=checkpoint.checkpoint_dir(str(workdir)),
                               config=config, labels_dataset='fashion_mnist')
  assert info['labelled'] and not info['reordered'] and step == 0
  # The dataset's records are in IDX order, torchvision's FashionMNIST order, the original's:
  # the bank is the original's as it is, each row labelled from the IDX file.
  mngr = checkpoint.manager(checkpoint.checkpoint_dir(str(workdir)), read_only=True)
  converted = checkpoint.restore_as_saved(mngr, 0, mesh_lib.make_mesh(jax.devices()[:1]))
  np.testing.assert_array_equal(np.asarray(converted['bank'])[:len(memory)], memory)
  np.testing.assert_array_equal(np.asarray(converted['bank_labels'])[:len(memory)],
                                train_labels)

  k = 5
  result = evaluate.evaluate_checkpoint(str(workdir), k=k, export_dir=str(tmp_path / 'emb'))
  queries = np.load(tmp_path / 'emb' / 'queries.npy')
  np.testing.assert_array_equal(np.load(tmp_path / 'emb' / 'query_labels.npy'), test_labels)
  assert result['num_queries'] == len(test_labels)
  # Weighted kNN of the evaluator's queries against the original's bank and the IDX labels,
  # recomputed here in float64: the evaluator's accuracies are these. No query of this data
  # lies within float32 rounding of another decision (where one did, the evaluator could go
  # either way on it, and the count would be a range).
  want = numpy_weighted_knn(queries, memory, train_labels, test_labels, k=k,
                            sigma=float(np.float32(T)), num_classes=config.data.num_classes)
  for j, (hits, undecided) in want.items():
    assert undecided == 0, (j, undecided)
    assert result[f'top{j}'] == hits / len(test_labels), (j, result[f'top{j}'], hits)

  config.model = 'cifar_resnet18'
  use_devices(monkeypatch, 2)    # resumed on 2 of the 8 devices: a ResNet-18 trains 2x faster
  state = train.train_and_evaluate(config, str(workdir))
  # Resumed at the file's epoch: only the epochs after it are trained.
  steps_per_epoch = len(train_labels) // config.batch_size
  assert _epoch_records(workdir) == [(e * steps_per_epoch, e) for e in
                                     range(file_epoch + 1, config.num_epochs + 1)]
  assert int(state.step) == config.num_epochs * steps_per_epoch


def test_command_line(tmp_path):
  import subprocess
  torch.save(TorchResNet((2, 2, 2, 2), False, True).state_dict(), tmp_path / 'r18.pth')
  np.save(tmp_path / 'labels.npy', np.arange(30) % 3)
  env = subprocess_env()
  run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, 'convert.py'), *a],
                                  cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=300)
  r = run(str(tmp_path / 'r18.pth'), '--workdir', str(tmp_path / 'w'),
          '--labels', str(tmp_path / 'labels.npy'))
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'cifar_resnet18 (cifar layout), 128-d, bank of 30 rows (labelled)' in r.stdout
  assert os.listdir(tmp_path / 'w' / 'checkpoints') == ['0']
  r = run(str(tmp_path / 'missing.pth'), '--workdir', str(tmp_path / 'w2'))
  assert r.returncode == 1 and 'Traceback' not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith('convert: ')
  assert not (tmp_path / 'w2').exists()


# --- The original's bank order, and continuing training under another recipe ----------------

def _marked_bank(n, dim=128):
  """Bank row i says i: unit rows whose first two coordinates are cos/sin of a distinct angle."""
  angles = np.arange(n) * 2 * np.pi / (n + 1)
  bank = np.zeros((n, dim), np.float32)
  bank[:, 0], bank[:, 1] = np.cos(angles), np.sin(angles)
  return bank


@pytest.mark.parametrize('source', ['photos_tfds', 'folder'])
def test_bank_rows_follow_the_dataset_records(source, image_tree, photos_tfds, tmp_path):
  """Row i of the original's bank is image i in ImageFolder order. Converted against a TFDS
  dataset whose records are in another order, each record's row must be its own image's;
  against the image folder, the orders agree as they are."""
  from snca_jax.data import listing, sources
  torch.manual_seed(0)
  files = listing.list_images(os.path.join(image_tree, 'train'))      # the original's order
  bank = _marked_bank(len(files))
  src = str(tmp_path / 'snca.pth.tar')
  save_original(src, TorchResNet((2, 2, 2, 2), False, True), n_bank=len(bank), epoch=1,
                bank=bank)
  config = imagenet_resnet18.get_config('folder')
  config.data.root, config.data.data_dir = image_tree, photos_tfds
  _, info = convert.convert(src, checkpoint_dir=str(tmp_path / 'ck'), config=config,
                            labels_dataset=source)
  mngr = checkpoint.manager(str(tmp_path / 'ck'), read_only=True)
  state = checkpoint.restore_as_saved(mngr, 0, mesh_lib.make_mesh(jax.devices()[:1]))
  data = config.data.copy_and_resolve_references()
  data.name = source
  opened = sources.open_source(data, 'train')
  records = opened.__getitems__(range(len(files)))
  row_of = {rel: i for i, (rel, _) in enumerate(files)}
  names = ([r['file_name'].decode() for r in records] if source == 'photos_tfds' else
           opened.files())
  want = np.stack([bank[row_of[name]] for name in names])
  np.testing.assert_array_equal(np.asarray(state['bank'])[:len(files)], want)
  np.testing.assert_array_equal(np.asarray(state['bank_labels'])[:len(files)],
                                [r['label'] for r in records])
  assert info['reordered'] == (source == 'photos_tfds')


def test_original_order_of_tfds_cifar_ids():
  records = [{'label': 0, 'id': b'train_00002'}, {'label': 1, 'id': b'train_00000'},
             {'label': 0, 'id': b'train_00001'}]
  np.testing.assert_array_equal(convert.original_order(records), [2, 0, 1])
  files = [{'label': 1, 'file_name': 'b/x.jpg'}, {'label': 0, 'file_name': 'a/sub/y.jpg'},
           {'label': 0, 'file_name': 'a/z.jpg'}]
  np.testing.assert_array_equal(convert.original_order(files), [2, 1, 0])


def test_converted_checkpoint_continues_under_the_resnet50_recipe(image_tree, tmp_path,
                                                                 monkeypatch):
  """The README's sequence: convert a checkpoint, then train.py with
  configs/imagenet_resnet50.py (gradient accumulation: another optimizer state) resumes at the
  original's epoch, counted in that recipe's steps. (A ResNet-18 file, whose model the
  converter puts in the config: the ResNet-50's conversion is tested above, and training the
  whole ResNet-50 here cost the suite 50 s.)"""
  from configs import imagenet_resnet50
  torch.manual_seed(0)
  model = randomize_bn(TorchResNet((2, 2, 2, 2), False, False), 3)
  src = str(tmp_path / 'snca_resnet18.pth.tar')
  file_epoch = 2
  save_original(src, model, n_bank=40, epoch=file_epoch, legacy=True)
  workdir = str(tmp_path / 'w')
  config = imagenet_resnet50.get_config('folder')
  config.data.root, config.data.image_size = image_tree, 32
  config.dtype = config.nca_matmul_dtype = 'float32'     # bfloat16 convolutions are slow on CPUs
  config.batch_size, config.grad_accum_steps, config.num_epochs = 8, 2, 3
  config.knn.batch_size, config.data.num_threads, config.data.worker_count = 8, 2, 0
  config.model = 'resnet18'                          # the file's
  convert.convert(src, checkpoint_dir=checkpoint.checkpoint_dir(workdir), config=config,
                  labels_dataset='folder')
  use_devices(monkeypatch, 2)
  state = train.train_and_evaluate(config, workdir)
  # resumed at the file's epoch, counted in this recipe's steps: one epoch more is trained
  from snca_jax.data import listing
  steps_per_epoch = len(listing.list_images(os.path.join(image_tree, 'train'))) // (
      config.batch_size)
  end = config.num_epochs * steps_per_epoch
  assert _epoch_records(workdir) == [(e * steps_per_epoch, e) for e in
                                     range(file_epoch + 1, config.num_epochs + 1)]
  assert int(state.step) == end
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')), key=int) == ['0', str(end)]
