"""Model shapes, unit-norm embeddings and parameter counts of the torchvision layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snca_jax import models


def init(model, *args, **kw):
  """model.init jitted: run op by op, each operation is compiled on its own (most of this
  file's time in a fresh clone)."""
  return jax.jit(lambda *a: model.init(*a, **kw))(*args)


def apply(model, *args, **kw):
  """model.apply jitted (as `init`)."""
  return jax.jit(lambda *a: model.apply(*a, **kw))(*args)


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
  variables = init(model, jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))
  out, updates = apply(model, variables, x, train=True, mutable=['batch_stats'])
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


def _leaves(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_pytorch_default_initialisation():
  """The original's CIFAR ResNet keeps PyTorch's defaults: conv and linear weights (and the
  linear bias) uniform in +-1/sqrt(fan_in), BatchNorm scale 1 and bias 0."""
  x = np.zeros((1, 32, 32, 3), np.float32)
  torch_like = init(models.create_model('cifar_resnet18', init='pytorch'), jax.random.key(0), x)
  default = init(models.create_model('cifar_resnet18'), jax.random.key(0), x)
  for name, w in _leaves(torch_like['params']).items():
    if name.endswith("['kernel']"):
      fan_in = int(np.prod(w.shape[:-1]))
      bound = 1 / np.sqrt(fan_in)
      assert bound * 0.9 < np.abs(w).max() <= bound * (1 + 1e-6), name
      if w.size > 10000:
        assert abs(w.std() - bound / np.sqrt(3)) < 0.02 * bound, name
    elif 'bn' in name and name.endswith("['scale']"):
      assert np.all(w == 1), name
  head_bias = torch_like['params']['head']['bias']
  assert np.abs(head_bias).max() > 0 and np.abs(head_bias).max() <= 1 / np.sqrt(512)
  conv = np.asarray(default['params']['layer2_0']['conv1']['kernel'])     # He normal, fan_out
  assert abs(conv.std() - np.sqrt(2 / (3 * 3 * 128))) < 0.05 * np.sqrt(2 / (3 * 3 * 128))


def test_batchnorm_per_device_groups():
  """bn_groups=G: statistics over each of G equal parts of the batch, as DataParallel's per-GPU
  BatchNorm; the running statistics follow the first part's."""
  x = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype(np.float32) * np.arange(
      1, 9, dtype=np.float32)[:, None, None, None]
  grouped = models.create_model('tiny_resnet', bn_groups=4)
  whole = models.create_model('tiny_resnet')
  variables = init(whole, jax.random.key(0), x[:1])
  assert jax.tree.structure(jax.eval_shape(grouped.init, jax.random.key(0), x[:1])) == (
      jax.tree.structure(variables))
  out, updates = apply(grouped, variables, x, train=True, mutable=['batch_stats'])
  for g in range(4):
    part, part_updates = apply(whole, variables, x[2 * g:2 * g + 2], train=True,
                               mutable=['batch_stats'])
    np.testing.assert_allclose(np.asarray(out[2 * g:2 * g + 2]), np.asarray(part), atol=2e-5)
    if g == 0:
      for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(part_updates)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  full, _ = apply(whole, variables, x, train=True, mutable=['batch_stats'])
  assert np.abs(np.asarray(full) - np.asarray(out)).max() > 1e-3
  np.testing.assert_allclose(np.asarray(apply(grouped, variables, x)),
                             np.asarray(apply(whole, variables, x)), atol=1e-6)


def test_batchnorm_statistics_in_the_compute_dtype_is_a_switch():
  """config.bn_float32_statistics=False sums BatchNorm's batch statistics in bfloat16 (a speed
  lever on accelerators, benchmarks/train_step.py --levers); the default sums them in float32."""
  from configs import fashion_mnist
  config = fashion_mnist.get_config()
  config.dtype = 'bfloat16'
  x = jax.random.normal(jax.random.key(0), (16, 28, 28, 1)) * 3 + 5
  out = {}
  for exact in (True, False):
    config.bn_float32_statistics = exact
    model = models.model_from_config(config)
    assert model.bn_float32_statistics is exact
    variables = init(model, jax.random.key(1), x[:2], train=False)
    out[exact], _ = apply(model, variables, x, train=True, mutable=['batch_stats'])
  assert np.all(np.isfinite(np.asarray(out[False])))
  assert not np.array_equal(np.asarray(out[True]), np.asarray(out[False]))
  np.testing.assert_allclose(np.asarray(out[True]), np.asarray(out[False]), atol=0.1)


def test_softmax_baseline_embeds_with_its_pooled_features():
  """low_dim = 0 (configs/fashion_mnist.py:softmax, the paper's baseline): no embedding layer;
  the classifier sits on the pooled features, and the embedding is those features,
  L2-normalised, as the NCA embedding is its layer's."""
  from configs import fashion_mnist
  config = fashion_mnist.get_config('softmax')
  assert config.loss == 'softmax' and config.low_dim == 0
  assert models.embedding_dim(config) == 64                      # small_resnet's last stage
  assert models.embedding_dim(fashion_mnist.get_config('softmax_embedding')) == 128
  model = models.model_from_config(config)
  x = jax.random.normal(jax.random.key(0), (6, 28, 28, 1))
  variables = init(model, jax.random.key(1), x, train=False)
  assert 'head' not in variables['params']
  assert variables['params']['classifier']['kernel'].shape == (64, 10)
  emb, state = apply(model, variables, x, train=False, mutable=['intermediates'])
  logits = state['intermediates']['logits'][0]
  np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=1), 1.0, rtol=1e-5)
  # The same backbone without the classifier gives the same embedding, and the logits are
  # the classifier applied to a positive multiple of it: the pooled features themselves.
  backbone = models.create_model(config.model, low_dim=0)
  params = {k: v for k, v in variables['params'].items() if k != 'classifier'}
  same = apply(backbone, {**variables, 'params': params}, x, train=False)
  np.testing.assert_allclose(np.asarray(same), np.asarray(emb), rtol=1e-5, atol=1e-6)
  w, b = (np.asarray(variables['params']['classifier'][k]) for k in ('kernel', 'bias'))
  centred, direction = np.asarray(logits) - b, np.asarray(emb) @ w
  scale = np.sum(centred * direction, axis=1) / np.sum(direction * direction, axis=1)
  assert np.all(scale > 0)
  np.testing.assert_allclose(centred, scale[:, None] * direction,
                             atol=1e-4 * np.abs(centred).max())


def test_a_stem_of_stride_two_runs_small_resnet_on_a_quarter_of_the_positions():
  """small_resnet_s2 (configs/fashion_mnist.py:demo) is small_resnet, parameter for parameter,
  with a stem convolution of stride 2, so every stage's maps are halved in both directions:
  about a quarter of the FLOPs that XLA counts in the forward pass."""
  x = jnp.zeros((8, 28, 28, 1))
  flops, shapes = {}, {}
  for name in ('small_resnet', 'small_resnet_s2'):
    model = models.create_model(name)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    shapes[name] = jax.tree.map(lambda a: a.shape, variables)
    cost = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x).compile().cost_analysis()
    flops[name] = (cost[0] if isinstance(cost, list) else cost)['flops']
  assert shapes['small_resnet'] == shapes['small_resnet_s2']
  assert 0.2 < flops['small_resnet_s2'] / flops['small_resnet'] < 0.3, flops
  out = models.create_model('small_resnet_s2', low_dim=24).init_with_output(
      jax.random.key(0), jax.random.normal(jax.random.key(1), (3, 28, 28, 1)))[0]
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=1), 1.0, rtol=1e-5)
