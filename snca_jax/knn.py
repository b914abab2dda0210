"""Weighted kNN classification against a row-sharded bank (docs/METHOD.md, "kNN evaluation").

For each query q, the K bank rows of highest cosine similarity (dot product) vote for their
label with weight exp(sim / sigma); the class scores are the summed votes.

The search runs inside `jax.shard_map`: each device finds the top K among its own rows of the
bank (on CPUs XLA's products of a tile of queries and a chunk of rows at a time, each tile's
scores folded into every query's running selection by a CPU kernel, `_native_top_k` and
`cpu_select`, or for large banks and small K two passes over blocks of rows, the first in
bfloat16 with a proof, `_blocked_top_k`; where the kernel cannot be built, the tiled search for
few rows, `_tiled_top_k`; elsewhere chunk by chunk with a running top K, `_local_top_k`); only
the (Q, K) candidates of each device are gathered and merged. No device ever holds the (Q, N)
score matrix, or even its own (Q, N / d) share.
Rows with a negative label are padding and never selected.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from snca_jax import bank as bank_lib
from snca_jax import cpu_select
from snca_jax import distributed
from snca_jax import hardware
from snca_jax import mesh as mesh_lib


def _block_top_k(sims, k, block=32):
  """lax.top_k(sims, k), exactly, on a (Q, C) block of scores, but cheaper for wide C: block
  maxima, then `_best_entries`. XLA's CPU top-k costs grow with the width; this keeps it
  small."""
  q, c = sims.shape
  if c % block:
    return jax.lax.top_k(sims, k)
  blocks = sims.reshape(q, c // block, block)
  return _best_entries(blocks, jnp.max(blocks, axis=2), k, count=False)


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
# The exact float32 blocked search (where the native search's kernel cannot be built) screens
# the bank in bfloat16 where the CPU multiplies bfloat16 in hardware (`screen='auto'`): the
# blocks whose bfloat16 maximum could hide one of the K best float32 scores are scored again
# (`_screened_top_k`). It keeps SCREEN_BLOCKS(K) blocks; the first SCREEN_FIRST(K) are scored
# again for every query, the rest for the query tiles that cannot yet prove their K best;
# queries that cannot prove them with all SCREEN_BLOCKS(K) are searched again in float32,
# FALLBACK_SHARE of the queries at a time (as the native search's screen does too).
SCREEN_FIRST = lambda k: k + k // 4 + 8
SCREEN_BLOCKS = lambda k: 2 * k + 16
FALLBACK_SHARE = 8
# 'auto' screens where the rows scored again are at most a SCREEN_MIN_SHARE-th of the device's:
# on the AMD EPYC, the demo's 60,000 rows of embeddings, 10,000 queries, screened / not: K = 30
# (a 25th scored again) 2.40 / 2.60 s, K = 200 (a 5th) 6.79 / 5.58 s (BENCHMARKS.md; the
# screen's first version, which measured the bank's rounding in a pass of its own).
SCREEN_MIN_SHARE = 32


def _tiling(full, nq, keep):
  """(rows a tile, rows a group) of `_block_pass` over `full` rows for `nq` queries: tiles of
  about TILE_BYTES of scores; groups of at most GROUP_BLOCKS blocks (and at least `keep`),
  as many as that makes, each as small as that allows: the last group overlaps the one before
  (`bank.scan_chunks`), whose rows it scores again, by less than a tile a group. (Groups of
  the most tiles that fit scored 54,688 of the demo's 60,000 rows twice.)"""
  block = BLOCK
  chunk = min(full, max(block, TILE_BYTES // (4 * nq) // block * block))
  if full // chunk * chunk < keep * block:      # a group must hold at least `keep` blocks
    chunk = block
  least = -(-keep * block // chunk)
  most = min(full // chunk, max(least, GROUP_BLOCKS * block // chunk))
  groups = -(-full // (most * chunk))
  return chunk, min(most, max(least, -(-full // (groups * chunk)))) * chunk


def _block_pass(q, bank, labels, *, keep, matmul_dtype, full, measure=False):
  """The `keep` blocks of highest maximum score of every query, among the first `full` rows
  (a multiple of BLOCK): (maxima (Q, keep), descending; block numbers (Q, keep)). The scores
  are made tile by tile and reduced to block maxima while in cache; a running selection is
  kept, made from GROUP_BLOCKS maxima at a time, so memory does not grow with the bank. Rows
  with a negative label never count; where fewer than `keep` blocks hold a row, the last
  maxima are -inf. `measure`: also `rounding_extent` of those rows, from the same tiles."""
  dim = bank.shape[1]
  nq = q.shape[0]
  block = BLOCK
  q = q.astype(matmul_dtype)
  chunk, group = _tiling(full, nq, keep)

  def block_maxima(scores_rows, scores_labels):
    sims = jnp.einsum('qd,cd->qc', q, scores_rows.astype(matmul_dtype),
                      preferred_element_type=jnp.float32)
    sims = jnp.where(scores_labels[None, :] >= 0, sims, -jnp.inf)
    maxima = jnp.max(sims.reshape(nq, -1, block), axis=2)             # (Q, chunk / block)
    return maxima, (rounding_extent(scores_rows, scores_labels) if measure else ())

  def fold(carry, first, fresh, g_rows, g_labels):
    best, extent = carry
    g_labels = jnp.where(fresh, g_labels, -1)             # rows of the group before: done
    maxima, tiles_extent = jax.lax.map(
        lambda a: block_maxima(*a), (g_rows.reshape(-1, chunk, dim), g_labels.reshape(-1, chunk)))
    extent = jax.tree.map(lambda a, b: jnp.maximum(a, jnp.max(b)), extent, tiles_extent)
    maxima = jnp.moveaxis(maxima, 0, 1).reshape(nq, group // block)
    # Blocks below the last kept maximum so far cannot be kept: out before the selection,
    # whose cost grows with the entries that can enter it (BENCHMARKS.md, kNN search). (The
    # last of the sorted maxima taken as their minimum: in `_screened_top_k`, a slice of
    # top_k's output made XLA's CPU rescoring 4x slower.)
    maxima = jnp.where(maxima >= jnp.min(best[0], axis=1, keepdims=True), maxima, -jnp.inf)
    vals, ids = jax.lax.top_k(maxima, keep)
    vals = jnp.concatenate([best[0], vals], axis=1)
    ids = jnp.concatenate([best[1], ids + first[0] // block], axis=1)
    vals, pick = jax.lax.top_k(vals, keep)
    return (vals, jnp.take_along_axis(ids, pick, axis=1)), extent

  init = (jnp.full((nq, keep), -jnp.inf), jnp.zeros((nq, keep), jnp.int32))
  best, extent = bank_lib.scan_chunks(fold, (init, (0.0, 0.0) if measure else ()),
                                      (bank, labels), group, total=full)
  return best + ((extent,) if measure else ())


# The blocks of a few queries gathered as whole (BLOCK, D) slices of the bank, in place.
def _rows_of(bank, starts):
  return jax.lax.gather(
      bank, starts, dimension_numbers=jax.lax.GatherDimensionNumbers(
          offset_dims=(2, 3), collapsed_slice_dims=(), start_index_map=(0,)),
      slice_sizes=(BLOCK, bank.shape[1]), mode=jax.lax.GatherScatterMode.CLIP)


def _labels_of(labels, starts):
  return jax.lax.gather(
      labels, starts, dimension_numbers=jax.lax.GatherDimensionNumbers(
          offset_dims=(2,), collapsed_slice_dims=(), start_index_map=(0,)),
      slice_sizes=(BLOCK,), mode=jax.lax.GatherScatterMode.CLIP)


def _score_blocks(qt, bank, labels, blocks):
  """Float32 scores (T, n x BLOCK) and row numbers of the rows of `blocks` (T, n) for the
  queries `qt` (T, D); rows with a negative label score -inf."""
  starts = (blocks * BLOCK)[:, :, None]
  cand = _rows_of(bank, starts).reshape(qt.shape[0], -1, bank.shape[1])   # (T, n x block, D)
  # A matrix-vector product per query, over its n x block rows (one contraction over
  # (T, n, block, D) was slower on XLA's CPU: BENCHMARKS.md, kNN search).
  sims = jnp.einsum('tnd,td->tn', cand, qt, preferred_element_type=jnp.float32)
  sims = jnp.where(_labels_of(labels, starts).reshape(qt.shape[0], -1) >= 0, sims, -jnp.inf)
  return sims, (starts + jnp.arange(BLOCK)).reshape(qt.shape[0], -1)


def _top(k, *pairs):
  """The k best (scores, row numbers) of the concatenated (T, n) pairs."""
  sims = jnp.concatenate([s for s, _ in pairs], axis=1)
  ids = jnp.concatenate([i for _, i in pairs], axis=1)
  vals, pick = jax.lax.top_k(sims, k)
  return vals, jnp.take_along_axis(ids, pick, axis=1).astype(jnp.int32)


def _tail(qt, bank, labels, full):
  """Float32 scores and row numbers of the rows after the last whole block."""
  rows = bank.shape[0]
  sims = jnp.einsum('td,cd->tc', qt, bank[full:], preferred_element_type=jnp.float32)
  sims = jnp.where(labels[None, full:] >= 0, sims, -jnp.inf)
  return sims, jnp.broadcast_to(full + jnp.arange(rows - full), (qt.shape[0], rows - full))


def _by_query_tiles(fn, n_blocks, *arrays):
  """`fn` over tiles of queries (the leading axis of `arrays`), as many a tile as gather
  RESCORE_BYTES of candidate rows for `n_blocks` blocks each; the results' leading axis is the
  queries again."""
  nq, dim = arrays[0].shape[0], arrays[0].shape[1]
  tile = max(1, min(nq, RESCORE_BYTES // (n_blocks * BLOCK * dim * 4)))
  padded = -(-nq // tile) * tile
  tiles = [jnp.pad(a, [(0, padded - nq)] + [(0, 0)] * (a.ndim - 1)).reshape(
      (-1, tile) + a.shape[1:]) for a in arrays]
  out = jax.lax.map(lambda t: fn(*t), tiles)
  return jax.tree.map(lambda x: x.reshape((padded,) + x.shape[2:])[:nq], out)


def _plain_top_k(q, bank, labels, *, k, matmul_dtype):
  """This device's k best rows for every query, in two passes, exact where `matmul_dtype` is
  float32 but for rows within the first pass's float32 rounding of the k-th best score (its
  products summed in another order than the second pass's: about 1e-7 for unit rows):
    1. every block's maximum score (`_block_pass`): the k best entries lie in at most k blocks,
       and those are among the k blocks with the highest maxima (a block's maximum is one of
       its entries).
    2. the k best blocks' rows (and the rows after the last whole block) scored again in
       float32 whatever `matmul_dtype` (exact similarities), their top k taken."""
  full = bank.shape[0] // BLOCK * BLOCK
  _, best_blocks = _block_pass(q, bank, labels, keep=k, matmul_dtype=matmul_dtype, full=full)
  return _by_query_tiles(
      lambda qt, bt: _top(k, _score_blocks(qt, bank, labels, bt), _tail(qt, bank, labels, full)),
      k, q, best_blocks)


def rounding_extent(rows, labels):
  """(E, R): the largest |r~ - r| and |r| over the rows r with a label >= 0 (r~: r rounded to
  bfloat16), for `screening_error`."""
  rows = jnp.where(labels[:, None] >= 0, rows, 0.0)
  rounded = rows.astype(jnp.bfloat16).astype(jnp.float32)
  return (jnp.sqrt(jnp.max(jnp.sum(jnp.square(rounded - rows), axis=1))),
          jnp.sqrt(jnp.max(jnp.sum(jnp.square(rows), axis=1))))


def screening_error(q, big_e, big_r):
  """A bound (Q,) on |bfloat16 score - float32 score| of each query against every row of a
  bank, for scores made as `_block_pass` makes them in bfloat16 (operands rounded to bfloat16,
  products summed in float32). With q~, r~ the rounded vectors:
      |q~ . r~ - q . r| <= |q~ . (r~ - r)| + |(q~ - q) . r| <= |q~| E + |q~ - q| R
  (Cauchy-Schwarz), E and R the largest |r~ - r| and |r| over the rows (`rounding_extent`,
  measured by the pass that screens them); the float32 sum of D exact products adds at most
  D u |q~| |r~| (u = 2^-24), and the float32 score the row would get when scored again differs
  from q . r by as much again (both bounded here by 4 (D + 2) u |q~| |r~|, for any order of
  summation and for hardware that truncates); flushing subnormal operands or products to zero
  adds at most D 2^-126 |q~| (2^-100 here)."""
  q_r = q.astype(jnp.bfloat16).astype(jnp.float32)
  q_norm = jnp.linalg.norm(q_r, axis=1)
  q_err = jnp.linalg.norm(q_r - q, axis=1)
  accumulation = 8 * (q.shape[1] + 2) * 2.0 ** -24 * q_norm * big_r * (1 + 2.0 ** -7)
  # Each term rounded up a little: the bound's own float32 arithmetic must not undercut it.
  return (q_norm * big_e + q_err * big_r + accumulation) * (1 + 2.0 ** -16) + 2.0 ** -100


def _screened_top_k(q, bank, labels, *, k):
  """This device's k best rows for every query by float32 score, exactly, screening the bank
  in bfloat16 (half the float32 search's time on CPUs that multiply bfloat16 in hardware):
    1. the SCREEN_BLOCKS(k) blocks of highest bfloat16 maximum (`_block_pass`), and the
       maximum of the next block, m;
    2. the first SCREEN_FIRST(k) of them scored again in float32, with the rows after the
       last whole block. No row of a block not scored again can score above its bfloat16
       maximum + eps (`screening_error`), which is at most m + eps; so where the k-th best
       float32 score found exceeds that, the k found are the k best. Query tiles where one
       query cannot prove it score the remaining blocks too, and compare with the maximum
       after the last of them;
    3. the queries still without a proof searched again with float32 scores
       (`_plain_top_k`), a FALLBACK_SHARE-th of the queries at a time."""
  full = bank.shape[0] // BLOCK * BLOCK
  first, keep = SCREEN_FIRST(k), SCREEN_BLOCKS(k)
  # The rows' rounding measured from the tiles the pass reads anyway, not in a pass of its own
  # over the bank for every batch of queries.
  maxima, blocks, extent = _block_pass(q, bank, labels, keep=keep + 1,
                                       matmul_dtype=jnp.bfloat16, full=full, measure=True)
  eps = screening_error(q, *extent)

  def proven(vals, m, e):
    kth = jnp.min(vals, axis=1)        # the k-th best: not vals[:, -1] (4x slower on XLA's CPU)
    return (jnp.nextafter(m + e, jnp.inf) < kth) | (m == -jnp.inf)     # the sum rounded up

  def rescore(qt, bt, mt, et):
    found = _top(k, _score_blocks(qt, bank, labels, bt[:, :first]), _tail(qt, bank, labels, full))
    ok = proven(found[0], mt[:, first], et)

    def more():
      out = _top(k, found, _score_blocks(qt, bank, labels, bt[:, first:keep]))
      return out + (proven(out[0], mt[:, keep], et),)
    return jax.lax.cond(jnp.all(ok), lambda: found + (ok,), more)

  vals, idx, ok = _by_query_tiles(rescore, first, q, blocks, maxima, eps)
  return _search_again(
      q, vals, idx, ok, lambda qs: _plain_top_k(qs, bank, labels, k=k, matmul_dtype=jnp.float32))


def _search_again(q, vals, idx, ok, search):
  """`vals`, `idx` (Q, k) with the queries where `ok` is False replaced by `search(queries)`'s
  (values, rows), a FALLBACK_SHARE-th of the queries at a time, only as many times as needed."""
  nq = q.shape[0]
  share = max(1, -(-nq // FALLBACK_SHARE))
  order = jnp.argsort(ok, stable=True)                         # the unproven queries first
  order = jnp.pad(order, (0, -(-nq // share) * share - nq), mode='edge')

  def again(state):
    vals, idx, start = state
    pick = jax.lax.dynamic_slice_in_dim(order, start, share)
    v, i = search(q[pick])
    return vals.at[pick].set(v), idx.at[pick].set(i), start + share

  unproven = jnp.sum(~ok)
  vals, idx, _ = jax.lax.while_loop(lambda s: s[2] < unproven, again, (vals, idx, 0))
  return vals, idx


# Small banks: TILE_QUERIES queries at a time score all of a device's rows, where that is at most
# TILE_BYTES of scores (65,536 rows), and select from those scores while in cache
# (`_tiled_top_k`): no row is scored twice. On the demo's 60,000 rows of embeddings (one device,
# 2-core AMD EPYC; benchmarks/knn.py --tile_queries N), K = 30 / 200: 32 queries a tile 1.80 /
# 2.64 s, 64 1.36 / 2.54 s, 128 1.53 / 4.21 s.
TILE_QUERIES = 64


# From this k up the tiled search finds its k best blocks by counting (`_kth_largest_key`), not
# by XLA's CPU top-k, whose partial sort grows with k. The demo's embeddings, one device, 2-core
# AMD EPYC, seconds by top-k / by counting (benchmarks/knn.py --count_from_k, a run each): K =
# 100 1.54 / 1.51; K = 200 1.91 / 2.02, 2.08 / 1.75, 2.00 / 2.16 (x faiss in the same runs 0.64 /
# 0.81, 0.59 / 0.68, 0.63 / 0.65: level within this machine's noise); K = 1,000 5.72 / 4.76.
COUNT_FROM_K = 100

# The tiled search's block maxima leave padding rows out by masking every score, unless at most
# FIX_BLOCKS blocks hold one (padding at the end of the rows): then those blocks alone. The
# demo's bank, K = 30, one device, 2-core AMD EPYC: 1.17-1.26 s where masking all took 1.34-1.38
# (BENCHMARKS.md, kNN search).
FIX_BLOCKS = 8

# From this k up the tiled search takes two tiles of queries a step, whose selections (XLA's CPU
# top-k, on one thread) can then run beside the other's work: the demo's bank, K = 1,000, one
# device, 2-core AMD EPYC, 3.32-3.73 s where a tile a step took 3.88-4.02 (BENCHMARKS.md); below
# K = 500 slower.
PAIRS_FROM_K = 500


def _order_keys(x):
  """int32 keys in the order of the float32 `x` (-inf lowest), and back (the map is its own
  inverse)."""
  if x.dtype == jnp.float32:
    i = jax.lax.bitcast_convert_type(x, jnp.int32)
    return i ^ ((i >> 31) & 0x7fffffff)
  return jax.lax.bitcast_convert_type(x ^ ((x >> 31) & 0x7fffffff), jnp.float32)


def _kth_largest_key(keys, k):
  """Per row of the (T, n) int32 `keys`, a key t with at least k keys >= t and, ties apart,
  exactly k: bisection on the count of keys above it, every row's count in one vectorised pass
  a step, stopping where every row's count is k or its range one key wide."""
  lo, hi = jnp.min(keys, axis=1), jnp.max(keys, axis=1) + 1

  def open_(lo, hi, count):
    return ((hi - lo > 1) | ((lo < 0) & (hi > 0))) & (count != k)   # hi - lo may overflow

  def step(state):
    lo, hi, count = state
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)                     # no overflow
    c = jnp.sum(keys >= mid[:, None], axis=1, dtype=jnp.int32)
    up = open_(lo, hi, count) & (c >= k)
    down = open_(lo, hi, count) & (c < k)
    return jnp.where(up, mid, lo), jnp.where(down, mid, hi), jnp.where(up, c, count)

  count = jnp.full(lo.shape, keys.shape[1] + 1, jnp.int32)
  lo, _, _ = jax.lax.while_loop(lambda s: jnp.any(open_(*s)), step, (lo, hi, count))
  return lo


def _first_true(mask, k):
  """The column numbers of the first k True entries of each row of `mask` (each has k)."""
  ends = jnp.cumsum(mask, axis=1, dtype=jnp.int32)
  return jax.vmap(lambda e: jnp.searchsorted(e, jnp.arange(1, k + 1), side='left'))(ends)


def _best_entries(blocks, maxima, k, *, count, valid=None):
  """The k best entries of the (Q, n, B) scores `blocks`, exactly, from their block maxima
  (Q, n): (values (Q, k), best first; columns (Q, k) of the scores as (Q, n x B)). The k best
  entries lie in at most k blocks, and those are among the k blocks with the highest maxima (a
  block's maximum is one of its entries): so those k blocks (by top-k, or with `count` by
  counting: the first k, by column, with a maximum at or above the k-th), then the k best of
  their entries, those below the k-th best maximum set aside first (they cannot be among the k
  best, and XLA's CPU top-k is cheaper the fewer entries can enter it). `valid` (n x B,): the
  entries that may be returned (the maxima must leave the others out already)."""
  q, n, b = blocks.shape
  if n < k:
    best = jnp.broadcast_to(jnp.arange(n), maxima.shape)
    floor = jnp.full((q, 1), -jnp.inf)
  elif count:
    keys = _order_keys(maxima)
    kth = _kth_largest_key(keys, k)
    best = _first_true(keys >= kth[:, None], k)
    floor = _order_keys(kth)[:, None]
  else:
    top, best = jax.lax.top_k(maxima, k)
    floor = jnp.min(top, axis=1, keepdims=True)       # not a slice of top-k's output: slower
  cand = jnp.take_along_axis(blocks, best[:, :, None], axis=1).reshape(q, -1)
  cols = (best[:, :, None] * b + jnp.arange(b)).reshape(q, -1)
  keep = cand >= floor
  if valid is not None:
    keep &= valid[cols]
  vals, pick = jax.lax.top_k(jnp.where(keep, cand, -jnp.inf), k)
  return vals, jnp.take_along_axis(cols, pick, axis=1)


def _rescored(qt, bank, labels, vals, idx):
  """The rows `idx` (T, k) found with bfloat16 products, scored again in float32 and sorted
  again, best first (entries found at -inf, or rows with a negative label, stay -inf); a few
  queries at a time (RESCORE_BYTES of gathered rows: gathered for a whole tile of queries at
  once, the native search in bfloat16 on the demo's bank at K = 1,000 took 4.80 s where it
  took 3.27: BENCHMARKS.md, kNN search). The tiled search's; the native one rescores in its
  kernel (`cpu_select.rescore`)."""
  def one(qs, vs, ids):
    rescored = jnp.einsum('qkd,qd->qk', bank[ids], qs, preferred_element_type=jnp.float32)
    scored = jnp.where((labels[ids] >= 0) & (vs > -jnp.inf), rescored, -jnp.inf)
    vs, pick = jax.lax.top_k(scored, ids.shape[1])
    return vs, jnp.take_along_axis(ids, pick, axis=1)

  return _by_query_tiles(one, -(-idx.shape[1] // BLOCK), qt, vals, idx)


# The native search (`_native_top_k`): NATIVE_QUERIES queries a tile, each scored against
# chunks of rows of about NATIVE_TILE_BYTES of float32 scores (4,096 rows for 1,024 queries).
# On the 2-core Intel Xeon, ImageNet's bank, K = 200 / 1,000, 1,024 x 4,096 against 1,024 x
# 1,024 (the tiles before): float32 2.60 / 2.84 s against 3.04 / 3.27, bfloat16 0.90 / 1.19
# against 1.65 / 1.87 (BENCHMARKS.md, kNN search): fewer steps of XLA's loop for the same
# products. On the AMD EPYC, 2,048 x 2,048 had been 1-7% slower than 1,024 x 1,024.
NATIVE_QUERIES = 1024
NATIVE_TILE_BYTES = 2 ** 24
# The float32 native search screens a device's rows in bfloat16 (`_native_screened_top_k`,
# `screen='auto'`) where the CPU multiplies bfloat16 in hardware and the rows it scores again,
# NATIVE_SCREEN_K(k) a query, are at most a NATIVE_SCREEN_SHARE-th of the device's. On the
# 2-core Intel Xeon, one device, the native search with float32 products / screened
# (benchmarks/knn.py, BENCHMARKS.md): ImageNet's bank, 2,048 queries, K = 30, 200, 1,000 2.71 /
# 0.96, 2.78 / 1.09, 2.89 / 1.23 s; the demo's 60,000 rows, 10,000 queries, K = 1, 30 0.69 /
# 0.41, 0.73 / 0.48 s, K = 200 0.85 / 0.67 s (a 226th scored again), K = 1,000 1.10 / 1.20 s
# (a 47th).
NATIVE_SCREEN_SHARE = 64
NATIVE_SCREEN_K = lambda k: k + k // 4 + 16


def _native_tiling(rows, nq):
  """(queries a tile, rows a chunk) of the native search over `rows` rows for `nq` queries."""
  tile = min(nq, NATIVE_QUERIES)
  return tile, min(rows, max(BLOCK, NATIVE_TILE_BYTES // (4 * tile) // BLOCK * BLOCK))


def _native_top_k(q, bank, labels, *, k, matmul_dtype, measure=False):
  """This device's k best rows for every query, with the selection in a CPU kernel
  (`cpu_select`): NATIVE_QUERIES queries at a time, scored by XLA against a chunk of rows at a
  time, every chunk's scores folded into each query's running selection. Exact for these
  scores; with bfloat16 products the kernel scores the k found again in float32 and sorts them
  again (`cpu_select.rescore`), so the similarities returned are float32's. `measure`: also
  the k-th best score of the selection (Q,), before it is scored again, and the rows'
  `rounding_extent`, from the chunks the search reads anyway (`_native_screened_top_k`)."""
  n, dim = bank.shape
  nq = q.shape[0]
  tile, chunk = _native_tiling(n, nq)

  def one(qt):
    qm = qt.astype(matmul_dtype)

    def fold(carry, rows, fresh, chunk_rows, chunk_labels):
      state, extent = carry
      chunk_labels = jnp.where(fresh, chunk_labels, -1)
      sims = jnp.einsum('qd,cd->qc', qm, chunk_rows.astype(matmul_dtype),
                        preferred_element_type=jnp.float32)
      state = cpu_select.fold(state, sims, chunk_labels, rows[0], rows[-1] == n - 1, k=k)
      if measure:
        extent = jax.tree.map(jnp.maximum, extent, rounding_extent(chunk_rows, chunk_labels))
      return state, extent

    init = (cpu_select.init(tile, k), (jnp.float32(0), jnp.float32(0)) if measure else ())
    state, extent = bank_lib.scan_chunks(fold, init, (bank, labels), chunk)
    vals, idx = cpu_select.result(state, k)
    kth = jnp.min(vals, axis=1) if measure else ()          # the last, sorted: as a min
    if jnp.dtype(matmul_dtype) != jnp.float32:
      vals, idx = cpu_select.rescore(qt, bank, vals, idx)
    return vals, idx, kth, extent

  padded = -(-nq // tile) * tile
  vals, idx, kth, extent = jax.lax.map(
      one, jnp.pad(q, ((0, padded - nq), (0, 0))).reshape(-1, tile, dim))
  vals, idx = vals.reshape(padded, k)[:nq], idx.reshape(padded, k)[:nq]
  if not measure:
    return vals, idx
  return vals, idx, kth.reshape(padded)[:nq], jax.tree.map(jnp.max, extent)


def _native_screened_top_k(q, bank, labels, *, k):
  """This device's k best rows for every query by float32 score, exactly, from the native
  search with bfloat16 products (`_native_top_k`; where the CPU multiplies bfloat16 in
  hardware, most of the float32 products' time saved):
    1. the NATIVE_SCREEN_K(k) best rows by bfloat16 score, scored again in float32 by the
       kernel and sorted (best first, ties to the lower row); s, the last of them's bfloat16
       score;
    2. no row left out scores above s + eps in float32 (`screening_error`), so where the k-th
       best float32 score found exceeds that, the k found are the k best (a row of equal score
       left out cannot be among them: the test is strict);
    3. the queries without that proof searched again with float32 products, a
       FALLBACK_SHARE-th of the queries at a time (`_search_again`)."""
  vals, idx, ok = _native_screen(q, bank, labels, k=k)
  return _search_again(
      q, vals, idx, ok,
      lambda qs: _native_top_k(qs, bank, labels, k=k, matmul_dtype=jnp.float32))


def _native_screen(q, bank, labels, *, k):
  """Steps 1 and 2 of `_native_screened_top_k`: (values, rows) (Q, k), and whether each query's
  are proven its k best (Q,)."""
  n = bank.shape[0]
  keep = min(NATIVE_SCREEN_K(k), n)
  vals, idx, last, extent = _native_top_k(q, bank, labels, k=keep, matmul_dtype=jnp.bfloat16,
                                          measure=True)
  vals, idx = vals[:, :k], idx[:, :k]
  bar = jnp.nextafter(last + screening_error(q, *extent), jnp.inf)   # the sum rounded up
  return vals, idx, (jnp.min(vals, axis=1) > bar) | (last == -jnp.inf) | (keep == n)


def _is_small(rows):
  return TILE_BYTES // (4 * max(rows, 1)) >= TILE_QUERIES


def _tiled_top_k(q, bank, labels, *, k, matmul_dtype):
  """This device's k best rows for every query, for a small bank (`_is_small`): TILE_QUERIES
  queries at a time, all the device's scores at once, their k best taken while in cache (exact
  for these scores: the two-pass search's rescoring, which on a small bank gathers a large share
  of it again for every query, is not needed): the maxima of blocks of BLOCK rows (padding rows
  left out: FIX_BLOCKS), then `_best_entries` (the best blocks by counting from COUNT_FROM_K).
  With bfloat16 products the k found are scored again in float32, so the similarities
  returned are float32's."""
  n, dim = bank.shape
  pad = -n % BLOCK                  # the bank padded once, not each tile's scores
  rows = jnp.pad(bank.astype(matmul_dtype), ((0, pad), (0, 0)))
  valid = jnp.pad(labels, (0, pad), constant_values=-1) >= 0
  n_blocks = (n + pad) // BLOCK
  valid_blocks = valid.reshape(n_blocks, BLOCK)
  mixed = ~jnp.all(valid_blocks, axis=1)              # the blocks that hold a padding row
  # Up to FIX_BLOCKS of them, the rest block 0 (whose maximum masked is right either way).
  fix = jnp.nonzero(mixed, size=min(FIX_BLOCKS, n_blocks), fill_value=0)[0]
  few_mixed = jnp.sum(mixed) <= fix.shape[0]           # once, not in every tile

  def block_maxima(sims):
    def few():
      some = jnp.max(jnp.where(valid_blocks[fix], sims[:, fix], -jnp.inf), axis=2)
      return jnp.max(sims, axis=2).at[:, fix].set(some)
    return jax.lax.cond(few_mixed, few,
                        lambda: jnp.max(jnp.where(valid_blocks, sims, -jnp.inf), axis=2))

  def one(qt):
    sims = jnp.einsum('qd,cd->qc', qt.astype(matmul_dtype), rows,
                      preferred_element_type=jnp.float32).reshape(-1, n_blocks, BLOCK)
    vals, cols = _best_entries(sims, block_maxima(sims), k, count=k >= COUNT_FROM_K,
                               valid=valid)
    idx = jnp.minimum(cols, n - 1)          # past the rows: only where fewer than k score
    if jnp.dtype(matmul_dtype) != jnp.float32:
      vals, idx = _rescored(qt, bank, labels, vals, idx)
    return vals, idx.astype(jnp.int32)

  nq = q.shape[0]
  tile = min(nq, TILE_QUERIES)
  pair = 2 if k >= PAIRS_FROM_K and nq > tile else 1
  padded = -(-nq // (pair * tile)) * pair * tile

  def tiles(qs):              # `pair` tiles a step, independent: XLA's CPU runtime may overlap
    out = [one(t) for t in qs]               # one's selection (one thread) with the other's
    return tuple(jnp.stack(x) for x in zip(*out))

  vals, idx = jax.lax.map(tiles, jnp.pad(q, ((0, padded - nq), (0, 0))).reshape(
      -1, pair, tile, dim))
  return vals.reshape(padded, k)[:nq], idx.reshape(padded, k)[:nq]


def _screen_asked(screen, matmul_dtype, few_again) -> bool:
  """Whether a float32 search screens in bfloat16 where `screen` says so: 'auto' (where the CPU
  multiplies bfloat16 in hardware and `few_again`: the rows scored again are few beside the
  device's), 'bfloat16' or 'none'."""
  if screen not in ('auto', 'bfloat16', 'none'):
    raise ValueError(f"kNN screen {screen!r}: use 'auto', 'bfloat16' or 'none'")
  if screen == 'auto':
    screen = 'bfloat16' if hardware.bfloat16_in_hardware() and few_again else 'none'
  return jnp.dtype(matmul_dtype) == jnp.float32 and screen == 'bfloat16'


def _screens_native(rows, k, matmul_dtype, screen) -> bool:
  """Whether the native search over `rows` rows screens them in bfloat16
  (`_native_screened_top_k`; 'auto': where at most a NATIVE_SCREEN_SHARE-th of them are scored
  again)."""
  return _screen_asked(screen, matmul_dtype, NATIVE_SCREEN_K(k) * NATIVE_SCREEN_SHARE <= rows)


def _screens(rows, k, matmul_dtype, screen) -> bool:
  """Whether the blocked search over `rows` rows screens them in bfloat16 (`_screened_top_k`;
  'auto': where at most a SCREEN_MIN_SHARE-th of them are scored again), where it holds more
  than SCREEN_BLOCKS(k) blocks."""
  return (_screen_asked(screen, matmul_dtype, SCREEN_BLOCKS(k) * BLOCK * SCREEN_MIN_SHARE <= rows)
          and rows // BLOCK > SCREEN_BLOCKS(k))


def _blocked_top_k(q, bank, labels, *, k, matmul_dtype, screen='auto'):
  """This device's k best rows for every query, in two passes over blocks of rows (exact in
  float32; `_plain_top_k`), the first in bfloat16 with a proof and a float32 fallback where
  `_screens` says so (`_screened_top_k`)."""
  if _screens(bank.shape[0], k, matmul_dtype, screen):
    return _screened_top_k(q, bank, labels, k=k)
  return _plain_top_k(q, bank, labels, k=k, matmul_dtype=matmul_dtype)


def _search(q, bank, labels, *, k, chunk, matmul_dtype, method, screen):
  """This device's k best rows: the native search ('native': XLA's products, the selection in a
  CPU kernel; screened in bfloat16 where `_screens_native` says so), the tiled search for small
  banks ('tiled'), the blocked one ('blocked'), or the chunked one ('chunked'). 'auto' on CPUs:
  the native search where its kernel is built (`cpu_select.available`); else as before it: the
  tiled search where the device's rows are few (`_is_small`) and would not be screened, the
  blocked one where it holds at least k blocks of rows (accelerators keep the chunked one, whose
  few large products suit them, until the others are timed there). `screen`:
  `_screens_native`'s and `_screens`'s."""
  k = min(k, bank.shape[0])
  if method not in ('auto', 'native', 'tiled', 'blocked', 'chunked'):
    raise ValueError(f"kNN method {method!r}: use 'auto', 'native', 'tiled', 'blocked' or "
                     "'chunked'")
  rows = bank.shape[0]
  cpu = method == 'auto' and jax.default_backend() == 'cpu'
  screens = _screens(rows, k, matmul_dtype, screen)
  if method == 'native' or (cpu and cpu_select.available()):
    if not (jax.default_backend() == 'cpu' and cpu_select.available()):
      raise ValueError("kNN method 'native' runs on the CPU, with its selection kernel built "
                       "(snca_jax/cpu_select.py): use 'auto'")
    if _screens_native(rows, k, matmul_dtype, screen):
      return _native_screened_top_k(q, bank, labels, k=k)
    return _native_top_k(q, bank, labels, k=k, matmul_dtype=matmul_dtype)
  if method == 'tiled' or (cpu and _is_small(rows) and not screens):
    return _tiled_top_k(q, bank, labels, k=k, matmul_dtype=matmul_dtype)
  if method == 'blocked' or (cpu and rows // BLOCK >= k):
    return _blocked_top_k(q, bank, labels, k=k, matmul_dtype=matmul_dtype, screen=screen)
  return _local_top_k(q, bank, labels, k=k, chunk=chunk, matmul_dtype=matmul_dtype)


def _merge(vals, k):
  """The k best of the (Q, n) candidates gathered from the devices: (values, columns), best
  first, ties to the lower column (each device's candidates best first, the devices in the
  order of their rows: so ties go to the lower row). On CPUs with the selection kernel built
  (`cpu_select`), by it: XLA's CPU top-k sorts on one thread."""
  k = min(k, vals.shape[1])
  if jax.default_backend() == 'cpu' and cpu_select.available():
    state = cpu_select.fold(cpu_select.init(vals.shape[0], k), vals,
                            jnp.zeros(vals.shape[1], jnp.int32), jnp.int32(0), True, k=k)
    return cpu_select.result(state, k)
  return jax.lax.top_k(vals, k)


def top_k_neighbors(queries, bank, bank_labels, *, k, mesh, chunk_size=16384,
                    matmul_dtype=jnp.float32, method='auto', screen='auto'):
  """The k most similar bank rows of every query: (similarities, row indices, labels), each
  (Q, k), replicated. `bank` is (N, D) and `bank_labels` (N,), sharded by rows over the mesh.
  `matmul_dtype=jnp.bfloat16` scores in bfloat16 (float32 accumulation): faster, and the
  neighbours can differ where similarities nearly tie (the native, tiled and blocked searches
  return their float32 similarities). `method`: 'native' (XLA's products, the selection in a CPU
  kernel, `_native_top_k`), 'tiled' (all a device's scores for a tile of queries,
  `_tiled_top_k`), 'blocked' (two passes over blocks of rows, `_blocked_top_k`), 'chunked' (a
  running top k over chunks, `_local_top_k`), or 'auto' (on CPUs native, or where its kernel
  cannot be built tiled for few rows and blocked for many: `_search`). `screen`: whether the
  native or blocked search in float32 screens the bank in bfloat16 first, exactly still
  ('auto': where the CPU multiplies bfloat16 in hardware and few rows are scored again;
  'bfloat16'; 'none'; `_native_screened_top_k`, `_blocked_top_k`)."""

  def per_device(q, b, l):
    vals, idx = _search(q, b, l, k=k, chunk=chunk_size, matmul_dtype=matmul_dtype,
                        method=method, screen=screen)
    cands = (vals, idx + jax.lax.axis_index(mesh_lib.DATA) * b.shape[0], l[idx])
    if mesh.shape[mesh_lib.DATA] == 1:     # the search's own order, best first: no merge (a
      return cands                         # top-k of k entries sorts them all again)
    vals, idx, labels = (jax.lax.all_gather(x, mesh_lib.DATA, axis=1, tiled=True)
                         for x in cands)                          # (Q, k x devices)
    vals, pick = _merge(vals, k)
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
                                             'matmul_dtype', 'method', 'screen'))
def _classify_batch(queries, bank, bank_labels, *, k, sigma, num_classes, mesh, matmul_dtype,
                    method, screen):
  sims, _, labels = top_k_neighbors(queries, bank, bank_labels, k=k, mesh=mesh,
                                    matmul_dtype=matmul_dtype, method=method, screen=screen)
  return vote(sims, labels, sigma=sigma, num_classes=num_classes)


def knn_classify(queries, bank, bank_labels, *, k=30, sigma=0.05, num_classes, mesh=None,
                 batch_size=1024, matmul_dtype=jnp.float32, method='auto', screen='auto'):
  """Weighted kNN class scores (Q, num_classes) as a numpy array.

  Queries are processed `batch_size` at a time, so memory stays O(batch_size x N / devices).
  `bank` and `bank_labels` may be numpy or sharded jax arrays; with no mesh given, one is made
  over all devices. `method`, `screen`: `top_k_neighbors`'s.
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
                             matmul_dtype=jnp.dtype(matmul_dtype), method=method,
                             screen=screen)
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
