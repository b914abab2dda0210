"""Converts the original's released checkpoints, and torchvision ResNets, to snca-jax checkpoints.

    python convert.py snca_resnet50.pth.tar --workdir runs/r50 --labels_dataset imagenet2012
    python convert.py resnet18-f37072fd.pth --workdir runs/r18 --init_head

What it reads and writes: `snca_jax/convert/original.py`. Without --config the run's config is
the original's recipe for the checkpoint's layout, configs/imagenet_resnet18.py or
configs/cifar10_resnet18.py, with the model, low_dim and temperature of the checkpoint.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from configs import cifar10_resnet18
from configs import imagenet_resnet18
from snca_jax import checkpoint
from snca_jax import cli
from snca_jax import convert
from snca_jax.errors import ConfigError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config of the converted run (default: '
                                'configs/imagenet_resnet18.py or cifar10_resnet18.py, with '
                                'the model, low_dim and temperature of the checkpoint).')
flags.DEFINE_string('workdir', None, 'Workdir to write the checkpoint into.')
flags.DEFINE_string('checkpoint', None, 'Checkpoints directory to write into instead.')
flags.DEFINE_string('labels', None, 'Bank labels: a .npy file or a text file of one integer '
                    'per line, in the bank\'s row order.')
flags.DEFINE_string('labels_dataset', None, 'Bank labels: the training split of this '
                    'dataset (a TFDS name with the config\'s data_dir, or "folder" with '
                    '--config.data.root); the bank is put in its record order.')
flags.DEFINE_bool('init_head', False, 'Initialise the embedding head at random where the '
                  'state dict has none of the right size.')

# The original's recipe for each layout, where no --config is given.
DEFAULT_CONFIGS = {'cifar': cifar10_resnet18, 'imagenet': imagenet_resnet18}


def convert_and_report(argv):
  if len(argv) != 2:
    raise ConfigError('usage: python convert.py SRC.pth[.tar] --workdir DIR')
  src = argv[1]
  config = cli.config('convert')
  if not (FLAGS.workdir or FLAGS.checkpoint):
    raise ConfigError('give --workdir DIR (or --checkpoint PATH) to write the checkpoint to')
  target = FLAGS.checkpoint or checkpoint.checkpoint_dir(FLAGS.workdir)
  original = convert.read_original(src)
  if config is None:
    config = DEFAULT_CONFIGS[original.layout].get_config()
  step, info = convert.convert(original, checkpoint_dir=target, config=config,
                               labels=FLAGS.labels, labels_dataset=FLAGS.labels_dataset,
                               init_head=FLAGS.init_head)
  print(f"converted {src}: {info['model']} ({info['layout']} layout), {info['low_dim']}-d, "
        f"bank of {info['bank_rows']} rows ({'labelled' if info['labelled'] else 'unlabelled'}"
        f"{', put in the dataset' + chr(39) + 's record order' if info['reordered'] else ''}"
        f"), temperature {info['temperature']:g}, epoch {info['epoch']}"
        f"{', head initialised at random' if info['head_initialised'] else ''}; "
        f"written to {target}/{step}")


def main(argv):
  cli.run('convert', lambda: convert_and_report(argv))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('convert'))
