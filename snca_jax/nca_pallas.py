"""The NCA kernel's pass over one device's bank rows as a single Pallas kernel (GPUs).

`nca.py`'s streaming kernel walks the bank in chunks inside a `lax.scan`; on a GPU each chunk
is several kernel launches, and the (B, chunk) scores go through memory between them (on an
H200 the step took 1.73x its two matrix products). Here one Pallas program per (block of
examples, slice of bank rows) keeps its (block, tile) scores, their exponentials and its
accumulators on chip, reading each bank row once, like FlashAttention's forward pass:

    for each tile of `block_rows` bank rows in the program's slice:
      s = q . rows^T                                        (q = features / T)
      for the same-class (pos) and other-class (neg) entries, online log-sum-exp:
        m' = max(m, max s);  l' = l e^(m - m') + sum e^(s - m');  g' = g e^(m - m') + e^(s - m') rows

The slices' (m, l, g) are merged afterwards the same way (`merge`). A bank row is left out
where its label is negative (padding, or a row this step writes) or it is the example's own
(`own` holds each example's row among these rows; anything out of range where it has none).
Rows past the last whole slice are left to the caller (`covered_rows`).

On a CPU the kernel runs in Pallas's interpreter: that is how the tests check it against the
dense reference; it is not a fast path there.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

BLOCK_ROWS = 128              # bank rows per tile
MAX_BLOCK_EXAMPLES = 64       # examples per program
TARGET_PROGRAMS = 264         # about two per streaming multiprocessor of an H100/H200


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def layout(batch: int, rows: int) -> tuple[int, int, int]:
  """(examples per program, bank slices, tiles per slice) for `batch` examples and `rows` rows:
  enough programs to fill a GPU, every slice of the same whole number of tiles."""
  block = min(MAX_BLOCK_EXAMPLES, max(16, _next_pow2(batch)))
  tiles = rows // BLOCK_ROWS
  blocks = -(-batch // block)
  slices = max(1, min(tiles, TARGET_PROGRAMS // blocks))
  return block, slices, (tiles // slices if tiles else 0)


def covered_rows(batch: int, rows: int) -> int:
  """How many of the leading rows `partials` folds (the rest: fewer than a slice's worth more
  than one tile per slice)."""
  _, slices, per_slice = layout(batch, rows)
  return slices * per_slice * BLOCK_ROWS


def _precision(dtype):
  # float32 products in float32, not TF32 (which GPUs' matrix units would otherwise use).
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _fold(m, l, g, s, mask, rows):
  s = jnp.where(mask, s, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  scale = jnp.exp(m - m_safe)                      # 0 while m is -inf
  e = jnp.exp(s - m_safe[:, None])                 # 0 where masked
  g_new = g * scale[:, None] + jax.lax.dot_general(
      e.astype(rows.dtype), rows, (((1,), (0,)), ((), ())),
      precision=_precision(rows.dtype), preferred_element_type=jnp.float32)
  return m_new, l * scale + jnp.sum(e, axis=1), g_new


def _kernel(q_ref, labels_ref, own_ref, rows_ref, row_labels_ref,
            mp_ref, lp_ref, gp_ref, mn_ref, ln_ref, gn_ref, *, per_slice, matmul_dtype):
  q = q_ref[...]
  labels, own = labels_ref[...], own_ref[...]
  first = pl.program_id(1) * per_slice * BLOCK_ROWS
  block, dim = q.shape

  def body(t, carry):
    mp, lp, gp, mn, ln, gn = carry
    start = t * BLOCK_ROWS
    rows = rows_ref[pl.ds(start, BLOCK_ROWS), :].astype(matmul_dtype)
    row_labels = row_labels_ref[pl.ds(start, BLOCK_ROWS)]
    s = jax.lax.dot_general(q, rows, (((1,), (1,)), ((), ())),
                            precision=_precision(rows.dtype), preferred_element_type=jnp.float32)
    index = first + start + jax.lax.broadcasted_iota(jnp.int32, (block, BLOCK_ROWS), 1)
    present = (row_labels[None, :] >= 0) & (index != own[:, None])
    same = present & (row_labels[None, :] == labels[:, None])
    other = present & (row_labels[None, :] != labels[:, None])
    mp, lp, gp = _fold(mp, lp, gp, s, same, rows)
    mn, ln, gn = _fold(mn, ln, gn, s, other, rows)
    return mp, lp, gp, mn, ln, gn

  m0 = jnp.full((block,), -jnp.inf, jnp.float32)
  l0 = jnp.zeros((block,), jnp.float32)
  g0 = jnp.zeros((block, dim), jnp.float32)
  mp, lp, gp, mn, ln, gn = jax.lax.fori_loop(0, per_slice, body, (m0, l0, g0, m0, l0, g0))
  mp_ref[...], lp_ref[...], gp_ref[...] = mp, lp, gp
  mn_ref[...], ln_ref[...], gn_ref[...] = mn, ln, gn


def merge(m, l, g, axis=0):
  """Merges online log-sum-exp partials (m, l, g) along `axis` of m and l (g: the same axis)."""
  m_all = jnp.max(m, axis=axis)
  m_safe = jnp.where(m_all == -jnp.inf, 0.0, m_all)
  scale = jnp.exp(m - jnp.expand_dims(m_safe, axis))
  return (m_all, jnp.sum(l * scale, axis=axis),
          jnp.sum(g * jnp.expand_dims(scale, -1), axis=axis))


@functools.partial(jax.jit, static_argnames=('matmul_dtype', 'interpret'))
def partials(queries, labels, own, rows, row_labels, *, matmul_dtype=jnp.float32,
             interpret=None):
  """(m, l, g) of shapes (2, B), (2, B), (2, B, D), index 0 the same-class entries and 1 the
  other-class ones, over the first `covered_rows(B, len(rows))` rows: `queries` (B, D) are the
  features over T, `labels` (B,) theirs, `own` (B,) each example's row among `rows` (N, D),
  `row_labels` (N,) the rows' labels (negative: left out)."""
  batch, dim = queries.shape
  block, slices, per_slice = layout(batch, rows.shape[0])
  interpret = jax.default_backend() == 'cpu' if interpret is None else interpret
  padded_batch, padded_dim = -(-batch // block) * block, max(16, _next_pow2(dim))
  pad_b, pad_d = padded_batch - batch, padded_dim - dim
  q = jnp.pad(queries.astype(matmul_dtype), ((0, pad_b), (0, pad_d)))
  labels = jnp.pad(labels.astype(jnp.int32), (0, pad_b), constant_values=-1)
  own = jnp.pad(own.astype(jnp.int32), (0, pad_b), constant_values=-1)
  if pad_d:
    rows = jnp.pad(rows, ((0, 0), (0, pad_d)))   # only for embeddings of odd sizes: a copy
  grid = (padded_batch // block, slices)
  slice_rows = per_slice * BLOCK_ROWS
  vector = pl.BlockSpec((None, block), lambda i, j: (j, i))
  matrix = pl.BlockSpec((None, block, padded_dim), lambda i, j: (j, i, 0))
  shapes = [jax.ShapeDtypeStruct((slices, padded_batch), jnp.float32)] * 2 + [
      jax.ShapeDtypeStruct((slices, padded_batch, padded_dim), jnp.float32)]
  kwargs = {}
  if not interpret:
    from jax.experimental.pallas import triton as plgpu
    kwargs['compiler_params'] = plgpu.CompilerParams(num_warps=4, num_stages=2)
  out = pl.pallas_call(
      functools.partial(_kernel, per_slice=per_slice, matmul_dtype=matmul_dtype),
      grid=grid,
      in_specs=[pl.BlockSpec((block, padded_dim), lambda i, j: (i, 0)),
                pl.BlockSpec((block,), lambda i, j: (i,)),
                pl.BlockSpec((block,), lambda i, j: (i,)),
                pl.BlockSpec((slice_rows, padded_dim), lambda i, j: (j, 0)),
                pl.BlockSpec((slice_rows,), lambda i, j: (j,))],
      out_specs=[vector, vector, matrix] * 2,
      out_shape=shapes * 2,
      interpret=interpret,
      name='nca_pass',
      **kwargs)(q, labels, own, rows, row_labels)
  (mp, lp, gp), (mn, ln, gn) = merge(*out[:3]), merge(*out[3:])
  return (jnp.stack([mp, mn])[:, :batch], jnp.stack([lp, ln])[:, :batch],
          jnp.stack([gp, gn])[:, :batch, :dim])
