"""Trains snca-jax: `python train.py --config configs/fashion_mnist.py --workdir workdir`.

With no flags, trains the default Fashion-MNIST config into ./workdir; rerunning the same
command resumes from the latest checkpoint in the workdir.
"""

import logging

from absl import app
from absl import flags
from ml_collections import config_flags

from snca_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/fashion_mnist.py',
                                'Config file (a Python file with get_config()).')
flags.DEFINE_string('workdir', 'workdir', 'Directory for checkpoints and metrics.')


def main(argv):
  del argv
  logging.getLogger('snca_jax').setLevel(logging.INFO)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
