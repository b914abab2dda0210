"""Weighted kNN evaluation of a checkpoint: `python eval_knn.py --workdir DIR`.

Restores the latest checkpoint of DIR (or the one given by --checkpoint), embeds the evaluation
split, and reports top-1 and top-5 of weighted kNN (K=30, sigma = the temperature by default)
against the checkpoint's memory bank, or with --recompute against freshly embedded training
features.
"""

import json
import os

import jax
from absl import app
from absl import flags

from snca_jax import cli
from snca_jax import evaluate

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir; its latest checkpoint is evaluated.')
flags.DEFINE_string('checkpoint', None, 'A checkpoint directory (one step, or the directory of '
                    'steps: the latest is taken). Overrides --workdir.')
flags.DEFINE_integer('k', None, 'Neighbours (default: the config, 30); a database with fewer '
                     'images is searched whole, and the result says the K used.')
flags.DEFINE_float('sigma', None, 'Vote temperature (default: the training temperature).')
flags.DEFINE_bool('recompute', False, 'Re-embed the training set with the evaluation '
                  'transform and search it instead of the bank.')
flags.DEFINE_integer('batch_size', None, 'Evaluation batch size (global).')
flags.DEFINE_string('data_dir', None, 'TFDS data dir, where it differs from training.')
flags.DEFINE_string('idx_dir', None, 'Fashion-MNIST IDX files, where they differ from training.')
flags.DEFINE_string('output', None, 'Also write the results as JSON to this file.')
flags.DEFINE_integer('neighbours', 0, 'Write a PNG grid and an HTML page of this many '
                     'evaluation images (at most 200) and their nearest training images.')
flags.DEFINE_string('neighbours_dir', None, 'Where to write them (default: WORKDIR/neighbours).')
flags.DEFINE_string('export', None, 'Write embeddings, labels and record indices of queries '
                    'and database as .npy files to this directory.')


def evaluate_and_report():
  path = FLAGS.checkpoint or FLAGS.workdir
  if not path:
    raise ValueError('give --workdir DIR (a training run) or --checkpoint PATH')
  if FLAGS.output:           # checked before the evaluation, not after it
    check_output(FLAGS.output)
  result = evaluate.evaluate_checkpoint(
      path, k=FLAGS.k, sigma=FLAGS.sigma, recompute=FLAGS.recompute,
      batch_size=FLAGS.batch_size,
      data_overrides={'data_dir': FLAGS.data_dir, 'idx_dir': FLAGS.idx_dir},
      neighbours=FLAGS.neighbours, neighbours_dir=FLAGS.neighbours_dir, export_dir=FLAGS.export)
  if jax.process_index() != 0:
    return
  print('\n'.join(evaluate.describe(result)))
  if FLAGS.export:
    print(f'embeddings written to {FLAGS.export}')
  if FLAGS.output:
    with open(FLAGS.output, 'w') as f:
      json.dump(result, f, indent=1)


def check_output(path):
  """--output must name a file that can be written: one line now, not a traceback after the
  whole evaluation."""
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    why = 'is a folder'
  elif not os.path.isdir(parent):
    why = f'is in {parent}, which ' + ('is a file' if os.path.exists(parent) else
                                       'does not exist')
  elif not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path)
                                                     and not os.access(path, os.W_OK)):
    why = 'cannot be written'
  else:
    return
  raise ValueError(f'--output={path} {why}: give the path of a JSON file to write (its folder '
                   f'must exist)')


def main(argv):
  del argv
  cli.run('eval_knn.py', evaluate_and_report)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('eval_knn.py'))
