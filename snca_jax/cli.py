"""What the commands (train.py, eval_knn.py, convert.py, experiments.py) share: multi-host flags
and one-line errors."""

import logging
import sys
import traceback

from absl import flags

from snca_jax import distributed
from snca_jax.errors import SncaError

FLAGS = flags.FLAGS
flags.DEFINE_bool('multihost', False, 'Start jax.distributed and let JAX detect the cluster '
                  '(Cloud TPU pod slice, SLURM, Open MPI). Automatic under SLURM with several '
                  'tasks and on multi-worker TPU slices.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a multi-process '
                    'run started by hand (or SNCA_COORDINATOR_ADDRESS).')
flags.DEFINE_integer('num_processes', None, 'Processes in a run started by hand '
                     '(or SNCA_NUM_PROCESSES).')
flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1 '
                     '(or SNCA_PROCESS_ID).')
flags.DEFINE_bool('verbose', False, 'Show the traceback of errors, and the INFO lines of '
                  'Orbax, TFDS and JAX.')


def init_distributed():
  return distributed.initialize(multihost=FLAGS.multihost,
                                coordinator_address=FLAGS.coordinator_address,
                                num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)


def define_config_flag(program: str, default: str):
  """`--config FILE` (+ `--config.KEY=VALUE` overrides). ml_collections loads the default and
  applies overrides while the flag is defined: a bad one ends the program here, in one line."""
  from ml_collections import config_flags
  try:
    config_flags.DEFINE_config_file('config', default, 'Config file (a Python file with '
                                    'get_config()); override fields with --config.FIELD=VALUE.')
  except Exception as e:  # noqa: BLE001 (anything config_flags raises is a bad flag)
    _bad_flags(program, e)


def config(program: str):
  """FLAGS.config, loaded now (config_flags loads the file lazily): a missing or broken config
  file ends the program in one line."""
  try:
    config = FLAGS.config
    if config is not None:
      config.to_dict()      # a config that failed to load raises on first use
    return config
  except Exception as e:  # noqa: BLE001
    _bad_flags(program, e)


def _bad_flags(program, e):
  message = ' '.join(str(e).replace('\\n', ' ').split()) or type(e).__name__
  print(f'{program}: bad flags: {message}', file=sys.stderr)
  sys.exit(2)


def flags_parser(program: str):
  """An absl flags parser that reports a bad flag, a missing config file or a misspelt config
  key in one line (exit 2) instead of a traceback."""

  def parse(argv):
    try:
      return FLAGS(argv)
    except Exception as e:  # noqa: BLE001 (flags.Error, and config_flags' own errors)
      _bad_flags(program, e)

  return parse


def run(program: str, fn):
  """Runs fn(); a SncaError (or a bad flag value) becomes one line on stderr and exit 1.
  Quiet by default: snca-jax's own lines, progress and errors, not the INFO and WARNING lines
  of Orbax, TFDS and JAX (all of them with --verbose)."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.INFO if FLAGS.verbose else absl_logging.ERROR)
  logging.getLogger('snca_jax').setLevel(logging.INFO)
  logging.getLogger('jax').setLevel(logging.INFO if FLAGS.verbose else logging.WARNING)
  if not FLAGS.verbose:
    import tensorflow_datasets as tfds
    tfds.display_progress_bar(False)
  try:
    init_distributed()
    return fn()
  except (SncaError, ValueError, FileNotFoundError, PermissionError) as e:
    if FLAGS.verbose:
      traceback.print_exc()
    message = ' '.join(str(e).split()) or type(e).__name__
    print(f'{program}: {message}', file=sys.stderr)
    sys.exit(1)
