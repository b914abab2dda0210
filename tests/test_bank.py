"""The memory bank's rules: padding, initialisation, the momentum update, the chunked scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snca_jax import bank as bank_lib


def test_pad():
  bank, labels = np.ones((5, 3), np.float32), np.arange(5)
  b, l = bank_lib.pad(bank, labels, 8)
  assert b.shape == (8, 3) and not b[5:].any() and list(l) == [0, 1, 2, 3, 4, -1, -1, -1]
  assert isinstance(b, np.ndarray) and l.dtype == np.int32
  b, l = bank_lib.pad(np.ones((8, 3)), np.r_[np.arange(5), [-1] * 3], 6)
  assert b.shape == (6, 3) and list(l) == [0, 1, 2, 3, 4, -1]
  b, l = jax.jit(lambda b, l: bank_lib.pad(b, l, 8))(jnp.asarray(bank), jnp.arange(5))
  assert isinstance(b, jax.Array) and list(np.asarray(l)) == [0, 1, 2, 3, 4, -1, -1, -1]
  assert not np.asarray(b)[5:].any()


def test_update():
  rng = np.random.default_rng(8)
  bank = (0.3 * rng.normal(size=(200, 32))).astype(np.float32)
  f = rng.normal(size=(16, 32))
  f = (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)
  idx = rng.choice(200, size=16, replace=False).astype(np.int32)
  new = np.asarray(bank_lib.update(jnp.asarray(bank), idx, f, 0.5))
  expected = bank.astype(np.float64).copy()
  mixed = 0.5 * expected[idx] + 0.5 * f
  expected[idx] = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
  np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)
  untouched = np.setdiff1d(np.arange(len(bank)), idx)
  assert np.array_equal(new[untouched], bank[untouched])


def test_init():
  b = np.asarray(bank_lib.init(jax.random.key(0), 5000, 128))
  s = 1 / np.sqrt(128 / 3)
  assert b.shape == (5000, 128) and b.dtype == np.float32
  assert b.min() >= -s and b.max() <= s
  assert b.min() < -0.99 * s and b.max() > 0.99 * s       # uniform over the whole range
  assert abs(b.mean()) < 0.01


@pytest.mark.parametrize('rows,chunk', [(10, 3), (12, 4), (5, 8), (7, 1)])
def test_scan_chunks_folds_every_row_once(rows, chunk):
  """The last chunk overlaps the one before it where `chunk` does not divide the rows: each
  row is folded once (`fresh`), with its own index, and the other arrays follow it."""
  x = np.arange(rows, dtype=np.float32) * 10
  labels = np.arange(rows, dtype=np.int32)

  def fold(carry, rows_c, fresh, x_c, labels_c):
    seen, total = carry
    assert rows_c.shape == fresh.shape == x_c.shape == (min(chunk, rows),)
    ok = jnp.all(labels_c == rows_c) & jnp.all(x_c == 10 * rows_c)
    seen = seen.at[rows_c].add(fresh.astype(jnp.int32))
    return seen, total + jnp.sum(jnp.where(fresh, x_c, 0.0)) * ok

  seen, total = jax.jit(lambda x, l: bank_lib.scan_chunks(
      fold, (jnp.zeros(rows, jnp.int32), 0.0), (x, l), chunk))(x, labels)
  assert list(np.asarray(seen)) == [1] * rows
  assert float(total) == float(x.sum())
