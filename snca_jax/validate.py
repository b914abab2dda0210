"""Every config field checked before any work: names, types, ranges and combinations.

`check_config(config)` raises one ConfigError that names every bad field, what it holds and
what it may hold, so a run with a typo or an impossible value stops in a second, in one line,
before it reads data, compiles or touches the workdir.
"""

import math
import numbers

from snca_jax import models
from snca_jax import schema
from snca_jax.data import transforms
from snca_jax.errors import ConfigError

LR_SCHEDULES = ('cosine', 'step')


def _number(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _missing(config, schema_config, prefix='') -> list[str]:
  """The fields of the schema that `config` lacks, dotted."""
  out = []
  for key, default in schema_config.items():
    if key not in config:
      out.append(prefix + key)
    elif hasattr(default, 'items') and hasattr(config[key], 'items'):
      out += _missing(config[key], default, f'{prefix}{key}.')
  return out


def problems(config) -> list[str]:
  """Every problem with `config`, as 'field=value: what it should be' strings."""
  missing = _missing(config, schema.default_config())
  if missing:      # nothing else can be checked
    return [f'{", ".join(missing)} missing: a config starts from '
            f'snca_jax.schema.default_config() (as every file in configs/ does) and sets fields']
  out = []

  def need(ok, field, rule):
    if not ok:
      value = config
      for part in field.split('.'):
        value = value.get(part) if hasattr(value, 'get') else None
      out.append(f'{field}={value!r}: {rule}')

  def one_of(field, value, choices):
    need(value in choices, field, 'one of ' + ', '.join(map(str, choices)))

  def count(field, value, low=1):
    need(_integer(value) and value >= low, field, f'an integer >= {low}')

  def real(field, value, low=None, high=None, low_open=False, high_open=False):
    ok = _number(value)
    if ok and low is not None:
      ok = value > low if low_open else value >= low
    if ok and high is not None:
      ok = value < high if high_open else value <= high
    lo = '' if low is None else f' {">" if low_open else ">="} {low}'
    hi = '' if high is None else f'{" and" if lo else ""} {"<" if high_open else "<="} {high}'
    need(ok, field, f'a finite number{lo}{hi}')

  d = config.data
  one_of('model', config.model, sorted(models.MODELS))
  count('low_dim', config.low_dim, low=0)    # 0: the pooled features, no embedding layer
  one_of('dtype', config.dtype, sorted(models.DTYPES))
  one_of('model_init', config.model_init, models.INITS)
  one_of('monitor', config.monitor, ('1nn', 'knn'))
  one_of('loss', config.loss, ('nca', 'softmax'))
  need(isinstance(d.name, str) and d.name.strip(), 'data.name',
       "'fashion_mnist', 'folder' or a TFDS dataset name")
  if d.name == 'folder':
    need(bool(d.root), 'data.root', 'the image folder (DIR/<split>/<class>/<image>)')
  for split in ('train_split', 'eval_split'):
    need(isinstance(d[split], str) and d[split].strip(), f'data.{split}', 'a split name')
  count('data.num_classes', d.num_classes, low=0)
  count('data.image_size', d.image_size)
  one_of('data.channels', d.channels, (1, 3))
  for field in ('mean', 'std'):
    values = d[field]
    ok = (isinstance(values, (tuple, list)) and len(values) == d.channels
          and all(_number(v) for v in values))
    if ok and field == 'std':
      ok = all(v > 0 for v in values)
    need(ok, f'data.{field}', f'{d.channels} finite number(s), one per channel'
         + (', each > 0' if field == 'std' else ''))
  label_map, classes = d.label_map, d.train_classes
  # With num_classes 0 a label map makes max(label_map) + 1 classes, so that every class in
  # between must be used too.
  map_ok = isinstance(label_map, (tuple, list)) and all(_integer(y) and y >= 0
                                                        for y in label_map)
  used = set(range(d.num_classes if _integer(d.num_classes) and d.num_classes > 0 else
                   (max(label_map) + 1 if map_ok and label_map else 0)))
  need(map_ok and (not label_map or set(label_map) == used), 'data.label_map',
       'one class in [0, num_classes) for each fine class, every one used (with '
       'num_classes=0: each of 0..max(label_map))')
  # train_classes are fine classes: those of the label map where there is one, else (labels
  # trained as they are) the classes that num_classes counts.
  fine = (len(label_map) if map_ok and label_map else
          d.num_classes if d.label_key == 'label' and _integer(d.num_classes) else 0)
  need(isinstance(classes, (tuple, list)) and all(_integer(y) and y >= 0 for y in classes)
       and len(set(classes)) == len(classes) and (not fine or all(y < fine for y in classes)),
       'data.train_classes', 'distinct class numbers >= 0'
       + ((f', each a fine class: below len(label_map) = {fine}' if map_ok and label_map else
           f', each below num_classes = {fine}') if fine else ''))
  need(isinstance(d.label_key, str) and d.label_key.strip(), 'data.label_key',
       "the record field of the training label ('label', or e.g. 'coarse_label')")
  one_of('data.train_augment', d.train_augment, transforms.KINDS)
  one_of('data.eval_augment', d.eval_augment, transforms.KINDS)
  count('data.num_threads', d.num_threads, low=0)
  count('data.worker_count', d.worker_count, low=-1)
  count('seed', config.seed, low=0)
  count('num_epochs', config.num_epochs)
  count('batch_size', config.batch_size)
  count('grad_accum_steps', config.grad_accum_steps)
  real('learning_rate', config.learning_rate, low=0)
  one_of('lr_schedule', config.lr_schedule, LR_SCHEDULES)
  count('lr_step_epochs', config.lr_step_epochs)
  real('lr_decay', config.lr_decay, low=0, high=1, low_open=True)
  real('momentum', config.momentum, low=0, high=1, high_open=True)
  real('weight_decay', config.weight_decay, low=0)
  real('temperature', config.temperature, low=0, low_open=True)
  real('margin', config.margin, low=0)
  real('memory_momentum', config.memory_momentum, low=0, high=1, high_open=True)
  steps = config.memory_momentum_steps
  ok = isinstance(steps, (tuple, list)) and all(
      isinstance(s, (tuple, list)) and len(s) == 2 and _integer(s[0]) and s[0] >= 0
      and _number(s[1]) and 0 <= s[1] < 1 for s in steps)
  ok = ok and all(a[0] < b[0] for a, b in zip(steps, steps[1:]))
  need(ok, 'memory_momentum_steps', '((epoch, momentum), ...) with epochs increasing and '
       'each momentum in [0, 1)')
  count('nca_chunk_size', config.nca_chunk_size, low=0)
  one_of('nca_matmul_dtype', config.nca_matmul_dtype, sorted(models.NCA_DTYPES))
  one_of('nca_kernel', config.nca_kernel, ['auto', 'pallas', 'xla'])
  one_of('nca_class_index', config.nca_class_index, ['auto', 'off', 'on'])
  count('knn.k', config.knn.k)
  real('knn.sigma', config.knn.sigma, low=0)
  count('knn.batch_size', config.knn.batch_size)
  count('log_every_steps', config.log_every_steps)
  count('checkpoint_max_to_keep', config.checkpoint_max_to_keep)
  count('stop_check_steps', config.stop_check_steps)
  return out


def check_config(config):
  """Raises ConfigError naming every bad field of `config`, in one line."""
  bad = problems(config)
  if bad:
    raise ConfigError('bad config: ' + '; '.join(bad) + ' (set them with --config.FIELD=VALUE)')
