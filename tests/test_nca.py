"""The NCA loss, dense and streaming, against an independent float64 NumPy evaluation of
docs/METHOD.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from snca_jax import bank as bank_lib
from snca_jax import mesh as mesh_lib
from snca_jax import nca


def reference(f, idx, bank, bank_labels, temperature, margin=0.0):
  """docs/METHOD.md's formulas, literally, in float64: (loss, dloss/df)."""
  f = np.asarray(f, np.float64)
  bank = np.asarray(bank, np.float64)
  bank_labels = np.asarray(bank_labels)
  B = f.shape[0]
  present = bank_labels >= 0
  s = f @ bank.T / temperature
  shift = s.max(1, keepdims=True)      # a per-row shift: cancels in every ratio below
  e = np.exp(s - shift) * present[None, :]
  e[np.arange(B), idx] = 0.0
  y = bank_labels[idx]
  same = bank_labels[None, :] == y[:, None]
  P_ = (e * same).sum(1)
  Z = e.sum(1)
  Pm = P_ * np.exp(-margin / temperature)
  Zm = Z - P_ + Pm
  p = np.where(P_ > 0, Pm / np.where(Zm > 0, Zm, 1), 0)
  valid = p > 0
  loss = -np.sum(np.log(p[valid])) / B
  # d(-log p_i)/ds_ij = -[same]*e_ij/P_i + (same*e_ij*exp(-m/T) + diff*e_ij)/Z'_i
  w = np.where(same, e * np.exp(-margin / temperature), e) / Zm[:, None]
  w -= np.where(same, e, 0) / np.where(P_ > 0, P_, 1)[:, None]
  w *= valid[:, None]
  grad = (w @ bank) / (temperature * B)
  return loss, grad


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_problem(seed, B=16, N=200, D=32, C=5, unit_bank=True):
  rng = np.random.default_rng(seed)
  f = unit(rng.normal(size=(B, D))).astype(np.float32)
  bank = rng.normal(size=(N, D))
  bank = (unit(bank) if unit_bank else 0.3 * bank).astype(np.float32)
  labels = rng.integers(0, C, size=N).astype(np.int32)
  idx = rng.choice(N, size=B, replace=False).astype(np.int32)
  return f, idx, bank, labels


def loss_and_grad(f, idx, bank, labels, **kw):
  fn = jax.value_and_grad(lambda x: nca.nca_loss(x, idx, bank, labels, **kw))
  loss, grad = jax.jit(fn)(f)
  return float(loss), np.asarray(grad)


@pytest.mark.parametrize('margin', [0.0, 0.1])
@pytest.mark.parametrize('unit_bank', [True, False])
def test_matches_reference(margin, unit_bank):
  f, idx, bank, labels = make_problem(0, unit_bank=unit_bank)
  loss, grad = loss_and_grad(f, idx, bank, labels, temperature=0.1, margin=margin)
  ref_loss, ref_grad = reference(f, idx, bank, labels, 0.1, margin)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_margin_zero_gradient_formula():
  """docs/METHOD.md's closed form of dloss/df_i for margin 0."""
  f, idx, bank, labels = make_problem(1)
  T = 0.05
  _, grad = loss_and_grad(f, idx, bank, labels, temperature=T)
  s = f.astype(np.float64) @ bank.T.astype(np.float64) / T
  e = np.exp(s - s.max(1, keepdims=True))
  e[np.arange(len(idx)), idx] = 0
  same = labels[None, :] == labels[idx][:, None]
  Pw = np.where(same, e, 0) / np.where(same, e, 0).sum(1, keepdims=True)
  Zw = e / e.sum(1, keepdims=True)
  expected = -(1 / (len(idx) * T)) * ((Pw - Zw) @ bank)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_self_is_excluded():
  """An example whose only same-class bank row is its own contributes nothing."""
  f, idx, bank, labels = make_problem(2, C=3)
  labels = labels % 2                      # classes 0 and 1 only
  labels[idx[0]] = 2                       # example 0 is the only member of class 2
  loss, grad = loss_and_grad(f, idx, bank, labels, temperature=0.1)
  ref_loss, ref_grad = reference(f, idx, bank, labels, 0.1)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
  assert np.all(grad[0] == 0)
  # B still counts the singleton: dropping it from the batch rescales the loss by B/(B-1).
  loss_rest, _ = loss_and_grad(f[1:], idx[1:], bank, labels, temperature=0.1)
  np.testing.assert_allclose(loss * len(idx) / (len(idx) - 1), loss_rest, rtol=1e-5)


