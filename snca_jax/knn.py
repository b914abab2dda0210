"""Weighted kNN classification against a row-sharded bank (docs/METHOD.md, "kNN evaluation").

For each query q, the K bank rows of highest cosine similarity (dot product) vote for their
label with weight exp(sim / sigma); the class scores are the summed votes.

The search runs inside `jax.shard_map`: each device scores the queries against its own rows of
the bank, chunk by chunk, keeping a running top K; only the (Q, K) candidates of each device are
gathered and merged. No device ever holds the (Q, N) score matrix, or even its own (Q, N / d)
share. Rows with a negative label are padding and never selected.
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


def top_k_neighbors(queries, bank, bank_labels, *, k, mesh, chunk_size=16384,
                    matmul_dtype=jnp.float32):
  """The k most similar bank rows of every query: (similarities, row indices, labels), each
  (Q, k), replicated. `bank` is (N, D) and `bank_labels` (N,), sharded by rows over the mesh.
  `matmul_dtype=jnp.bfloat16` scores in bfloat16 (float32 accumulation): faster, and the
  neighbours can differ where similarities nearly tie."""

  def per_device(q, b, l):
    vals, idx = _local_top_k(q, b, l, k=k, chunk=chunk_size, matmul_dtype=matmul_dtype)
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
  return jnp.sum(jax.nn.one_hot(labels, num_classes) * w[..., None], axis=1)


@functools.partial(jax.jit, static_argnames=('k', 'sigma', 'num_classes', 'mesh',
                                             'matmul_dtype'))
def _classify_batch(queries, bank, bank_labels, *, k, sigma, num_classes, mesh, matmul_dtype):
  sims, _, labels = top_k_neighbors(queries, bank, bank_labels, k=k, mesh=mesh,
                                    matmul_dtype=matmul_dtype)
  return vote(sims, labels, sigma=sigma, num_classes=num_classes)


def knn_classify(queries, bank, bank_labels, *, k=30, sigma=0.05, num_classes, mesh=None,
                 batch_size=1024, matmul_dtype=jnp.float32):
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
                             matmul_dtype=jnp.dtype(matmul_dtype))
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
