"""Weighted kNN classification against a row-sharded bank (docs/METHOD.md, "kNN evaluation").

For each query q, the K bank rows of highest cosine similarity (dot product) vote for their
label with weight exp(sim / sigma); the class scores are the summed votes.

The search runs inside `jax.shard_map`: each device finds the top K among its own rows of the
bank (on CPUs in two passes over blocks of rows, `_blocked_top_k`; elsewhere chunk by chunk
with a running top K, `_local_top_k`); only the (Q, K) candidates of each device are gathered
and merged. No device ever holds the (Q, N) score matrix, or even its own (Q, N / d) share.
Rows with a negative label are padding and never selected.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from snca_jax import bank as bank_lib
from snca_jax import distributed
from snca_jax import mesh as mesh_lib


def _block_top_k(sims, k, block=32):
  """lax.top_k(sims, k), exactly, on a (Q, C) block of scores, but cheaper for wide C: the k
  best entries lie in at most k blocks of `block` columns, and those are among the k blocks
  with the highest maxima. So: block maxima, top-k blocks, then top-k of their k x block
  entries. XLA's CPU top-k costs grow with the width; this keeps it small."""
  q, c = sims.shape
  if c % block or c // block < k:
    return jax.lax.top_k(sims, k)
  blocks = sims.reshape(q, c // block, block)
  _, best_blocks = jax.lax.top_k(jnp.max(blocks, axis=2), k)                   # (Q, k)
  cand = jnp.take_along_axis(blocks, best_blocks[:, :, None], axis=1)          # (Q, k, block)
  cols = best_blocks[:, :, None] * block + jnp.arange(block)                   # (Q, k, block)
  vals, pick = jax.lax.top_k(cand.reshape(q, k * block), k)
  return vals, jnp.take_along_axis(cols.reshape(q, k * block), pick, axis=1)


def _local_top_k(q, bank, labels, *, k, chunk, matmul_dtype):
  """This device's k best rows for every query, walking its rows in chunks: a top-k of each
  (Q, chunk) block merged into a running (Q, k), so the (Q, rows) scores never exist."""
  k = min(k, bank.shape[0])
  q = q.astype(matmul_dtype)

  def fold(best, rows, fresh, block, block_labels):
    sims = jnp.einsum('qd,cd->qc', q, block.astype(matmul_dtype),
                      preferred_element_type=jnp.float32)
    keep = (block_labels >= 0) & fresh
    vals, idx = _block_top_k(jnp.where(keep[None, :], sims, -jnp.inf), k)
    vals = jnp.concatenate([best[0], vals], axis=1)
    idx = jnp.concatenate([best[1], idx + rows[0]], axis=1)
    vals, pick = jax.lax.top_k(vals, k)
    return vals, jnp.take_along_axis(idx, pick, axis=1)

  init = (jnp.full((q.shape[0], k), -jnp.inf), jnp.zeros((q.shape[0], k), jnp.int32))
  return bank_lib.scan_chunks(fold, init, (bank, labels), chunk)


# The blocked search (`_blocked_top_k`): bank rows in blocks of BLOCK, scored in tiles of about
# TILE_BYTES of float32 scores (in cache), selected among GROUP_BLOCKS block maxima at a time.
# On the 2-core Intel Xeon, Q = 2,048 against 1,281,167 rows (benchmarks/knn.py --block N):
# K = 30 3.09 s with blocks of 32, 3.50 s with 64; K = 200 4.57 s with 32, 5.19 s with 16,
# 5.13 s with 64.
BLOCK = 32
TILE_BYTES = 2 ** 24
GROUP_BLOCKS = 8192
# The candidate rows gathered for a tile of queries: 8 MB (K = 200: 2 queries; K = 30: 16),
# faster than 64 MB on the AMD EPYC (BENCHMARKS.md, kNN search).
RESCORE_BYTES = 2 ** 23


def _blocked_top_k(q, bank, labels, *, k, matmul_dtype):
  """This device's k best rows for every query, in two passes, exactly:
    1. every block's maximum score: the k best entries lie in at most k blocks, and those are
       among the k blocks with the highest maxima (a block's maximum is one of its entries).
       The scores are made tile by tile and reduced to block maxima while in cache; a running
       top k of blocks is kept, selected from GROUP_BLOCKS maxima at a time, so memory does
       not grow with the bank.
    2. the k best blocks' rows (and the rows after the last whole block) scored again in
       float32 whatever `matmul_dtype` (exact similarities), their top k taken.
  Rows with a negative label never count."""
  rows, dim = bank.shape
  nq = q.shape[0]
  block = BLOCK
  full = rows // block * block
  q32, q = q, q.astype(matmul_dtype)
  chunk = min(full, max(block, TILE_BYTES // (4 * nq) // block * block))
  if full // chunk * chunk < k * block:         # a group must hold at least k blocks
    chunk = block
  group = min(full // chunk, max(-(-k * block // chunk), GROUP_BLOCKS * block // chunk)) * chunk

  def block_maxima(scores_rows, scores_labels):
    sims = jnp.einsum('qd,cd->qc', q, scores_rows.astype(matmul_dtype),
                      preferred_element_type=jnp.float32)
    sims = jnp.where(scores_labels[None, :] >= 0, sims, -jnp.inf)
    return jnp.max(sims.reshape(nq, -1, block), axis=2)               # (Q, chunk / block)

  def fold(best, first, fresh, g_rows, g_labels):
    g_labels = jnp.where(fresh, g_labels, -1)             # rows of the group before: done
    maxima = jax.lax.map(lambda a: block_maxima(*a),
                         (g_rows.reshape(-1, chunk, dim), g_labels.reshape(-1, chunk)))
    maxima = jnp.moveaxis(maxima, 0, 1).reshape(nq, group // block)
    # Blocks below the k-th best maximum so far cannot enter the top k: out before the
    # selection, whose cost grows with the entries that can (BENCHMARKS.md, kNN search).
    maxima = jnp.where(maxima >= best[0][:, -1:], maxima, -jnp.inf)
    vals, ids = jax.lax.top_k(maxima, k)
    vals = jnp.concatenate([best[0], vals], axis=1)
    ids = jnp.concatenate([best[1], ids + first[0] // block], axis=1)
    vals, pick = jax.lax.top_k(vals, k)
    return vals, jnp.take_along_axis(ids, pick, axis=1)

  init = (jnp.full((nq, k), -jnp.inf), jnp.zeros((nq, k), jnp.int32))
  _, best_blocks = bank_lib.scan_chunks(fold, init, (bank, labels), group, total=full)

  tail_rows, tail_labels = bank[full:], labels[full:]
  tile = max(1, min(nq, RESCORE_BYTES // (k * block * dim * 4)))
  padded = -(-nq // tile) * tile
  # The k best blocks of each query gathered as whole (block, D) slices of the bank, in place.
  rows_of = functools.partial(
      jax.lax.gather, dimension_numbers=jax.lax.GatherDimensionNumbers(
          offset_dims=(2, 3), collapsed_slice_dims=(), start_index_map=(0,)),
      slice_sizes=(block, dim), mode=jax.lax.GatherScatterMode.CLIP)
  labels_of = functools.partial(
      jax.lax.gather, dimension_numbers=jax.lax.GatherDimensionNumbers(
          offset_dims=(2,), collapsed_slice_dims=(), start_index_map=(0,)),
      slice_sizes=(block,), mode=jax.lax.GatherScatterMode.CLIP)

  def rescore(args):
    qt, bt = args                                                      # (T, D), (T, k)
    starts = (bt * block)[:, :, None]
    cand = rows_of(bank, starts).reshape(qt.shape[0], k * block, dim)  # (T, k x block, D)
    # A matrix-vector product per query, over its k x block rows (one contraction over
    # (T, k, block, D) was slower on XLA's CPU: BENCHMARKS.md, kNN search).
    sims = jnp.einsum('tnd,td->tn', cand, qt,
                      preferred_element_type=jnp.float32)
    sims = jnp.where(labels_of(labels, starts).reshape(qt.shape[0], -1) >= 0, sims, -jnp.inf)
    ids = (starts + jnp.arange(block)).reshape(qt.shape[0], -1)
    tail = jnp.einsum('td,cd->tc', qt, tail_rows, preferred_element_type=jnp.float32)
    sims = jnp.concatenate([sims, jnp.where(tail_labels[None, :] >= 0, tail, -jnp.inf)], 1)
    ids = jnp.concatenate([ids, jnp.broadcast_to(full + jnp.arange(rows - full),
                                                 (qt.shape[0], rows - full))], 1)
    vals, pick = jax.lax.top_k(sims, k)
    return vals, jnp.take_along_axis(ids, pick, axis=1).astype(jnp.int32)

  qs = jnp.pad(q32, ((0, padded - nq), (0, 0))).reshape(-1, tile, dim)
  bs = jnp.pad(best_blocks, ((0, padded - nq), (0, 0))).reshape(-1, tile, k)
  vals, idx = jax.lax.map(rescore, (qs, bs))
  return vals.reshape(padded, k)[:nq], idx.reshape(padded, k)[:nq]


def _search(q, bank, labels, *, k, chunk, matmul_dtype, method):
  """This device's k best rows: the blocked search ('blocked'), or the chunked one
  ('chunked'); 'auto' takes the blocked one on CPUs where the device holds at least k blocks
  of rows (accelerators keep the chunked one, whose few large products suit them, until the
  blocked one is timed there)."""
  k = min(k, bank.shape[0])
  if method not in ('auto', 'blocked', 'chunked'):
    raise ValueError(f"kNN method {method!r}: use 'auto', 'blocked' or 'chunked'")
  if method == 'blocked' or (method == 'auto' and bank.shape[0] // BLOCK >= k
                             and jax.default_backend() == 'cpu'):
    return _blocked_top_k(q, bank, labels, k=k, matmul_dtype=matmul_dtype)
  return _local_top_k(q, bank, labels, k=k, chunk=chunk, matmul_dtype=matmul_dtype)


def top_k_neighbors(queries, bank, bank_labels, *, k, mesh, chunk_size=16384,
                    matmul_dtype=jnp.float32, method='auto'):
  """The k most similar bank rows of every query: (similarities, row indices, labels), each
  (Q, k), replicated. `bank` is (N, D) and `bank_labels` (N,), sharded by rows over the mesh.
  `matmul_dtype=jnp.bfloat16` scores in bfloat16 (float32 accumulation): faster, and the
  neighbours can differ where similarities nearly tie (the blocked search returns their float32
  similarities). `method`: 'blocked' (two passes over
  blocks of rows, `_blocked_top_k`), 'chunked' (a running top k over chunks, `_local_top_k`),
  or 'auto' (blocked on CPUs where a device holds at least k blocks of rows)."""

  def per_device(q, b, l):
    vals, idx = _search(q, b, l, k=k, chunk=chunk_size, matmul_dtype=matmul_dtype,
                        method=method)
    cands = (vals, idx + jax.lax.axis_index(mesh_lib.DATA) * b.shape[0], l[idx])
    vals, idx, labels = (jax.lax.all_gather(x, mesh_lib.DATA, axis=1, tiled=True)
                         for x in cands)                          # (Q, k x devices)
    vals, pick = jax.lax.top_k(vals, min(k, vals.shape[1]))      # merge
    return (vals, jnp.take_along_axis(idx, pick, axis=1),
            jnp.take_along_axis(labels, pick, axis=1))

  return jax.shard_map(per_device, mesh=mesh,
                       in_specs=(P(), P(mesh_lib.DATA), P(mesh_lib.DATA)),
                       out_specs=(P(), P(), P()), check_vma=False)(queries, bank, bank_labels)


def vote(sims, labels, *, sigma, num_classes):
  """Class scores (Q, C) from neighbours' similarities and labels, weights exp(sim / sigma).

  Weights are shifted by each query's best similarity (exp((s - s_max) / sigma)), which leaves
  the ranking of classes unchanged and cannot overflow for small sigma.
  """
  w = jnp.exp((sims - sims[:, :1]) / sigma)
  w = jnp.where(labels >= 0, w, 0.0)
  # Added into (Q, C) at each neighbour's label: Q x K additions (a one-hot product would make
  # Q x K x C products, the largest cost of K = 200 with 1,000 classes on a CPU).
  rows = jnp.broadcast_to(jnp.arange(sims.shape[0])[:, None], labels.shape)
  return jnp.zeros((sims.shape[0], num_classes), w.dtype).at[rows, jnp.maximum(labels, 0)].add(w)


@functools.partial(jax.jit, static_argnames=('k', 'sigma', 'num_classes', 'mesh',
                                             'matmul_dtype', 'method'))
def _classify_batch(queries, bank, bank_labels, *, k, sigma, num_classes, mesh, matmul_dtype,
                    method):
  sims, _, labels = top_k_neighbors(queries, bank, bank_labels, k=k, mesh=mesh,
                                    matmul_dtype=matmul_dtype, method=method)
  return vote(sims, labels, sigma=sigma, num_classes=num_classes)


def knn_classify(queries, bank, bank_labels, *, k=30, sigma=0.05, num_classes, mesh=None,
                 batch_size=1024, matmul_dtype=jnp.float32, method='auto'):
  """Weighted kNN class scores (Q, num_classes) as a numpy array.

  Queries are processed `batch_size` at a time, so memory stays O(batch_size x N / devices).
  `bank` and `bank_labels` may be numpy or sharded jax arrays; with no mesh given, one is made
  over all devices.
  """
  mesh = mesh_lib.make_mesh() if mesh is None else mesh
  bank, bank_labels = bank_lib.place(bank, bank_labels, mesh)
  queries = np.asarray(queries, np.float32)
  out = []
  for start in range(0, len(queries), batch_size):
    q = queries[start:start + batch_size]
    n = len(q)
    if n < batch_size and len(queries) > batch_size:   # keep one compiled shape
      q = np.concatenate([q, np.zeros((batch_size - n, q.shape[1]), q.dtype)])
    q = distributed.put_global(q, mesh_lib.replicated(mesh))
    scores = _classify_batch(q, bank, bank_labels, k=k, sigma=float(sigma),
                             num_classes=num_classes, mesh=mesh,
                             matmul_dtype=jnp.dtype(matmul_dtype), method=method)
    out.append(distributed.to_host(scores)[:n])
  return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)


@functools.partial(jax.jit, static_argnames=('k', 'mesh'))
def _nearest_batch(queries, bank, bank_labels, *, k, mesh):
  return top_k_neighbors(queries, bank, bank_labels, k=k, mesh=mesh)


def nearest(queries, bank, bank_labels, *, k, mesh=None):
  """(similarities, bank rows, labels), each (Q, k) numpy, of every query's k nearest rows."""
  mesh = mesh_lib.make_mesh() if mesh is None else mesh
  bank, bank_labels = bank_lib.place(bank, bank_labels, mesh)
  q = distributed.put_global(np.asarray(queries, np.float32), mesh_lib.replicated(mesh))
  out = _nearest_batch(q, bank, bank_labels, k=k, mesh=mesh)
  return tuple(distributed.to_host(x) for x in out)


def top_k_accuracy(scores, labels, ks=(1, 5)):
  """Fraction of rows whose label is among the k highest scores, for each k (ties: lower
  class index first, as a stable descending sort)."""
  order = np.argsort(-np.asarray(scores), axis=1, kind='stable')
  labels = np.asarray(labels)[:, None]
  return {k: float(np.mean(np.any(order[:, :k] == labels, axis=1))) for k in ks}