def test_own_row_does_not_count_as_positive():
  """The example's own bank row equal to its feature must not make the loss ~0."""
  f, idx, bank, labels = make_problem(3)
  bank = bank.copy()
  bank[idx] = f
  loss, _ = loss_and_grad(f, idx, bank, labels, temperature=0.05)
  ref_loss, _ = reference(f, idx, bank, labels, 0.05)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert loss > 0.1


def test_finite_at_low_temperature_and_unnormalised_bank():
  """T = 0.01 with bank rows of norm ~1.7: exp(s) would overflow float32 (s up to ~170)."""
  f, idx, bank, labels = make_problem(4, unit_bank=False)
  assert np.abs(f @ bank.T).max() / 0.01 > 89      # beyond float32's exp
  loss, grad = loss_and_grad(f, idx, bank, labels, temperature=0.01)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  ref_loss, ref_grad = reference(f, idx, bank, labels, 0.01)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-3, atol=1e-4 * np.abs(ref_grad).max())


def test_padding_rows_are_ignored():
  f, idx, bank, labels = make_problem(5)
  pad_bank = np.concatenate([bank, np.tile(f[:1], (7, 1))])   # padding that would dominate
  pad_labels = np.concatenate([labels, np.full(7, bank_lib.PAD_LABEL, np.int32)])
  a = loss_and_grad(f, idx, bank, labels, temperature=0.05)
  b = loss_and_grad(f, idx, pad_bank, pad_labels, temperature=0.05)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
  np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-5 * np.abs(a[1]).max())


def test_no_gradient_into_bank():
  f, idx, bank, labels = make_problem(6)
  g = jax.grad(lambda b: nca.nca_loss(f, idx, b, labels, temperature=0.05))(bank)
  assert np.all(np.asarray(g) == 0)


def test_sharded_bank_gives_the_same_loss():
  """The bank sharded by rows over 8 devices (N = 200 padded to 200) changes nothing."""
  f, idx, bank, labels = make_problem(7)
  mesh = mesh_lib.make_mesh()
  assert mesh.shape['data'] == 8
  sb = jax.device_put(bank, NamedSharding(mesh, P('data', None)))
  sl = jax.device_put(labels, NamedSharding(mesh, P('data')))
  a = loss_and_grad(f, idx, bank, labels, temperature=0.05)
  b = loss_and_grad(f, idx, sb, sl, temperature=0.05)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
  np.testing.assert_allclose(a[1], b[1], rtol=1e-4, atol=1e-6)


# --- the streaming, sharded kernel against the dense reference --------------------------------


def _sharded(bank, labels, num_devices):
  """The bank padded to the device count (padding label -1) and sharded by rows."""
  mesh = mesh_lib.make_mesh(jax.devices()[:num_devices])
  pad = mesh_lib.padded_rows(len(bank), mesh) - len(bank)
  bank = np.concatenate([bank, np.ones((pad, bank.shape[1]), np.float32)])
  labels = np.concatenate([labels, np.full(pad, bank_lib.PAD_LABEL, np.int32)])
  return (mesh, jax.device_put(bank, mesh_lib.row_sharding(mesh)),
          jax.device_put(labels, mesh_lib.row_sharding(mesh)))


def streaming_loss_and_grad(f, idx, mesh, bank, labels, **kw):
  fn = jax.value_and_grad(lambda x: nca.streaming_nca_loss(x, idx, bank, labels, mesh=mesh, **kw))
  loss, grad = jax.jit(fn)(f)
  return float(loss), np.asarray(grad)


