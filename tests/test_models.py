"""Model shapes, unit-norm embeddings and parameter counts of the torchvision layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snca_jax import models


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# torchvision's parameter counts without `fc`, plus our 128-d head (in_features * 128 + 128).
@pytest.mark.parametrize('name,expected', [
    ('resnet18', 11_689_512 - 513_000 + 512 * 128 + 128),
    ('resnet50', 25_557_032 - 2_049_000 + 2048 * 128 + 128),
])
def test_parameter_count_matches_torchvision(name, expected):
  model = models.create_model(name)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  assert count(shapes['params']) == expected


@pytest.mark.parametrize('name,size,channels', [('tiny_resnet', 28, 1), ('small_resnet', 32, 3)])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_embeddings_are_unit_norm_float32(name, size, channels, dtype):
  model = models.create_model(name, low_dim=24, dtype=dtype)
  x = jax.random.normal(jax.random.key(1), (3, size, size, channels))
  variables = model.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))
  out, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert out.shape == (3, 24) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=1), 1.0, rtol=1e-5)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables['batch_stats'],
                         updates['batch_stats'])
  assert all(jax.tree.leaves(changed))


def test_cifar_resnet18_keeps_resolution_until_stage_2():
  model = models.create_model('cifar_resnet18')
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  assert variables['params']['conv1']['kernel'].shape == (3, 3, 3, 64)
  out = jax.eval_shape(lambda v: model.apply(v, x), variables)
  assert out.shape == (1, 128)


def test_unknown_model_is_a_clear_error():
  with pytest.raises(ValueError, match='unknown model'):
    models.create_model('resnet19')
