"""One process of a small training run, for tests/test_multihost.py (not a test itself).

    python tests/multihost_worker.py --devices 2 --num_processes 2 --process_id 0 --port P \
        --workdir W --idx_dir I --data_dir D --out results.npz [--epochs 2] [--eval_only]
        [--folder_root DIR]

Trains the tiny config (resuming from W), then process 0 writes to --out the final params,
optimizer state, bank and batch statistics, what every step saw (the global batch: indices,
labels, image bytes), the first step's loss, gradient and written bank rows, and the kNN
evaluation of the checkpoint.

`--mutation` plants a bug, to show that tests/test_multihost.py catches it:
  other_share  each process reads the other process's share of every global batch
  local_grad   each process trains on a mesh of its own devices, so that its gradient (and
               everything else) is reduced over its devices only, never across processes
"""

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

p = argparse.ArgumentParser()
p.add_argument('--devices', type=int, required=True)
p.add_argument('--num_processes', type=int, default=1)
p.add_argument('--process_id', type=int, default=0)
p.add_argument('--port', type=int, default=0)
p.add_argument('--workdir', required=True)
p.add_argument('--idx_dir', required=True)
p.add_argument('--data_dir', required=True)
p.add_argument('--out', required=True)
p.add_argument('--epochs', type=int, default=2)
p.add_argument('--seed', type=int, default=0)
p.add_argument('--learning_rate', type=float, default=0.0)
p.add_argument('--mutation', default='', choices=('', 'other_share', 'local_grad'))
p.add_argument('--eval_only', action='store_true')
p.add_argument('--folder_root', default='', help='train on this image folder instead')
p.add_argument('--interleaved_eval', action='store_true',
               help='embed the eval split on a mesh whose devices alternate between processes')
args = p.parse_args()

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', args.devices)
if args.num_processes > 1:
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{args.port}',
                             num_processes=args.num_processes, process_id=args.process_id)

import numpy as np  # noqa: E402

from configs import fashion_mnist  # noqa: E402
from snca_jax import distributed  # noqa: E402
from snca_jax import evaluate  # noqa: E402
from snca_jax import mesh as mesh_lib  # noqa: E402
from snca_jax import models  # noqa: E402
from snca_jax import step as step_lib  # noqa: E402
from snca_jax import train  # noqa: E402
from snca_jax.data import pipeline  # noqa: E402
from snca_jax.data import sources  # noqa: E402
from snca_jax.data import transforms  # noqa: E402


def tiny_config():
  c = fashion_mnist.get_config()
  c.data.idx_dir, c.data.data_dir = args.idx_dir, args.data_dir
  c.model, c.low_dim, c.batch_size, c.num_epochs = 'tiny_resnet', 16, 16, args.epochs
  c.knn.batch_size, c.log_every_steps = 16, 1
  c.seed, c.learning_rate = args.seed, args.learning_rate
  # BatchNorm per device (the original's DataParallel semantics): then the two runs differ only
  # in the order of the cross-device sums of the NCA kernel and of the gradient. The global
  # batch's BatchNorm is checked at the first step (`first_global_bn/`).
  c.bn_per_device = True
  if args.folder_root:       # a shrunk ImageNet recipe on an image folder (prepared on first use)
    c.data.update(name='folder', root=args.folder_root, train_split='train', eval_split='val',
                  num_classes=0, image_size=16, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                  train_augment='imagenet', eval_augment='imagenet_eval', num_threads=2)
    c.batch_size = 8
  return c


def interleaved_eval(out):
  """Embeds the eval split of the checkpoint on the usual mesh and on one whose device order
  alternates between processes (as a TPU slice's can): features, labels, positions and masks
  must come back in one order on both."""
  from snca_jax import checkpoint, evaluators, mesh as mesh_lib, models
  mngr = checkpoint.manager(checkpoint.checkpoint_dir(args.workdir), read_only=True)
  step = mngr.latest_step()
  config, _ = checkpoint.read_config(mngr, step)
  plain = mesh_lib.make_mesh()
  by_process = [[d for d in jax.devices() if d.process_index == p]
                for p in range(jax.process_count())]
  interleaved = mesh_lib.make_mesh([d for group in zip(*by_process) for d in group])
  assert [d.process_index for d in interleaved.devices.flat] != sorted(
      d.process_index for d in interleaved.devices.flat)
  saved = checkpoint.restore_as_saved(mngr, step, plain)
  variables = {'params': saved['params'], 'batch_stats': saved['batch_stats']}
  source = sources.open_source(config.data, config.data.eval_split)
  kw = dict(data_config=config.data, transform=transforms.from_config(config.data, 'none'),
            batch_size=16)
  fa, la, ia = dataclasses.astuple(evaluators.embed_dataset(
      variables, models.model_from_config(config), source, mesh=plain, **kw))
  fb, lb, ib = dataclasses.astuple(evaluators.embed_dataset(
      variables, models.model_from_config(config), source, mesh=interleaved, **kw))
  out['interleaved_feature_diff'] = np.asarray(np.abs(fa - fb).max())
  out['interleaved_same_order'] = np.asarray(np.array_equal(la, lb) and np.array_equal(ia, ib)
                                             and np.array_equal(ia, np.arange(len(source))))