@pytest.mark.parametrize('num_devices', [1, 2, 8])
@pytest.mark.parametrize('chunk_size', [7, 4096])
@pytest.mark.parametrize('margin', [0.0, 0.1])
def test_streaming_matches_dense(num_devices, chunk_size, margin):
  f, idx, bank, labels = make_problem(10, N=203, unit_bank=False)   # 203: not divisible by 2, 8
  labels[idx[0]] = 7                                                 # a singleton class
  mesh, sb, sl = _sharded(bank, labels, num_devices)
  got = streaming_loss_and_grad(f, idx, mesh, sb, sl, temperature=0.05, margin=margin,
                                chunk_size=chunk_size)
  want = loss_and_grad(f, idx, bank, labels, temperature=0.05, margin=margin)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5 * np.abs(want[1]).max())
  assert np.all(got[1][0] == 0)


@pytest.mark.parametrize('num_devices', [1, 8])
def test_streaming_is_finite_and_exact_at_low_temperature(num_devices):
  f, idx, bank, labels = make_problem(11, N=203, unit_bank=False)
  mesh, sb, sl = _sharded(bank, labels, num_devices)
  got = streaming_loss_and_grad(f, idx, mesh, sb, sl, temperature=0.01, chunk_size=16)
  ref_loss, ref_grad = reference(f, idx, bank, labels, 0.01)
  assert np.isfinite(got[0]) and np.all(np.isfinite(got[1]))
  np.testing.assert_allclose(got[0], ref_loss, rtol=1e-4)
  np.testing.assert_allclose(got[1], ref_grad, rtol=1e-3, atol=1e-4 * np.abs(ref_grad).max())


def test_streaming_bfloat16_matmuls_are_close():
  f, idx, bank, labels = make_problem(12, N=256)
  mesh, sb, sl = _sharded(bank, labels, 8)
  got = streaming_loss_and_grad(f, idx, mesh, sb, sl, temperature=0.05, chunk_size=8,
                                matmul_dtype=jnp.bfloat16)
  want = loss_and_grad(f, idx, bank, labels, temperature=0.05)
  np.testing.assert_allclose(got[0], want[0], rtol=2e-2)
  np.testing.assert_allclose(got[1], want[1], atol=3e-2 * np.abs(want[1]).max())


@pytest.mark.parametrize('num_devices', [1, 2, 8])
@pytest.mark.parametrize('chunk_size', [7, 4096])
def test_nca_step_matches_dense_loss_gradient_and_update(num_devices, chunk_size):
  """Loss and gradient against the bank BEFORE the update, and the updated bank, in one pass."""
  f, idx, bank, labels = make_problem(13, N=203, unit_bank=False)
  labels[idx[0]] = 7                                                 # a singleton class
  mesh, sb, sl = _sharded(bank, labels, num_devices)

  def fn(x):
    return nca.nca_step(x, idx, sb, sl, 0.8, temperature=0.05, margin=0.1, mesh=mesh,
                        chunk_size=chunk_size)

  (loss, new), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(f)
  want_loss, want_grad = loss_and_grad(f, idx, bank, labels, temperature=0.05, margin=0.1)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5,
                             atol=1e-5 * np.abs(want_grad).max())
  assert new.sharding.is_equivalent_to(sb.sharding, 2)
  want = np.asarray(bank_lib.update(jnp.asarray(bank), idx, f, 0.8))
  np.testing.assert_allclose(np.asarray(new)[:203], want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(new)[203:], np.asarray(sb)[203:])   # padding kept


@pytest.mark.parametrize('num_devices,dim,temperature', [(1, 32, 0.05), (8, 24, 0.01)])
def test_pallas_kernel_matches_the_reference(num_devices, dim, temperature):
  """kernel='pallas' (Pallas's interpreter on the CPU): loss and gradient against the float64
  reference and the bank update, with most rows in the kernel's tiles and the rest (rows that
  fill no whole tile per slice) through the scan; an embedding size that is no power of 2,
  a singleton class, padding rows, a low temperature."""
  from snca_jax import nca_pallas
  f, idx, bank, labels = make_problem(14, B=24, N=2403, D=dim, unit_bank=False)
  labels[idx[0]] = 7
  mesh, sb, sl = _sharded(bank, labels, num_devices)
  rows = sb.shape[0] // num_devices
  assert 0 < nca_pallas.covered_rows(24, rows) < rows

  check_step_against_the_reference(f, idx, bank, labels, mesh, sb, sl, temperature,
                                   kernel='pallas')


