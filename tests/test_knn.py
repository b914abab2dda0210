"""Sharded kNN against an exact dense NumPy search."""

import functools
import os

import jax
import numpy as np
import pytest

from snca_jax import cpu_select
from snca_jax import knn
from snca_jax import mesh as mesh_lib


def top_k_neighbors(*args, **kw):
  """The search jitted, as `knn_classify` and `nearest` run it (run op by op, each of its
  operations was compiled on its own: most of this file's time in a fresh clone). A new jit
  each call: the tests change the module's constants (`monkeypatch`), which a jitted function
  kept across calls would not see where the shapes and arguments repeat."""
  return jax.jit(functools.partial(knn.top_k_neighbors, **kw))(*args)


def dense_knn_scores(q, bank, labels, k, sigma, C):
  sims = q.astype(np.float64) @ bank.T.astype(np.float64)
  sims[:, labels < 0] = -np.inf
  top = np.argsort(-sims, axis=1, kind='stable')[:, :k]
  vals = np.take_along_axis(sims, top, 1)
  w = np.exp((vals - vals[:, :1]) / sigma)
  scores = np.zeros((len(q), C))
  for i in range(len(q)):
    np.add.at(scores[i], labels[top[i]], w[i])
  return scores


def problem(seed, Q=37, N=203, D=16, C=7):
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  return (unit(rng.normal(size=(Q, D))).astype(np.float32),
          unit(rng.normal(size=(N, D))).astype(np.float32),
          rng.integers(0, C, size=N).astype(np.int32), C)


@pytest.mark.parametrize('num_devices', [1, 8])
@pytest.mark.parametrize('k', [1, 30])
def test_equals_dense_search(num_devices, k):
  q, bank, labels, C = problem(0)
  mesh = mesh_lib.make_mesh(jax.devices()[:num_devices])
  n_pad = mesh_lib.padded_rows(len(bank), mesh)                 # 203 -> 208 on 8 devices
  pad = n_pad - len(bank)
  bank_p = np.concatenate([bank, np.tile(q[:1], (pad, 1))])      # padding that would win
  labels_p = np.concatenate([labels, -np.ones(pad, np.int32)])
  scores = knn.knn_classify(q, bank_p, labels_p, k=k, sigma=0.05, num_classes=C, mesh=mesh,
                            batch_size=16)
  expected = dense_knn_scores(q, bank, labels, k, 0.05, C)
  np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)


def test_small_sigma_does_not_overflow():
  q, bank, labels, C = problem(1)
  scores = knn.knn_classify(q, bank, labels, k=30, sigma=0.001, num_classes=C,
                            mesh=mesh_lib.make_mesh(jax.devices()[:8][:1]))
  assert np.all(np.isfinite(scores))
  nearest = labels[np.argmax(q @ bank.T, axis=1)]
  assert np.array_equal(np.argmax(scores, 1), nearest)   # sigma -> 0 is 1-NN


def test_top_k_accuracy():
  scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
  acc = knn.top_k_accuracy(scores, np.array([2, 0, 0]), ks=(1, 2))
  assert acc == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}


@pytest.mark.parametrize('num_devices', [1, 8])
def test_top_k_neighbors_returns_the_exact_rows(num_devices):
  q, bank, labels, _ = problem(2, N=208)
  mesh = mesh_lib.make_mesh(jax.devices()[:num_devices])
  sims, idx, lab = top_k_neighbors(
      jax.numpy.asarray(q), jax.device_put(bank, mesh_lib.row_sharding(mesh)),
      jax.device_put(labels, mesh_lib.row_sharding(mesh)), k=10, mesh=mesh)
  want = np.argsort(-(q @ bank.T), axis=1, kind='stable')[:, :10]
  assert np.array_equal(np.asarray(idx), want)
  assert np.array_equal(np.asarray(lab), labels[want])
  np.testing.assert_allclose(np.asarray(sims), np.take_along_axis(q @ bank.T, want, 1), rtol=1e-5)


@pytest.mark.parametrize('method,screen', [('native', 'none'), ('tiled', 'none'),
                                           ('blocked', 'none'), ('blocked', 'bfloat16'),
                                           ('chunked', 'none')])
def test_one_device_returns_the_neighbours_best_first(method, screen):
  """On one device no merge sorts the candidates again: every search returns its k best rows
  best first, as the vote (weights relative to the first) and `nearest` take them."""
  q, bank, labels, _ = problem(9, N=2000)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  sims, idx, _ = top_k_neighbors(
      jax.numpy.asarray(q), jax.device_put(bank, mesh_lib.row_sharding(mesh)),
      jax.device_put(labels, mesh_lib.row_sharding(mesh)), k=40, mesh=mesh, chunk_size=512,
      method=method, screen=screen)
  scores = q @ bank.T
  want = np.argsort(-scores, axis=1, kind='stable')[:, :40]
  np.testing.assert_allclose(np.asarray(sims), np.take_along_axis(scores, want, 1), rtol=0,
                             atol=1e-6)
  assert np.all(np.diff(np.asarray(sims), axis=1) <= 0)


