"""Trains snca-jax: `python train.py --config configs/fashion_mnist.py --workdir workdir`.

With no flags, trains the default Fashion-MNIST config into ./workdir; rerunning the same
command resumes from the latest checkpoint in the workdir. On several hosts, run the same
command on each (see README: --multihost, or --coordinator_address/--num_processes/--process_id).
"""

import os

from absl import app
from absl import flags

from snca_jax import cli
from snca_jax import train

FLAGS = flags.FLAGS
cli.define_config_flag('train.py', os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                'configs', 'fashion_mnist.py'))
flags.DEFINE_string('workdir', 'workdir', 'Directory for checkpoints and metrics.')


def main(argv):
  del argv
  config = cli.config('train.py')
  cli.run('train.py', lambda: train.train_and_evaluate(config, FLAGS.workdir))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('train.py'))
