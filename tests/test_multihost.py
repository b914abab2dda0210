"""Two processes x 2 CPU devices (jax.distributed, gloo) train as 1 process x 4.

What the two runs must share bit for bit is what each step sees: the global batch (record
indices, labels, image bytes) of every step. The arithmetic of a step is then the same on both
but for the order in which gloo, or the in-process reduction, adds the devices' partial sums.

The runs keep BatchNorm statistics per device (the original's DataParallel semantics), so that
the sums across devices are those of the NCA kernel and of the gradient alone. A float32 sum of
the 4 devices' partials, added in another order, moves by at most 3 x 2^-24 (1.8e-7) of the sum
of their magnitudes. The first step's loss, written bank rows and BatchNorm statistics must
agree within 1e-6 of their magnitude (on an AMD EPYC they come out equal, or 1e-7 apart). Its
gradient is such a sum of partials that partly cancel (the examples pull the weights different
ways): it must agree within 2e-6 in norm, and each array within 2e-5 of its largest entry
(measured on an AMD EPYC over 6 seeds: at most 4e-7 in norm, 2e-6 in one array). The same
first step with BatchNorm over the global batch (`first_global_bn/`) is held to the same bounds
for the loss, bank rows and statistics, and to 1e-5 in norm (1e-4 in each array) for the
gradient: the backward pass through a BatchNorm of the whole batch subtracts cross-device means
from each activation's gradient, which cancels, so the same last-bit differences come out
larger (on an AMD EPYC over 6 seeds: at most 8e-7 in norm, 3e-6 in one array).

Over all 12 steps, training would amplify the last bits (seen on an Intel Xeon: 3.9% apart in a
BatchNorm mean after 12 steps at learning rate 0.01, with global BatchNorm), so the long run is
one that cannot: learning rate 0. The parameters stay put, so each step's loss, gradient, bank
rows and statistics are computed from the same parameters on both runs, and the state
accumulates them through contractions (the bank's momentum update, the momentum trace of the
gradients, the running statistics): each array must stay within 1e-5 of its largest entry.

The tests catch the bugs they exist for. With a bug planted in the two-process run,
`SNCA_MULTIHOST_MUTATION=other_share pytest tests/test_multihost.py` (each process reads the
other one's share of every batch) fails test_every_step_sees_the_same_global_batch and
test_first_step_loss_gradient_and_bank_rows; `SNCA_MULTIHOST_MUTATION=local_grad` (each
process trains on its own devices, its gradient never reduced across processes) fails those two
and test_twelve_steps_agree. `SNCA_MULTIHOST_SEED=N` runs them with another seed (model
initialisation, bank and batch order); with `-s`, every comparison prints how far apart the runs
came out against its bound (the measured figures above).
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from snca_jax.data import listing
from snca_jax.data import sources

from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'multihost_worker.py')
SEED = int(os.environ.get('SNCA_MULTIHOST_SEED', '0'))
MUTATION = os.environ.get('SNCA_MULTIHOST_MUTATION', '')


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(n_proc, devices, workdir, out, data, *extra):
  """Starts the worker as n_proc processes: (their Popen objects, out). If one cannot be
  started, those that were are killed."""
  port = free_port()
  env = subprocess_env()
  procs = []
  try:
    for pid in range(n_proc):
      cmd = [sys.executable, WORKER, '--devices', str(devices), '--num_processes', str(n_proc),
             '--process_id', str(pid), '--port', str(port), '--workdir', str(workdir),
             '--out', str(out), '--idx_dir', data.idx_dir, '--data_dir', data.data_dir,
             '--seed', str(SEED), *extra]
      procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True))
  except BaseException:
    stop(procs)
    raise
  return procs, out


def stop(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def finish(*jobs, timeout=300):
  """Waits for jobs started by `start`, all at once; kills every process whatever happens:
  each job's saved arrays."""
  try:
    for procs, _ in jobs:
      logs = [p.communicate(timeout=timeout)[0] for p in procs]
      for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
  finally:
    for procs, _ in jobs:
      stop(procs)
  return [dict(np.load(out)) for _, out in jobs]


def run_together(*specs, timeout=300):
  """Runs several workers at once, each spec `launch`'s arguments: their saved arrays. The
  processes of one compute while another's wait on each other."""
  jobs = []
  try:
    for spec in specs:
      jobs.append(start(*spec))
  except BaseException:
    for procs, _ in jobs:
      stop(procs)
    raise
  return finish(*jobs, timeout=timeout)


def launch(n_proc, devices, workdir, out, data, *extra, timeout=300):
  """Runs the worker as n_proc processes; kills every one of them whatever happens."""
  return run_together((n_proc, devices, workdir, out, data, *extra), timeout=timeout)[0]


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [l['train/loss'] for l in map(json.loads, f) if 'train/loss' in l]


