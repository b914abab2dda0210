"""The one config schema: every recipe is the schema with fields overridden, and a config as an
older version stored it comes back in today's schema, its run facts apart."""

import json

from snca_jax import schema
from snca_jax import validate


def test_every_field_has_a_valid_default():
  validate.check_config(schema.default_config())


def test_an_older_checkpoints_config_is_upgraded():
  stored = json.loads(json.dumps(schema.default_config().to_dict()))     # as JSON stores it
  for field in ('model_init', 'bn_per_device', 'stop_check_steps', 'loss', 'monitor'):
    del stored[field]                       # fields added by later versions
  for field in ('reduced_decode', 'label_key', 'train_classes', 'root', 'prepared_dir'):
    del stored['data'][field]
  stored.update(model='resnet18', memory_momentum_steps=[[80, 0.8], [120, 0.9]],
                num_examples=1000, epoch_evaluated=False, old_field='kept')
  stored['data'].update(label_map=[0, 1, 0, 1, 0, 2, 0, 2, 3, 2], num_classes=4)
  config, facts = schema.upgrade(stored)
  assert facts == {'num_examples': 1000, 'epoch_evaluated': False}
  assert config.model == 'resnet18' and config.model_init == 'torchvision'
  assert config.stop_check_steps == 10 and config.loss == 'nca' and config.monitor == '1nn'
  assert config.data.reduced_decode is True and config.data.label_key == 'label'
  assert config.data.train_classes == () and config.data.label_map == (0, 1, 0, 1, 0, 2, 0, 2,
                                                                       3, 2)
  assert config.memory_momentum_steps == ((80, 0.8), (120, 0.9))
  assert config.old_field == 'kept' and 'num_examples' not in config
  validate.check_config(config)


def test_what_a_config_means():
  c = schema.default_config()
  assert not (schema.is_softmax(c) or schema.trains_on_coarse_labels(c)
              or schema.trains_on_class_subset(c))
  c.loss, c.data.label_key, c.data.train_classes = 'softmax', 'coarse_label', (0, 1)
  assert schema.is_softmax(c) and schema.trains_on_coarse_labels(c)
  assert schema.trains_on_class_subset(c)
  c.data.label_key, c.data.label_map = 'label', (0, 0, 1)
  assert schema.trains_on_coarse_labels(c)


def test_a_config_without_the_schemas_fields_is_one_clear_error():
  import pytest
  from snca_jax.errors import ConfigError
  config = schema.default_config()
  del config['stop_check_steps']
  del config.data['reduced_decode']
  with pytest.raises(ConfigError, match=r'data.reduced_decode, stop_check_steps missing: a '
                                        r'config starts from snca_jax.schema.default_config'):
    validate.check_config(config)


def test_override_reads_literals():
  """experiments.py --override FIELD=VALUE: bools, numbers and tuples as values, not strings
  cast by the old value's type (bool('False') was True, tuple('01') split characters)."""
  import pytest
  config = schema.default_config()
  for item in ('keep_best=False', 'batch_size=16', 'data.train_classes=(0, 1, 2)',
               'model=tiny_resnet', 'memory_momentum_steps=((1, 0.8),)'):
    schema.override(config, item)
  assert config.keep_best is False and config.batch_size == 16
  assert config.data.train_classes == (0, 1, 2) and config.model == 'tiny_resnet'
  assert config.memory_momentum_steps == ((1, 0.8),)
  validate.check_config(config)
  for bad in ('nonfield=3', 'data.nonfield=3', 'batch_size=abc'):
    with pytest.raises(ValueError, match='cannot be set'):
      schema.override(config, bad)