def check_step_against_the_reference(f, idx, bank, labels, mesh, sb, sl, temperature, **kw):
  """nca_step (margin 0.1, momentum 0.8) and streaming_nca_loss with the kernel options `kw`:
  loss and gradient against the float64 reference (example 0 in a singleton class: a zero
  gradient), and the updated bank."""
  def fn(x):
    return nca.nca_step(x, idx, sb, sl, 0.8, temperature=temperature, margin=0.1, mesh=mesh,
                        chunk_size=16, **kw)

  (loss, new), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(f)
  want_loss, want_grad = reference(f, idx, bank, labels, temperature, margin=0.1)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-3,
                             atol=1e-4 * np.abs(want_grad).max())
  assert np.all(np.asarray(grad)[0] == 0)
  want = np.asarray(bank_lib.update(jnp.asarray(bank), idx, f, 0.8))
  np.testing.assert_allclose(np.asarray(new)[:len(bank)], want, rtol=1e-6, atol=1e-7)
  loss_only = jax.jit(lambda x: nca.streaming_nca_loss(
      x, idx, sb, sl, temperature=temperature, margin=0.1, mesh=mesh, **kw))(f)
  np.testing.assert_allclose(float(loss_only), want_loss, rtol=1e-4)


def test_pallas_kernel_bfloat16_matmuls_are_close():
  f, idx, bank, labels = make_problem(15, B=16, N=1024)
  mesh, sb, sl = _sharded(bank, labels, 2)
  got = streaming_loss_and_grad(f, idx, mesh, sb, sl, temperature=0.05, kernel='pallas',
                                matmul_dtype=jnp.bfloat16)
  want = loss_and_grad(f, idx, bank, labels, temperature=0.05)
  np.testing.assert_allclose(got[0], want[0], rtol=2e-2)
  np.testing.assert_allclose(got[1], want[1], atol=3e-2 * np.abs(want[1]).max())


def test_nca_step_updates_the_donated_bank_in_place():
  """No copy of the bank in the compiled step: the update is in place (the bank is donated)."""
  f, idx, bank, labels = make_problem(15, N=40000)
  mesh, sb, sl = _sharded(bank, labels, 8)

  def step(b, x):
    (loss, b), grad = jax.value_and_grad(lambda y: nca.nca_step(
        y, idx, b, sl, 0.5, temperature=0.05, mesh=mesh, chunk_size=64), has_aux=True)(x)
    return b, loss, grad

  compiled = jax.jit(step, donate_argnums=0).lower(sb, f).compile()
  copies = [l for l in compiled.as_text().splitlines()
            if ' copy(' in l and 'f32[5000,32]' in l.split('copy(')[0]]
  assert not copies, copies
  assert compiled.memory_analysis().temp_size_in_bytes < bank.nbytes / 8 / 4   # << a shard


@pytest.mark.parametrize('streaming', [False, True])
def test_a_non_finite_feature_makes_the_loss_non_finite(streaming):
  """NaN must propagate (so training stops), not look like an example without neighbours."""
  f, idx, bank, labels = make_problem(14)
  f[3] = np.nan
  if streaming:
    mesh, sb, sl = _sharded(bank, labels, 8)
    loss = nca.streaming_nca_loss(f, idx, sb, sl, temperature=0.05, mesh=mesh)
  else:
    loss = nca.nca_loss(f, idx, bank, labels, temperature=0.05)
  assert not np.isfinite(float(loss))


# --- the class index: same-class sums read through it -----------------------------------------