def plant(mutation):
  if mutation == 'other_share':
    share = pipeline.ProcessShare.__call__
    pipeline.ProcessShare.__call__ = lambda self, positions: share(
        pipeline.ProcessShare((self.process_index + 1) % self.process_count,
                              self.process_count), positions)
  elif mutation == 'local_grad':
    make_mesh = mesh_lib.make_mesh
    mesh_lib.make_mesh = lambda devices=None: make_mesh(
        jax.local_devices() if devices is None else devices)
    # Orbax refuses to save process-local arrays of a multi-process run: no checkpoints, so
    # that what the steps computed reaches the test.
    from snca_jax import checkpoint
    checkpoint.save = checkpoint.saving.save = lambda *args, **kwargs: None   # best/ too


def record_steps(out):
  """Wraps the training step so that every step's global batch is kept (gathered from all
  processes) and the first step's loss, gradient and bank rows are computed before it runs."""
  make_train_step = step_lib.make_train_step

  def recording(model, tx, config, *, steps_per_epoch, shardings, mesh, class_index=None):
    assert class_index is None          # ten classes: the probes below go without it
    train_step = make_train_step(model, tx, config, steps_per_epoch=steps_per_epoch,
                                 shardings=shardings, mesh=mesh)
    probes = {'first': model, 'first_global_bn': models.model_from_config(
        config.copy_and_resolve_references(), num_devices=1)}
    probes = {name: jax.jit(step_lib.make_loss_and_grads(m, config, mesh=mesh,
                                                         steps_per_epoch=steps_per_epoch))
              for name, m in probes.items()}

    def step(state, batch):
      seen = {k: distributed.to_host(v) for k, v in batch.items()}
      for k, v in seen.items():
        out.setdefault(f'batch/{k}', []).append(v)
      for name, probe in probes.items() if 'first/loss' not in out else ():
        bank, batch_stats, grads, metrics = probe(state, batch)
        out[f'{name}/loss'] = distributed.to_host(metrics['loss'])
        out[f'{name}/bank_rows'] = distributed.to_host(bank)[seen['index']]
        for what, tree in (('grad', grads), ('batch_stats', batch_stats)):
          for path, x in jax.tree_util.tree_leaves_with_path(tree):
            out[f'{name}/{what}{jax.tree_util.keystr(path)}'] = distributed.to_host(x)
      return train_step(state, batch)

    return step

  step_lib.make_train_step = recording


def main():
  assert jax.process_count() == args.num_processes
  assert len(jax.devices()) == args.devices * args.num_processes
  plant(args.mutation)
  out = {}
  if not args.eval_only:
    record_steps(out)
    state = train.train_and_evaluate(tiny_config(), args.workdir)
    out.update({k: np.stack(v) for k, v in out.items() if k.startswith('batch/')})
    leaves = jax.tree_util.tree_leaves_with_path(
        {'params': state.params, 'batch_stats': state.batch_stats,
         'opt_state': state.opt_state})
    out.update({jax.tree_util.keystr(k): distributed.to_host(v) for k, v in leaves})
    out['bank'] = distributed.to_host(state.bank)
    out['bank_labels'] = distributed.to_host(state.bank_labels)
    out['step'] = np.asarray(int(state.step))
  if args.interleaved_eval:
    interleaved_eval(out)
  if args.mutation != 'local_grad':     # which writes no checkpoint
    result = evaluate.evaluate_checkpoint(args.workdir)
    out['knn_top1'], out['knn_top5'] = np.asarray(result['top1']), np.asarray(result['top5'])
  if jax.process_index() == 0:
    np.savez(args.out, **out)


if __name__ == '__main__':
  main()
