"""Weighted kNN classification against a row-sharded bank (SPEC.md, "kNN evaluation").

For each query q, the K bank rows of highest cosine similarity (dot product) vote for their
label with weight exp(sim / sigma); the class scores are the summed votes.

The search runs inside `jax.shard_map`: each device scores the queries against its own rows of
the bank and keeps its local top K; only the (Q, K) candidates of each device are gathered and
merged. No device ever holds the (Q, N) score matrix of the whole bank. Rows with a negative
label are padding and never selected.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from snca_jax import distributed
from snca_jax import mesh as mesh_lib


def top_k_neighbors(queries, bank, bank_labels, *, k, mesh):
  """The k most similar bank rows of every query: (similarities, row indices, labels), each
  (Q, k), replicated. `bank` is (N, D) and `bank_labels` (N,), sharded by rows over the mesh."""

  def per_device(q, b, l):
    sims = jnp.einsum('qd,nd->qn', q, b.astype(q.dtype), preferred_element_type=jnp.float32)
    sims = jnp.where(l[None, :] >= 0, sims, -jnp.inf)
    vals, idx = jax.lax.top_k(sims, min(k, b.shape[0]))          # this device's candidates
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


@functools.partial(jax.jit, static_argnames=('k', 'sigma', 'num_classes', 'mesh'))
def _classify_batch(queries, bank, bank_labels, *, k, sigma, num_classes, mesh):
  sims, _, labels = top_k_neighbors(queries, bank, bank_labels, k=k, mesh=mesh)
  return vote(sims, labels, sigma=sigma, num_classes=num_classes)


def knn_classify(queries, bank, bank_labels, *, k=30, sigma=0.05, num_classes, mesh=None,
                 batch_size=1024):
  """Weighted kNN class scores (Q, num_classes) as a numpy array.

  Queries are processed `batch_size` at a time, so memory stays O(batch_size x N / devices).
  `bank` and `bank_labels` may be numpy or sharded jax arrays; with no mesh given, one is made
  over all devices.
  """
  mesh = mesh_lib.make_mesh() if mesh is None else mesh
  host = lambda x: distributed.to_host(x) if isinstance(x, jax.Array) else np.asarray(x)
  pad = mesh_lib.padded_rows(bank.shape[0], mesh) - bank.shape[0]
  if pad:   # rows that do not split evenly over this mesh: pad with rows that never vote
    bank = np.concatenate([host(bank), np.zeros((pad, bank.shape[1]), bank.dtype)])
    bank_labels = np.concatenate([host(bank_labels), np.full(pad, -1, np.int32)])

  def place(x):
    if isinstance(x, jax.Array):        # a global array: resharded if it lives otherwise
      return jax.device_put(x, mesh_lib.rows(mesh))
    return distributed.put_global(x, mesh_lib.rows(mesh))

  bank, bank_labels = place(bank), place(bank_labels)
  queries = np.asarray(queries, np.float32)
  out = []
  for start in range(0, len(queries), batch_size):
    q = queries[start:start + batch_size]
    n = len(q)
    if n < batch_size and len(queries) > batch_size:   # keep one compiled shape
      q = np.concatenate([q, np.zeros((batch_size - n, q.shape[1]), q.dtype)])
    q = distributed.put_global(q, mesh_lib.replicated(mesh))
    scores = _classify_batch(q, bank, bank_labels, k=k, sigma=float(sigma),
                             num_classes=num_classes, mesh=mesh)
    out.append(distributed.to_host(scores)[:n])
  return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)


def top_k_accuracy(scores, labels, ks=(1, 5)):
  """Fraction of rows whose label is among the k highest scores, for each k (ties: lower
  class index first, as a stable descending sort)."""
  order = np.argsort(-np.asarray(scores), axis=1, kind='stable')
  labels = np.asarray(labels)[:, None]
  return {k: float(np.mean(np.any(order[:, :k] == labels, axis=1))) for k in ks}