def close(a, b, rel, what):
  """|a - b| <= rel * max|b|, elementwise: float32 rounding scales with the array's magnitude,
  not with each entry's (an entry near zero is a sum that cancelled)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  scale = max(float(np.abs(b).max()), np.finfo(np.float32).tiny) if b.size else 1.0
  print(f'{what}: {np.abs(a - b).max() / scale:.1e} of its largest entry (bound {rel:g})')
  np.testing.assert_allclose(a, b, rtol=0, atol=rel * scale, err_msg=what)


@pytest.fixture(scope='session')
def runs(fake_data_config, tmp_path_factory):
  sources.open_source(fake_data_config.data, 'train')       # prepare once, before the workers
  tmp = tmp_path_factory.mktemp('multihost')
  mutation = ('--mutation', MUTATION) if MUTATION else ()
  single, multi = run_together(
      (1, 4, tmp / 'single', tmp / 'single.npz', fake_data_config.data),
      (2, 2, tmp / 'multi', tmp / 'multi.npz', fake_data_config.data, *mutation))
  return tmp, single, multi


def test_every_step_sees_the_same_global_batch(runs):
  _, single, multi = runs
  assert int(single['step']) == int(multi['step']) == 12
  for field in ('index', 'label', 'image'):
    a, b = single[f'batch/{field}'], multi[f'batch/{field}']
    assert a.shape[:2] == (12, 16) and b.shape == a.shape, field
    np.testing.assert_array_equal(b, a, err_msg=field)
  # Two epochs of 6 steps: each epoch a permutation of 96 of the records, the two different.
  index = single['batch/index'].reshape(2, 96)
  assert all(len(set(e)) == 96 for e in index) and not np.array_equal(*index)


def norm_close(a, b, rel, what):
  """||a - b|| <= rel * ||b|| over all the arrays of two lists."""
  a = np.concatenate([np.ravel(x) for x in a]).astype(np.float64)
  b = np.concatenate([np.ravel(x) for x in b]).astype(np.float64)
  assert a.shape == b.shape and np.linalg.norm(b) > 0, what
  ratio = np.linalg.norm(a - b) / np.linalg.norm(b)
  print(f'{what}: {ratio:.1e} in norm (bound {rel:g})')
  assert ratio <= rel, (what, ratio)


@pytest.mark.parametrize('probe,grad_norm_rel', [('first', 2e-6), ('first_global_bn', 1e-5)])
def test_first_step_loss_gradient_and_bank_rows(runs, probe, grad_norm_rel):
  _, single, multi = runs
  keys = sorted(k for k in single if k.startswith(probe + '/'))
  assert keys == sorted(k for k in multi if k.startswith(probe + '/'))
  grads = [k for k in keys if k.startswith(probe + '/grad')]
  assert len(grads) > 10 and all(np.abs(single[k]).max() > 0 for k in grads)
  for key in keys:
    close(multi[key], single[key], 1e-6 if key not in grads else 10 * grad_norm_rel, key)
  norm_close([multi[k] for k in grads], [single[k] for k in grads], grad_norm_rel, probe)
  np.testing.assert_allclose(np.linalg.norm(single[f'{probe}/bank_rows'], axis=1), 1,
                             rtol=1e-5)


def test_twelve_steps_agree(runs):
  tmp, single, multi = runs
  state = sorted(k for k in single if k.startswith(("['", 'bank')))
  assert state == sorted(k for k in multi if k.startswith(("['", 'bank')))
  assert any('opt_state' in k for k in state) and any('batch_stats' in k for k in state)
  for key in state:
    close(multi[key], single[key], 1e-5, key)
  a, b = losses(tmp / 'single'), losses(tmp / 'multi')
  assert len(a) == len(b) == 12
  close(b, a, 1e-5, 'losses')
  assert os.listdir(tmp / 'multi' / 'checkpoints')


def test_two_process_checkpoint_restores_in_one_process(runs, fake_data_config):
  tmp, _, multi = runs
  shutil.copytree(tmp / 'multi', tmp / 'evaluate')
  shutil.copytree(tmp / 'multi', tmp / 'resume')
  evaluated, resumed = run_together(                       # each on its own copy
      (1, 1, tmp / 'evaluate', tmp / 'eval.npz', fake_data_config.data, '--eval_only'),
      (1, 4, tmp / 'resume', tmp / 'resume.npz', fake_data_config.data, '--epochs', '3'))
  np.testing.assert_allclose(evaluated['knn_top1'], multi['knn_top1'], atol=1e-6)
  assert int(resumed['step']) == 18
  # The third epoch continues the two-process run: its batches are epoch 3's permutation.
  assert resumed['batch/index'].shape == (6, 16)
  assert len(set(resumed['batch/index'].ravel())) == 96


def test_evaluation_on_a_mesh_that_interleaves_processes(runs, fake_data_config):
  """Features and labels come back in one order when the mesh's device order alternates
  between the processes (process 0, 1, 0, 1)."""
  tmp, _, _ = runs
  out = launch(2, 2, tmp / 'multi', tmp / 'interleaved.npz', fake_data_config.data,
               '--eval_only', '--interleaved_eval')
  assert bool(out['interleaved_same_order'])
  assert float(out['interleaved_feature_diff']) < 1e-5


def test_process_zero_prepares_an_image_folder_while_the_other_waits(fake_data_config,
                                                                     tmp_path):
  """Two processes start on an image folder nobody has prepared: it is prepared once (by
  process 0, on the filesystem both see), and both train on it."""
  from conftest import make_image_tree
  root = tmp_path / 'photos'
  make_image_tree(str(root), per_class={'train': 4, 'val': 2})
  out = launch(2, 1, tmp_path / 'w', tmp_path / 'out.npz', fake_data_config.data,
               '--epochs', '1', '--folder_root', str(root))
  assert int(out['step']) == 2                       # 16 images, batch 8
  assert sorted(os.listdir(root / 'snca_prepared')) == ['train', 'val']
  files = listing.list_images(str(root / 'train'))
  np.testing.assert_array_equal(out['bank_labels'][:16], [label for _, label in files])
  assert sorted(out['batch/index'].ravel()) == list(range(16))   # each image once, both shares