@pytest.mark.parametrize('num_devices', [1, 2, 8])
@pytest.mark.parametrize('window', [3, 4096])
@pytest.mark.parametrize('temperature', [0.05, 0.01])
def test_class_index_matches_the_reference(num_devices, window, temperature, monkeypatch):
  """With a class index: loss and gradient against the float64 reference and the update, for
  classes of very different sizes (so that examples need different numbers of windows, and
  3-row windows split every class), a singleton class, padding rows, a margin, low T."""
  monkeypatch.setattr(nca, 'default_class_window', lambda *args, **kw: window)
  f, idx, bank, labels = make_problem(16, B=24, N=203, unit_bank=False)
  labels[:90] = 0                          # one large class, four small ones
  labels[idx[0]] = 7                       # a singleton class
  mesh, sb, sl = _sharded(bank, labels, num_devices)
  check_step_against_the_reference(f, idx, bank, labels, mesh, sb, sl, temperature,
                                   class_index=nca.class_index(sl, mesh))


def test_class_index_orders_each_devices_rows_by_class():
  _, _, bank, labels = make_problem(17, N=203, C=9)
  mesh, sb, sl = _sharded(bank, labels, 8)
  index = nca.class_index(sl, mesh)
  assert index.order.sharding.is_equivalent_to(sl.sharding, 1)
  rows = sl.shape[0] // 8
  all_labels = np.asarray(sl)
  for d in range(8):
    part = slice(d * rows, (d + 1) * rows)
    order, got = np.asarray(index.order)[part], np.asarray(index.labels)[part]
    np.testing.assert_array_equal(np.sort(order), np.arange(rows))     # a permutation
    np.testing.assert_array_equal(got, all_labels[part][order])
    assert np.all(np.diff(got) >= 0)
    assert all(np.all(np.diff(order[got == c]) > 0) for c in np.unique(got))  # rows ascending


def test_class_index_pays_only_with_many_classes():
  rng = np.random.default_rng(0)
  assert not nca.class_index_pays(np.arange(10_000) % 10)       # Fashion-MNIST, CIFAR-10
  assert nca.class_index_pays(np.arange(10_000) % 100)          # CIFAR-100
  assert not nca.class_index_pays(np.arange(10_000) % 40)
  labels = rng.integers(0, 1000, 10_000)
  labels[:500] = 3                                              # one class of 1/20
  assert not nca.class_index_pays(labels)
  padded = np.concatenate([np.arange(1000) % 100, np.full(5000, bank_lib.PAD_LABEL)])
  assert nca.class_index_pays(padded)                           # padding is no class


def test_pallas_kernel_with_the_class_index_matches_the_reference():
  """kernel='pallas' with a class index: the kernel folds the other-class rows alone (rows past
  its tiles through the scan), the index gives the same-class sums; against the float64
  reference, with classes of very different sizes, a singleton class and padding rows."""
  from snca_jax import nca_pallas
  f, idx, bank, labels = make_problem(18, B=24, N=2403, D=32, unit_bank=False)
  labels[:900] = 0                         # one large class beside small ones
  labels[idx[0]] = 7                       # a singleton class
  mesh, sb, sl = _sharded(bank, labels, 2)
  rows = sb.shape[0] // 2
  assert 0 < nca_pallas.covered_rows(24, rows) < rows
  check_step_against_the_reference(f, idx, bank, labels, mesh, sb, sl, 0.05, kernel='pallas',
                                   class_index=nca.class_index(sl, mesh))


def test_auto_kernel_is_pallas_on_gpus_with_bfloat16_products():
  """nca_kernel='auto' (the default): the Pallas kernel on GPUs with bfloat16 products, XLA's on
  CPUs and with float32 products; an explicit choice stands."""
  import types
  from snca_jax import schema
  from snca_jax import step
  gpu = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform='gpu')]))
  cpu = mesh_lib.make_mesh(jax.devices()[:2])
  config = schema.default_config()
  assert config.nca_kernel == 'auto'
  for dtype, on_gpu, on_cpu in (('bfloat16', 'pallas', 'xla'), ('float32', 'xla', 'xla')):
    config.nca_matmul_dtype = dtype
    assert (step.nca_kernel(config, gpu), step.nca_kernel(config, cpu)) == (on_gpu, on_cpu)
  for explicit in ('xla', 'pallas'):
    config.nca_kernel = explicit
    assert step.nca_kernel(config, gpu) == step.nca_kernel(config, cpu) == explicit