def test_block_top_k_is_exact():
  rng = np.random.default_rng(3)
  sims = rng.normal(size=(50, 512)).astype(np.float32)
  sims[:, 100:140] = 3.0 + rng.normal(size=(50, 40)) * 1e-3    # the best all in 2 blocks
  sims[7] = np.round(sims[7])                                    # many ties
  for k in (1, 5, 16):
    vals, idx = knn._block_top_k(jax.numpy.asarray(sims), k)
    want_vals, _ = jax.lax.top_k(sims, k)
    np.testing.assert_array_equal(np.asarray(vals), np.asarray(want_vals))
    np.testing.assert_array_equal(np.take_along_axis(sims, np.asarray(idx), 1),
                                  np.asarray(vals))


@pytest.mark.parametrize('num_devices', [1, 8])
def test_chunked_search_with_block_top_k_equals_dense(num_devices):
  """Chunks of 128 rows (4 blocks of 32 >= k = 3): the block top-k path, overlapping last
  chunks and padding rows all taken."""
  q, bank, labels, _ = problem(4, Q=9, N=2003)
  mesh = mesh_lib.make_mesh(jax.devices()[:num_devices])
  pad = mesh_lib.padded_rows(len(bank), mesh) - len(bank)
  bank_p = np.concatenate([bank, np.tile(q[:1], (pad, 1))])
  labels_p = np.concatenate([labels, -np.ones(pad, np.int32)])
  _, idx, _ = top_k_neighbors(
      jax.numpy.asarray(q), jax.device_put(bank_p, mesh_lib.row_sharding(mesh)),
      jax.device_put(labels_p, mesh_lib.row_sharding(mesh)), k=3, mesh=mesh, chunk_size=128)
  want = np.argsort(-(q @ bank.T), axis=1, kind='stable')[:, :3]
  assert np.array_equal(np.asarray(idx), want)


@pytest.mark.parametrize('full,nq,keep', [
    (60000, 1024, 30), (60000, 1024, 1000), (60000, 10000, 417), (1281152, 2048, 30),
    (1281152, 2048, 2017), (35040, 7, 3)])
