"""The converter: PyTorch models in the original's checkpoint format -> equal Flax embeddings."""

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
from snca_jax import state as state_lib  # noqa: E402
from snca_jax import models  # noqa: E402
from snca_jax import torch_pickle  # noqa: E402
from snca_jax import train  # noqa: E402
from snca_jax.errors import CheckpointError  # noqa: E402


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
                  bank=None):
  """The original's checkpoint. `legacy`: as PyTorch 0.4 under Python 2 wrote it (the legacy
  serialization, pickle protocol 2, Python 2 strings, the memory module with 0.4's
  attributes); otherwise as today's torch writes the same dict."""
  lib, mod = types.ModuleType('lib'), types.ModuleType('lib.LinearAverage')
  cls = original_memory_class()
  mod.LinearAverage, lib.LinearAverage = cls, mod
  sys.modules['lib'], sys.modules['lib.LinearAverage'] = lib, mod
  try:
    memory = cls(128, n_bank, T, momentum)
    if bank is not None:
      memory.memory.copy_(torch.from_numpy(bank))
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
  config = checkpoint.restore_config(mngr, step)
  state = state_lib.restore_as_saved(mngr, step, mesh_lib.make_mesh(jax.devices()[:1]))
  import ml_collections
  model = models.model_from_config(ml_collections.ConfigDict(config))
  out = model.apply({'params': state['params'], 'batch_stats': state['batch_stats']},
                    np.transpose(x_nchw, (0, 2, 3, 1)), train=False)
  return np.asarray(out), state, config


@pytest.mark.parametrize('name,stages,bottleneck,cifar,size,legacy', [
    ('resnet18', (2, 2, 2, 2), False, False, 64, True),    # as PyTorch 0.4 under Python 2 wrote
    ('resnet50', (3, 4, 6, 3), True, False, 64, False),
    ('cifar_resnet18', (2, 2, 2, 2), False, True, 32, False),
])
def test_converted_embeddings_equal_pytorch(name, stages, bottleneck, cifar, size, legacy,
                                            tmp_path):
  torch.manual_seed(0)
  model = randomize_bn(TorchResNet(stages, bottleneck, cifar), 1)
  src = str(tmp_path / 'snca.pth.tar')
  memory = save_original(src, model, n_bank=50, legacy=legacy)
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
  assert np.abs(got - want).max() < 1e-4
  np.testing.assert_array_equal(np.asarray(state['bank'])[:50], memory)   # exact
  np.testing.assert_array_equal(np.asarray(state['bank_labels'])[:50], labels)
  assert config['temperature'] == np.float32(0.07) and config['memory_momentum'] == 0.5
  assert config['model'] == name and step == 0 and config['converted']['epoch'] == 3


def test_torchvision_state_dict_needs_a_head(tmp_path):
  model = TorchResNet((2, 2, 2, 2), False, False, low_dim=1000)     # an ImageNet classifier
  src = str(tmp_path / 'resnet18.pth')
  torch.save(model.state_dict(), src)
  np.save(tmp_path / 'labels.npy', np.arange(20) % 3)
  kw = dict(checkpoint_dir=str(tmp_path / 'ck'), config=imagenet_resnet18.get_config(),
            labels=str(tmp_path / 'labels.npy'))
  with pytest.raises(CheckpointError, match='--init_head'):
    convert.convert(src, **kw)
  _, info = convert.convert(src, init_head=True, **kw)
  assert info['head_initialised'] and info['bank_rows'] == 20 and info['low_dim'] == 128


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
    torch_pickle.load_torch_checkpoint(str(src))
  assert not (tmp_path / 'pwned').exists()