def test_groups_of_the_block_pass_overlap_by_less_than_a_tile_each(full, nq, keep):
  """`_block_pass`'s tiling: groups of whole tiles, at least `keep` blocks and at most
  GROUP_BLOCKS (or `keep`), and the last group's overlap with the one before (rows scored
  twice) under a tile a group. (Groups of the most tiles that fit scored 54,688 of the demo's
  60,000 rows twice.)"""
  chunk, group = knn._tiling(full, nq, keep)
  block = knn.BLOCK
  assert chunk % block == 0 and group % chunk == 0 and keep * block <= group <= full
  assert group <= max(keep * block + chunk, knn.GROUP_BLOCKS * block)
  groups = -(-full // group)
  assert 0 <= groups * group - full < groups * chunk


@pytest.mark.parametrize('k,num_devices,method,screen', [
    (1, 2, 'auto', 'none'), (30, 2, 'auto', 'none'), (200, 1, 'blocked', 'none'),
    (1000, 2, 'auto', 'none'), (30, 8, 'chunked', 'none'), (200, 1, 'blocked', 'bfloat16')])
def test_blocked_search_is_exact(monkeypatch, k, num_devices, method, screen):
  """The two-pass blocked search against brute force, K from 1 to 1,000, with its first pass
  in float32 and in bfloat16 (screened): a bank that no block, tile or group divides (the rows
  after the last whole block scored directly, the last group overlapping the one before),
  padding rows equal to a query (never returned), query tiles of the rescoring that do not
  divide the queries. (The screened search for K = 1 and 30, on one and two devices: below.)"""
  monkeypatch.setattr(knn, 'TILE_BYTES', 4 * 7 * 96)          # tiles of 96 rows
  monkeypatch.setattr(knn, 'GROUP_BLOCKS', 5)
  monkeypatch.setattr(knn, 'RESCORE_BYTES', 3 * k * knn.BLOCK * 16 * 4)   # a few queries a tile
  q, bank, labels, _ = problem(5, Q=7, N=70001, D=16)
  mesh = mesh_lib.make_mesh(jax.devices()[:num_devices])
  pad = mesh_lib.padded_rows(len(bank), mesh) - len(bank) + 40 * num_devices
  per = (len(bank) + pad) // num_devices
  block = knn.BLOCK
  assert per % block
  if per // block * block < len(bank):           # the first device's rows after its last block
    bank[per // block * block] = q[1]
  bank_p = np.concatenate([bank, np.tile(q[:1], (pad, 1))])
  labels_p = np.concatenate([labels, -np.ones(pad, np.int32)])
  sims, idx, lab = top_k_neighbors(
      jax.numpy.asarray(q), jax.device_put(bank_p, mesh_lib.row_sharding(mesh)),
      jax.device_put(labels_p, mesh_lib.row_sharding(mesh)), k=k, mesh=mesh, method=method,
      screen=screen)
  scores = q @ bank.T
  want = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  assert np.array_equal(np.asarray(idx), want)
  assert np.array_equal(np.asarray(lab), labels[want])
  np.testing.assert_allclose(np.asarray(sims), np.take_along_axis(scores, want, 1), rtol=1e-5)


@pytest.mark.parametrize('k,num_devices,method', [(1, 1, 'blocked'), (30, 1, 'blocked'),
                                                  (30, 2, 'blocked'), (1, 1, 'native'),
                                                  (30, 1, 'native'), (30, 2, 'native')])
def test_screened_search_proves_its_neighbours_or_searches_again(monkeypatch, k, num_devices,
                                                                  method):
  """The float32 search screened in bfloat16, blocked or native (`_native_screened_top_k`:
  K + K / 4 + 16 rows scored again; here the queries of 17 close rows or more searched again
  in float32), where bfloat16 cannot tell rows apart: a query
  whose best rows score 0.9 + j 1e-5 (j = 0 .. 99, within bfloat16's rounding of each other)
  in 100 different blocks, more than the screen keeps (its K best cannot be proven: searched
  again in float32); one with 60 such rows (for K = 1 also more than kept; for K = 30 on one
  device more than the blocks scored again first, fewer than kept); three with 17 (for K = 1
  more than the blocks scored again first, fewer than kept); and queries where bfloat16
  suffices. Every query's neighbours are the brute-force ones, in order. (One query a tile of
  the rescoring: each query's proof decides its own path.)"""
  monkeypatch.setattr(knn, 'RESCORE_BYTES', 1)
  rng = np.random.default_rng(7)
  n, d = 40 * 320 + 13, 32                   # 400 blocks, and 13 rows after the last one
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(rng.normal(size=(8, d)))
  bank = unit(rng.normal(size=(n, d)))       # scores about N(0, 1/32): below 0.8
  spots = rng.permutation(n // knn.BLOCK)   # a different block for every close row
  used = 0
  for i, count in enumerate((100, 60, 17, 17, 17)):
    other = unit(rng.normal(size=(count, d)))
    other = unit(other - (other @ q[i])[:, None] * q[i])          # orthogonal to the query
    a = 0.9 + 1e-5 * rng.permutation(count)
    rows = spots[used:used + count] * knn.BLOCK + rng.integers(0, knn.BLOCK, count)
    bank[rows] = a[:, None] * q[i] + np.sqrt(1 - a ** 2)[:, None] * other
    used += count
  q, bank = q.astype(np.float32), bank.astype(np.float32)
  labels = rng.integers(0, 3, n).astype(np.int32)
  mesh = mesh_lib.make_mesh(jax.devices()[:num_devices])
  pad = mesh_lib.padded_rows(n, mesh) - n
  bank_p = np.concatenate([bank, np.tile(q[:1], (pad, 1))])
  labels_p = np.concatenate([labels, -np.ones(pad, np.int32)])
  _, idx, _ = top_k_neighbors(
      jax.numpy.asarray(q), jax.device_put(bank_p, mesh_lib.row_sharding(mesh)),
      jax.device_put(labels_p, mesh_lib.row_sharding(mesh)), k=k, mesh=mesh, method=method,
      screen='bfloat16')
  scores = q.astype(np.float64) @ bank.T.astype(np.float64)
  want = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  assert np.array_equal(np.asarray(idx), want)


def test_screening_error_bounds_the_bfloat16_scores():
  """`screening_error` (with the bank's `rounding_extent`) against the scores the first pass
  makes in bfloat16: never exceeded, on rows of every scale, on padding rows it must ignore, and
  where each of its two terms is reached: queries along the rounding error of the rows that
  bfloat16 rounds most, and rows along the rounding error of queries."""
  rng = np.random.default_rng(3)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  rounded = lambda x: np.asarray(jax.numpy.asarray(x, jax.numpy.bfloat16), np.float32)
  q = (rng.normal(size=(64, 128)) * rng.uniform(0.1, 10, (64, 1))).astype(np.float32)
  bank = unit(rng.normal(size=(4096, 128))).astype(np.float32)
  worst = np.argsort(-np.linalg.norm(rounded(bank) - bank, axis=1))[:16]
  q[:16] = unit(rounded(bank[worst]) - bank[worst])               # |q~ . (r~ - r)| ~ |q~| E
  bank[:16] = unit(rounded(q[16:32]) - q[16:32])                  # |(q~ - q) . r| ~ |q~ - q| R
  bank *= rng.uniform(0.5, 1, (4096, 1)).astype(np.float32)
  bank[worst] /= np.linalg.norm(bank[worst], axis=1, keepdims=True)
  labels = np.where(np.arange(4096) % 97 == 50, -1, 1).astype(np.int32)
  bank[labels < 0] *= 1000                                         # padding: must not count
  eps = np.asarray(knn.screening_error(jax.numpy.asarray(q), *knn.rounding_extent(bank, labels)))
  approx = np.asarray(jax.numpy.einsum('qd,cd->qc', q.astype(jax.numpy.bfloat16),
                                       bank.astype(jax.numpy.bfloat16),
                                       preferred_element_type=jax.numpy.float32))
  err = np.abs(approx - q.astype(np.float64) @ bank.T.astype(np.float64))[:, labels >= 0]
  assert np.all(err.max(axis=1) <= eps)
  # and not loose beyond bfloat16's rounding of both operands (2^-8 of each, relative)
  big_r = np.linalg.norm(bank[labels >= 0], axis=1).max()
  assert np.all(eps <= 2.05 * 2.0 ** -8 * np.linalg.norm(q, axis=1) * big_r)


def test_a_database_is_counted_once(monkeypatch):
  """Its size (the rows but the padding ones) is counted where the labels live, once however
  often the evaluators ask: a sharded bank's count is a device computation and a host sync."""
  from snca_jax import bank as bank_lib
  from snca_jax.evaluators import Database
  calls = []
  count = bank_lib.database_size
  monkeypatch.setattr(bank_lib, 'database_size', lambda labels: calls.append(1) or count(labels))
  database = Database(np.zeros((5, 3), np.float32), jax.numpy.asarray([0, 1, 1, -1, -1]))
  assert database.size == 3 and database.size == 3 and len(calls) == 1


def test_bfloat16_search_returns_float32_similarities():
  """With `matmul_dtype=bfloat16` the blocked search picks its blocks from bfloat16 scores, then
  scores their rows again in float32: the similarities it returns are the float32 ones of the
  rows returned, and the rows are the brute-force ones but where scores nearly tie."""
  q, bank, labels, _ = problem(6, Q=9, N=4099, D=16)
  mesh = mesh_lib.make_mesh(jax.devices()[:2])
  bank_p, labels_p = np.concatenate([bank, bank[:1]]), np.concatenate([labels, [-1]])
  sims, idx, _ = top_k_neighbors(
      jax.numpy.asarray(q), jax.device_put(bank_p, mesh_lib.row_sharding(mesh)),
      jax.device_put(labels_p, mesh_lib.row_sharding(mesh)), k=30, mesh=mesh,
      matmul_dtype=jax.numpy.bfloat16, method='blocked')
  idx = np.asarray(idx)
  scores = q @ bank.T
  np.testing.assert_allclose(np.asarray(sims), np.take_along_axis(scores, idx, 1), rtol=1e-5,
                             atol=1e-6)
  # bfloat16's rounding moves a unit-norm similarity by under 2 x 2^-8: rows outside that
  # margin of the 30th best score are found as brute force finds them.
  kth = np.sort(scores, axis=1)[:, -30:-29]
  sure = scores > kth + 2 ** -6
  assert all(set(np.flatnonzero(s)) <= set(i) for s, i in zip(sure, idx))


def search_small_bank(k, num_devices, dtype, holes, method, screen='none'):
  """A small bank searched with `method` (and `screen`) and checked against brute force: a bank
  that no block or chunk divides, padding rows equal to a query (never returned). `holes`:
  padding rows among the others too, in more blocks than `knn.FIX_BLOCKS`, the best row of each
  query among them."""
  q, bank, labels, _ = problem(7, Q=7, N=4001, D=16)
  hole = np.zeros(len(bank), bool)
  if holes:
    hole[::50] = True
    hole[np.argmax(q @ bank.T, axis=1)] = True
    assert hole.sum() > knn.FIX_BLOCKS * num_devices
  labels = np.where(hole, -1, labels)
  mesh = mesh_lib.make_mesh(jax.devices()[:num_devices])
  pad = mesh_lib.padded_rows(len(bank), mesh) - len(bank) + 40 * num_devices
  assert ((len(bank) + pad) // num_devices) % knn.BLOCK
  bank_p = np.concatenate([bank, np.tile(q[:1], (pad, 1))])
  labels_p = np.concatenate([labels, -np.ones(pad, np.int32)])
  sims, idx, lab = top_k_neighbors(
      jax.numpy.asarray(q), jax.device_put(bank_p, mesh_lib.row_sharding(mesh)),
      jax.device_put(labels_p, mesh_lib.row_sharding(mesh)), k=k, mesh=mesh, method=method,
      matmul_dtype=jax.numpy.dtype(dtype), screen=screen)
  sims, idx = np.asarray(sims), np.asarray(idx)
  scores = np.where(hole, -np.inf, q @ bank.T)
  want = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  np.testing.assert_allclose(sims, np.take_along_axis(scores, idx, 1), rtol=1e-5, atol=1e-6)
  assert np.array_equal(np.asarray(lab), labels[idx]) and np.all(labels[idx] >= 0)
  assert all(len(set(i)) == k for i in idx)
  # Brute force's rows, in its order, but where scores lie within the products' rounding of each
  # other (NumPy's and XLA's float32 sums may round apart; bfloat16's by under 2 x 2^-8).
  margin = 1e-6 if dtype == 'float32' else 2 ** -6
  if dtype == 'float32':
    np.testing.assert_allclose(sims, np.take_along_axis(scores, want, 1), rtol=0, atol=margin)
  else:
    assert np.all(np.diff(sims, axis=1) <= 0)             # sorted again by the float32 scores
  kth = np.take_along_axis(scores, want[:, -1:], 1)
  sure = scores > kth + margin
  assert all(set(np.flatnonzero(s)) <= set(i) for s, i in zip(sure, idx))


@pytest.mark.parametrize('k,num_devices,dtype,count,holes', [
    (1, 1, 'float32', False, False), (30, 2, 'float32', False, False),
    (200, 8, 'float32', False, False), (1000, 2, 'float32', False, False),
    (30, 2, 'bfloat16', False, False), (1, 1, 'float32', True, False),
    (30, 2, 'float32', True, False), (30, 2, 'bfloat16', True, False),
    (30, 2, 'float32', False, True), (30, 1, 'float32', True, True)])
def test_tiled_search_is_exact(monkeypatch, k, num_devices, dtype, count, holes):
  """The tiled search for small banks (all of a device's scores for a few queries at a time,
  their k best blocks, then those blocks' k best entries) against brute force
  (`search_small_bank`), K from 1 to 1,000 (beyond a device's blocks: a plain top-k), tiles of
  queries that do not divide them. With bfloat16 products the similarities returned are the
  float32 ones of the rows returned, and rows beyond bfloat16's rounding of the K-th best score
  are brute force's. `count`: the best blocks found by counting (`knn.COUNT_FROM_K`), not by
  top-k, and two tiles a step (`knn.PAIRS_FROM_K`). `holes`: where the block maxima mask every
  score, not the padding blocks' alone."""
  monkeypatch.setattr(knn, 'TILE_QUERIES', 3)
  monkeypatch.setattr(knn, 'COUNT_FROM_K', 1 if count else 10 ** 9)
  monkeypatch.setattr(knn, 'PAIRS_FROM_K', 1 if count else 10 ** 9)
  search_small_bank(k, num_devices, dtype, holes, 'tiled')


@pytest.mark.parametrize('k,num_devices,dtype,holes,slots', [
    (1, 1, 'float32', False, 'few'), (30, 2, 'float32', True, 'few'),
    (200, 8, 'float32', False, 'few'), (1000, 2, 'float32', True, 'default'),
    (30, 2, 'bfloat16', True, 'default'), (200, 1, 'bfloat16', False, 'few'),
    (1, 1, 'screened', True, 'default'), (30, 2, 'screened', False, 'few'),
    (200, 8, 'screened', True, 'default'), (1000, 1, 'screened', False, 'default')])
def test_native_search_is_exact(monkeypatch, k, num_devices, dtype, holes, slots):
  """The native search (XLA's products, the selection in the CPU kernel `cpu_select.cc`) against
  brute force (`search_small_bank`), K from 1 to 1,000: tiles of queries that do not divide
  them, chunks of rows that do not divide a device's (the last overlapping the one before: its
  rows folded before left out), the reservoir compacted every few rows ('few': room for 3
  rows beyond the k best) or as it is; in float32, bfloat16, and float32 screened in bfloat16
  (`_native_screened_top_k`; at K = 1,000 every row of the device scored again)."""
  monkeypatch.setattr(knn, 'NATIVE_QUERIES', 3)
  monkeypatch.setattr(knn, 'NATIVE_TILE_BYTES', 4 * 3 * 96)           # chunks of 96 rows
  if slots == 'few':
    monkeypatch.setattr(cpu_select, 'slots', lambda k: k + 3)
  if dtype == 'screened':
    search_small_bank(k, num_devices, 'float32', holes, 'native', screen='bfloat16')
  else:
    search_small_bank(k, num_devices, dtype, holes, 'native')


def test_rescore_scores_in_float32_and_sorts_again():
  """The kernel's rescoring (`cpu_select.rescore`) of a selection made with other scores: each
  row's float32 product (rows of 131 values: no multiple of the kernel's 16 sums), sorted again
  best first from any order, equal scores to the lower row, and entries found at -inf (no row)
  kept at -inf, last (their rows in order)."""
  assert cpu_select.available()                      # built and registered
  rng = np.random.default_rng(5)
  q = rng.normal(size=(4, 131)).astype(np.float32)
  bank = rng.normal(size=(300, 131)).astype(np.float32)
  bank[7] = bank[250] = bank[40]                     # three rows of one score
  rows = np.stack([rng.permutation(300)[:20] for _ in range(4)]).astype(np.int32)
  rows[0, [3, 11, 17]] = [250, 7, 40]
  found = rng.normal(size=(4, 20)).astype(np.float32)    # any order: not the rows' scores
  found[2, [5, 6]] = -np.inf
  scores, out = (np.asarray(x) for x in jax.jit(cpu_select.rescore)(q, bank, found, rows))
  exact = np.einsum('qd,qkd->qk', q.astype(np.float64), bank[rows].astype(np.float64))
  exact[2, [5, 6]] = -np.inf
  for i in range(4):
    order = sorted(range(20), key=lambda j: (-exact[i, j], rows[i, j]))
    want = rows[i, order]
    if i == 2:
      assert list(out[i, -2:]) == sorted(rows[i, [5, 6]]) and np.all(scores[i, -2:] == -np.inf)
      want, got = want[:-2], out[i, :-2]
    else:
      got = out[i]
    finite = np.isfinite(scores[i])
    assert sorted(got) == sorted(want) and np.all(np.diff(scores[i][finite]) <= 0), i
    np.testing.assert_allclose(scores[i][finite], exact[i][order][:finite.sum()], rtol=1e-5,
                               atol=1e-4)
    of_row = dict(zip(rows[i], exact[i]))                 # each row returned with its score
    np.testing.assert_allclose(scores[i], [of_row[r] for r in out[i]], rtol=1e-5, atol=1e-4)
  assert list(out[0][np.isin(out[0], [7, 40, 250])]) == [7, 40, 250]    # ties: lower row first


@pytest.mark.parametrize('num_devices', [1, 2])
def test_native_search_breaks_ties_as_brute_force(monkeypatch, num_devices):
  """Rows of equal score rank by row, the lower first (brute force's stable order, lax.top_k's):
  small integer rows, whose products are exact, so that most scores tie, across chunks and
  compactions."""
  monkeypatch.setattr(knn, 'NATIVE_TILE_BYTES', 4 * 5 * 64)           # chunks of 64 rows
  monkeypatch.setattr(cpu_select, 'slots', lambda k: k + 5)
  rng = np.random.default_rng(4)
  q = rng.integers(-1, 2, size=(5, 8)).astype(np.float32)
  bank = rng.integers(-1, 2, size=(1000, 8)).astype(np.float32)
  labels = rng.integers(0, 3, size=1000).astype(np.int32)
  mesh = mesh_lib.make_mesh(jax.devices()[:num_devices])
  for k in (1, 30, 200):
    sims, idx, _ = top_k_neighbors(
        jax.numpy.asarray(q), jax.device_put(bank, mesh_lib.row_sharding(mesh)),
        jax.device_put(labels, mesh_lib.row_sharding(mesh)), k=k, mesh=mesh, method='native')
    scores = q @ bank.T
    want = np.argsort(-scores, axis=1, kind='stable')[:, :k]
    assert np.array_equal(np.asarray(idx), want), k
    assert np.array_equal(np.asarray(sims), np.take_along_axis(scores, want, 1)), k


SCANS = {'avx2': ('-march=x86-64-v3', '__AVX2__', '__AVX512F__'),
         'plain': ('-march=x86-64', None, '__AVX2__')}


@functools.cache
def kernel_target(scan):
  """The kernel built with the scan `scan` (`SCANS`: -march instead of the suite's native, so
  that the AVX2 and plain C++ scans, which CPUs without AVX-512 run, are tested on this one),
  registered with XLA under a name of its own."""
  import subprocess
  march, defined, undefined = SCANS[scan]
  macros = subprocess.run([os.environ.get('CXX', 'c++'), march, '-dM', '-E', '-x', 'c++', '-'],
                          input='', capture_output=True, text=True, check=True).stdout
  assert (defined is None or f'#define {defined} ' in macros) and f'{undefined} ' not in macros
  cpu_select._register(tuple(march if f == '-march=native' else f for f in cpu_select.FLAGS),
                       suffix=f'_{scan}')
  return f'{cpu_select.TARGET}_{scan}'


@pytest.mark.parametrize('scan,slots', [('native', 'few'), ('native', 'default'),
                                         ('avx2', 'few'), ('avx2', 'default'),
                                         ('plain', 'few'), ('plain', 'default')])
def test_each_scan_of_the_kernel_selects_as_brute_force(monkeypatch, scan, slots):
  """The kernel's selection (`cpu_select.fold`, `result`), built with each of its scans of the
  scores (AVX-512 where `-march=native` has it, AVX2, plain C++), against a stable sort: chunks
  of rows that 64 does not divide (score masks and a remainder), padding rows, scores tied in
  runs, -inf. 'few': K = 1, 30, 200, the reservoir compacted every few rows (room for 3; by
  nth_element, too few slots to sample). 'default': 6,000 rows, K = 1, 30, 200, 1,000, the
  reservoir as it is, cut at sampled pivots, the slots sorted by the radix sort; besides
  queries of ties and of distinct scores, one whose first sample holds the best rows and one
  whose first sample holds the worst (the pivot would keep fewer than K, or most slots: cut by
  nth_element instead)."""
  if scan == 'avx2' and ' avx2' not in cpu_select._cpu():
    pytest.skip('this CPU has no AVX2')
  if scan != 'native':
    monkeypatch.setattr(cpu_select, 'TARGET', kernel_target(scan))
  else:
    assert cpu_select.available()
  if slots == 'few':
    monkeypatch.setattr(cpu_select, 'slots', lambda k: k + 3)
  rng = np.random.default_rng(7)
  n, chunk = (1000, 97) if slots == 'few' else (6000, 997)
  scores = rng.integers(-40, 40, size=(8, n)).astype(np.float32) / 8    # runs of ties
  scores[3:] = rng.normal(size=(5, n))
  scores[1, 300:700] = -np.inf
  labels = rng.integers(0, 5, size=n).astype(np.int32)
  labels[rng.choice(np.arange(n // 3, n), 150, replace=False)] = -1      # padding rows
  for k in (1, 30, 200) if slots == 'few' else (1, 30, 200, 1000):
    m = cpu_select.slots(k)
    if slots == 'default':          # the slots sampled at the first cut: the first m rows'
      sampled = np.arange(128) * m // 128                                # (none is padding)
      scores[6:] = rng.normal(size=(2, n))
      scores[6, sampled] += 10
      scores[7, sampled] -= 10
    want_scores = np.where(labels >= 0, scores, -np.inf)

    def select(scores, labels):
      state = cpu_select.init(scores.shape[0], k)
      for start in range(0, n, chunk):
        end = min(start + chunk, n)
        state = cpu_select.fold(state, scores[:, start:end], labels[start:end],
                                np.int32(start), end == n, k=k)
      return cpu_select.result(state, k)
    got_scores, got_rows = (np.asarray(x) for x in jax.jit(select)(scores, labels))
    want = np.argsort(-want_scores, axis=1, kind='stable')[:, :k]
    assert np.array_equal(got_rows, want), (scan, k)
    assert np.array_equal(got_scores, np.take_along_axis(want_scores, want, 1)), (scan, k)


def test_kth_largest_key_and_first_true():
  """The selection by counting against NumPy: a key with exactly k keys at or above it, or
  with ties at the k-th largest value at least k, none of them below that value; on rows of
  negative and positive scores, -inf padding and ties; then the first k such columns."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(6, 50)).astype(np.float32)
  x[1, 10:] = -np.inf                                  # 10 finite entries
  x[2, :] = 0.5                                        # all tied
  x[3, ::2] = x[3, 1]                                  # 25 tied, among others
  x[4] = -np.abs(x[4])                                 # all negative
  x[5, 0] = np.float32(-0.0)
  keys = knn._order_keys(jax.numpy.asarray(x))
  assert np.array_equal(np.asarray(knn._order_keys(keys)), x)            # its own inverse
  kk = np.asarray(keys)
  assert np.all((kk[:, :, None] < kk[:, None, :]) == (x[:, :, None] < x[:, None, :]))  # order
  for k in (1, 7, 10, 26, 50):
    kth = np.asarray(knn._kth_largest_key(keys, k))
    above = np.asarray(keys) >= kth[:, None]
    count = above.sum(1)
    kth_value = -np.sort(-x, axis=1)[:, k - 1]
    ties = (x == kth_value[:, None]).sum(1) > 1
    assert np.all(count >= k) and np.all((count == k) | ties), (k, count)
    # nothing below the k-th largest value is counted
    assert np.all(x[above] >= np.repeat(kth_value, count)), k
    cols = np.asarray(knn._first_true(jax.numpy.asarray(above), k))
    assert np.array_equal(cols, np.stack([np.flatnonzero(a)[:k] for a in above])), k


@pytest.mark.parametrize('native', [True, False])
def test_auto_takes_the_native_search_screened_where_few_rows_are_scored_again(monkeypatch,
                                                                                native):
  """On a CPU, 'auto' searches a device's rows with the native search where its kernel is built,
  in float32 screened in bfloat16 where the rows scored again (`knn.NATIVE_SCREEN_K`) are at
  most a `knn.NATIVE_SCREEN_SHARE`-th of them (ImageNet's bank at any K, the demo's 60,000
  rows up to K = 200, not 1,000); where the kernel cannot be built, with the tiled search where
  they are at most 65,536 and would not be screened, else with the blocked one."""
  from snca_jax import hardware
  monkeypatch.setattr(hardware, 'bfloat16_in_hardware', lambda: True)
  monkeypatch.setattr(cpu_select, 'available', lambda: native)
  calls = []
  for name in ('_native_screened_top_k', '_native_top_k', '_tiled_top_k', '_blocked_top_k'):
    monkeypatch.setattr(knn, name, lambda *a, _f=getattr(knn, name), _n=name, **kw:
                        calls.append(_n) or _f(*a, **kw))
  screened = '_native_screened_top_k'
  for rows, k, dtype, want, fallback in (
      (60_000, 30, 'float32', screened, '_tiled_top_k'),
      (60_000, 200, 'float32', screened, '_tiled_top_k'),
      (60_000, 1000, 'float32', '_native_top_k', '_tiled_top_k'),
      (60_000, 200, 'bfloat16', '_native_top_k', '_tiled_top_k'),
      (65_536, 1, 'float32', screened, '_blocked_top_k'),
      (65_537, 30, 'float32', screened, '_blocked_top_k'),
      (1_281_167, 30, 'float32', screened, '_blocked_top_k'),
      (1_281_167, 1000, 'float32', screened, '_blocked_top_k')):
    calls.clear()
    jax.eval_shape(lambda q, b, l: knn._search(
        q, b, l, k=k, chunk=16384, matmul_dtype=jax.numpy.dtype(dtype), method='auto',
        screen='auto'), jax.ShapeDtypeStruct((8, 16), np.float32),
        jax.ShapeDtypeStruct((rows, 16), np.float32), jax.ShapeDtypeStruct((rows,), np.int32))
    assert calls[:1] == [want if native else fallback], (rows, k, dtype, calls)
  if not native:
    with pytest.raises(ValueError, match="'native' runs on the CPU"):
      jax.eval_shape(lambda q, b, l: knn._search(
          q, b, l, k=1, chunk=16384, matmul_dtype=np.float32, method='native', screen='auto'),
          *(jax.ShapeDtypeStruct(s, t) for s, t in (((8, 16), np.float32),
                                                    ((64, 16), np.float32), ((64,), np.int32))))


@pytest.mark.parametrize('method', ['tiled', 'native'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_search_with_fewer_rows_than_k(dtype, method):
  """Where a device holds fewer labelled rows than K, the search returns each labelled row
  once, with its float32 similarity, and the rest -inf. The case that reached the tiled
  search's columns past the rows (its scores are padded to whole blocks): 97 rows, the best in
  the last block, which holds that row alone; a column past it, picked as a -inf entry, was the
  last row again, and scored again in float32 it counted that row twice."""
  q, bank, labels, _ = problem(8, Q=5, N=97, D=16)
  labels = -np.ones(97, np.int32)
  labels[[0, 96]] = [3, 5]
  bank[96] = q[0]                                  # the best row of every query near q[0]
  q = np.concatenate([q[:1], q[:1] + 0.01 * q[1:]]).astype(np.float32)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  sims, idx, lab = top_k_neighbors(
      jax.numpy.asarray(q), jax.device_put(bank, mesh_lib.row_sharding(mesh)),
      jax.device_put(labels, mesh_lib.row_sharding(mesh)), k=3, mesh=mesh, method=method,
      matmul_dtype=jax.numpy.dtype(dtype))
  sims, idx = np.asarray(sims), np.asarray(idx)
  assert np.array_equal(idx[:, 0], np.full(5, 96)) and idx.max() < 97     # rows of the bank
  assert np.array_equal(np.isfinite(sims), np.tile([True, True, False], (5, 1))), sims
  assert all(sorted(i[:2]) == [0, 96] for i in idx)
  np.testing.assert_allclose(sims[:, :2], np.take_along_axis(q @ bank.T, idx[:, :2], 1),
                             rtol=1e-5, atol=1e-6)


def test_selection_kernel_is_built_once_or_says_why_not(monkeypatch, tmp_path, capsys):
  """`cpu_select` compiles its kernel into the cache once (a second call finds it, and leaves no
  temporary file); without a compiler (saying why on stderr), or turned off, it is not
  available, and the search keeps XLA's top-k."""
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  monkeypatch.setenv('CXX', 'no-such-compiler')
  with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-compiler'"):
    cpu_select._build()
  assert cpu_select.available.__wrapped__() is False
  assert 'could not be built (no C++ compiler' in capsys.readouterr().err
  monkeypatch.setenv('SNCA_JAX_CPU_SELECT', '0')
  assert cpu_select.available.__wrapped__() is False
  monkeypatch.delenv('CXX')
  path = cpu_select._build()
  built = os.stat(path).st_mtime_ns
  assert cpu_select._build() == path and os.stat(path).st_mtime_ns == built
  assert os.listdir(tmp_path / 'snca_jax') == [os.path.basename(path)]