def test_converted_checkpoint_evaluates_and_resumes(fake_data_config, tmp_path):
  torch.manual_seed(1)
  model = randomize_bn(TorchResNet((2, 2, 2, 2), False, True, in_ch=1), 2)
  src = str(tmp_path / 'snca_cifar.pth.tar')
  save_original(src, model, n_bank=96, T=0.05, epoch=1)
  config = fake_data_config.copy_and_resolve_references()
  config.batch_size, config.num_epochs, config.knn.batch_size = 16, 2, 16
  workdir = tmp_path / 'w'
  step, info = convert.convert(src, checkpoint_dir=checkpoint.checkpoint_dir(str(workdir)),
                               config=config, labels_dataset='fashion_mnist')
  assert info['labelled'] and step == 0
  result = evaluate.evaluate_checkpoint(str(workdir), k=5)
  assert result['num_queries'] == 40 and 0 <= result['top1'] <= 1
  config.model = 'cifar_resnet18'
  state = train.train_and_evaluate(config, str(workdir))
  assert int(state.step) == 12


def test_command_line(tmp_path):
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  torch.save(TorchResNet((2, 2, 2, 2), False, True).state_dict(), tmp_path / 'r18.pth')
  np.save(tmp_path / 'labels.npy', np.arange(30) % 3)
  env = dict(os.environ, PYTHONPATH=root)
  env.pop('XLA_FLAGS', None)
  run = lambda *a: subprocess.run([sys.executable, '-m', 'snca_jax.convert', *a], cwd=tmp_path,
                                  env=env, capture_output=True, text=True, timeout=300)
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
  from snca_jax.data import folder, pipeline
  torch.manual_seed(0)
  files = folder.list_images(os.path.join(image_tree, 'train'))      # the original's order
  bank = _marked_bank(len(files))
  src = str(tmp_path / 'snca.pth.tar')
  save_original(src, TorchResNet((2, 2, 2, 2), False, True), n_bank=len(bank), epoch=1,
                bank=bank)
  config = imagenet_resnet18.get_config('folder')
  config.data.root, config.data.data_dir = image_tree, photos_tfds
  _, info = convert.convert(src, checkpoint_dir=str(tmp_path / 'ck'), config=config,
                            labels_dataset=source)
  mngr = checkpoint.manager(str(tmp_path / 'ck'), read_only=True)
  state = state_lib.restore_as_saved(mngr, 0, mesh_lib.make_mesh(jax.devices()[:1]))
  data = config.data.copy_and_resolve_references()
  data.name = source
  records = pipeline.open_source(data, 'train').__getitems__(range(len(files)))
  row_of = {rel: i for i, (rel, _) in enumerate(files)}
  name = lambda r: (r['file_name'].decode() if source == 'photos_tfds' else r['file'])
  want = np.stack([bank[row_of[name(r)]] for r in records])
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


def test_converted_resnet50_continues_under_the_resnet50_recipe(image_tree, tmp_path):
  """The README's sequence: convert a ResNet-50, then train.py with configs/imagenet_resnet50.py
  (gradient accumulation: another optimizer state) resumes at the original's epoch, counted in
  that recipe's steps."""
  from configs import imagenet_resnet50
  torch.manual_seed(0)
  model = randomize_bn(TorchResNet((3, 4, 6, 3), True, False), 3)
  src = str(tmp_path / 'snca_resnet50.pth.tar')
  save_original(src, model, n_bank=40, epoch=2, legacy=True)
  workdir = str(tmp_path / 'w')
  config = imagenet_resnet50.get_config('folder')
  config.data.root, config.data.image_size = image_tree, 32
  config.dtype = config.nca_matmul_dtype = 'float32'     # bfloat16 convolutions are slow on CPUs
  config.batch_size, config.grad_accum_steps, config.num_epochs = 8, 2, 3
  config.knn.batch_size, config.data.num_threads, config.data.worker_count = 8, 2, 0
  convert.convert(src, checkpoint_dir=checkpoint.checkpoint_dir(workdir), config=config,
                  labels_dataset='folder')
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 15                    # resumed at 2 x 5 steps, one epoch more
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['0', '15']
