"""The NCA kernel's pass over one device's bank rows as a single Pallas kernel (GPUs).

`nca.py`'s streaming kernel walks the bank in chunks inside a `lax.scan`; on a GPU each chunk
is several kernel launches, and the (B, chunk) scores go through memory between them (on an
H200 the step took 1.73x its two matrix products). Here one Pallas program per (block of
examples, slice of bank rows) keeps its (block, tile) scores, their exponentials and its
accumulators on chip, reading each bank row once, like FlashAttention's forward pass:

    for each tile of `TILES.rows` bank rows in the program's slice:
      s = q . rows^T                                        (q = features / T)
      for the same-class (pos) and other-class (neg) entries, online log-sum-exp:
        m' = max(m, max s);  l' = l e^(m-m') + sum e^(s-m');  g' = g e^(m-m') + e^(s-m') rows

The slices' (m, l, g) are merged afterwards the same way (`merge`). A bank row is left out
where its label is negative (padding, or a row this step writes) or it is the example's own
(`own` holds each example's row among these rows; anything out of range where it has none).
Rows past the last whole slice are left to the caller (`covered_rows`). Where a class index
gives the same-class sums (`nca.class_index`), the kernel folds the other-class entries alone
(`other_only`): its two products per tile are then the step's matrix-product floor.

On a CPU the kernel runs in Pallas's interpreter: that is how the tests check it against the
dense reference; it is not a fast path there.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

TARGET_PROGRAMS = 264         # about two per streaming multiprocessor of an H100/H200


@dataclasses.dataclass(frozen=True)
class Tiles:
  """The kernel's tiling: at most `examples` examples per program, `rows` bank rows per step
  of its loop, and Triton's `warps` and pipeline `stages` (powers of 2 but `stages`). The
  default was the fastest of four on an H200 with bfloat16 products (`benchmarks/nca_step.py`,
  BENCHMARKS.md: 2.3 ms a step at N = 1,281,167, B = 256, against 2.5-2.9 ms for the others)."""
  examples: int = 64
  rows: int = 64
  warps: int = 4
  stages: int = 3


TILES = Tiles()               # what `partials` uses (benchmarks/nca_step.py times others)


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def layout(batch: int, rows: int, tiles: Tiles | None = None) -> tuple[int, int, int]:
  """(examples per program, bank slices, tiles per slice) for `batch` examples and `rows` rows:
  enough programs to fill a GPU, every slice of the same whole number of tiles."""
  t = tiles or TILES
  block = min(t.examples, max(16, _next_pow2(batch)))
  count = rows // t.rows                                # whole tiles of rows
  blocks = -(-batch // block)
  slices = max(1, min(count, TARGET_PROGRAMS // blocks))
  return block, slices, (count // slices if count else 0)


def covered_rows(batch: int, rows: int, tiles: Tiles | None = None) -> int:
  """How many of the leading rows `partials` folds (the rest: fewer than a slice's worth more
  than one tile per slice)."""
  _, slices, per_slice = layout(batch, rows, tiles)
  return slices * per_slice * (tiles or TILES).rows


def _precision(dtype, interpret):
  """Of the products with float32 operands: exact in the interpreter (the CPU, where the tests
  compare with the float64 reference); on a GPU three TF32 products each (Triton's tf32x3,
  about float32's accuracy on the matrix units), as exact float32 products there run without
  them: 547 ms a step on an H200, 210x the floor (BENCHMARKS.md)."""
  if dtype != jnp.float32:
    return None
  return jax.lax.Precision.HIGHEST if interpret else jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def _fold(m, l, g, s, mask, rows, precision):
  s = jnp.where(mask, s, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  scale = jnp.exp(m - m_safe)                      # 0 while m is -inf
  e = jnp.exp(s - m_safe[:, None])                 # 0 where masked
  g_new = g * scale[:, None] + jax.lax.dot_general(
      e.astype(rows.dtype), rows, (((1,), (0,)), ((), ())),
      precision=precision, preferred_element_type=jnp.float32)
  return m_new, l * scale + jnp.sum(e, axis=1), g_new


def _kernel(q_ref, labels_ref, own_ref, rows_ref, row_labels_ref, *out_refs, per_slice,
            tile_rows, matmul_dtype, other_only, interpret):
  q = q_ref[...]
  labels, own = labels_ref[...], own_ref[...]
  first = pl.program_id(1) * per_slice * tile_rows
  block, dim = q.shape

  def body(t, carry):
    start = t * tile_rows
    rows = rows_ref[pl.ds(start, tile_rows), :].astype(matmul_dtype)
    row_labels = row_labels_ref[pl.ds(start, tile_rows)]
    precision = _precision(rows.dtype, interpret)
    s = jax.lax.dot_general(q, rows, (((1,), (1,)), ((), ())),
                            precision=precision, preferred_element_type=jnp.float32)
    index = first + start + jax.lax.broadcasted_iota(jnp.int32, (block, tile_rows), 1)
    present = (row_labels[None, :] >= 0) & (index != own[:, None])
    other = present & (row_labels[None, :] != labels[:, None])
    if other_only:
      return _fold(*carry, s, other, rows, precision)
    same = present & (row_labels[None, :] == labels[:, None])
    return (_fold(*carry[:3], s, same, rows, precision)
            + _fold(*carry[3:], s, other, rows, precision))

  m0 = jnp.full((block,), -jnp.inf, jnp.float32)
  l0 = jnp.zeros((block,), jnp.float32)
  g0 = jnp.zeros((block, dim), jnp.float32)
  sets = 1 if other_only else 2
  out = jax.lax.fori_loop(0, per_slice, body, (m0, l0, g0) * sets)
  for ref, value in zip(out_refs, out):
    ref[...] = value


def merge(m, l, g, axis=0):
  """Merges online log-sum-exp partials (m, l, g) along `axis` of m and l (g: the same axis)."""
  m_all = jnp.max(m, axis=axis)
  m_safe = jnp.where(m_all == -jnp.inf, 0.0, m_all)
  scale = jnp.exp(m - jnp.expand_dims(m_safe, axis))
  return (m_all, jnp.sum(l * scale, axis=axis),
          jnp.sum(g * jnp.expand_dims(scale, -1), axis=axis))


def partials(queries, labels, own, rows, row_labels, *, matmul_dtype=jnp.float32,
             other_only=False, interpret=None):
  """(m, l, g) of shapes (2, B), (2, B), (2, B, D), index 0 the same-class entries and 1 the
  other-class ones, over the first `covered_rows(B, len(rows))` rows: `queries` (B, D) are the
  features over T, `labels` (B,) theirs, `own` (B,) each example's row among `rows` (N, D),
  `row_labels` (N,) the rows' labels (negative: left out). With `other_only`, the other-class
  entries alone, of shapes (1, B), (1, B), (1, B, D) (where a class index gives the same-class
  ones): one product fewer per tile. Traced inside the caller's jit, with the tiling `TILES`
  holds then."""
  batch, dim = queries.shape
  tiles = TILES
  block, slices, per_slice = layout(batch, rows.shape[0], tiles)
  interpret = jax.default_backend() == 'cpu' if interpret is None else interpret
  padded_batch, padded_dim = -(-batch // block) * block, max(16, _next_pow2(dim))
  pad_b, pad_d = padded_batch - batch, padded_dim - dim
  q = jnp.pad(queries.astype(matmul_dtype), ((0, pad_b), (0, pad_d)))
  labels = jnp.pad(labels.astype(jnp.int32), (0, pad_b), constant_values=-1)
  own = jnp.pad(own.astype(jnp.int32), (0, pad_b), constant_values=-1)
  if pad_d:
    rows = jnp.pad(rows, ((0, 0), (0, pad_d)))   # only for embeddings of odd sizes: a copy
  grid = (padded_batch // block, slices)
  slice_rows = per_slice * tiles.rows
  sets = 1 if other_only else 2
  vector = pl.BlockSpec((None, block), lambda i, j: (j, i))
  matrix = pl.BlockSpec((None, block, padded_dim), lambda i, j: (j, i, 0))
  shapes = [jax.ShapeDtypeStruct((slices, padded_batch), jnp.float32)] * 2 + [
      jax.ShapeDtypeStruct((slices, padded_batch, padded_dim), jnp.float32)]
  kwargs = {}
  if not interpret:
    from jax.experimental.pallas import triton as plgpu
    kwargs['compiler_params'] = plgpu.CompilerParams(num_warps=tiles.warps,
                                                     num_stages=tiles.stages)
  out = pl.pallas_call(
      functools.partial(_kernel, per_slice=per_slice, tile_rows=tiles.rows,
                        matmul_dtype=matmul_dtype, other_only=other_only,
                        interpret=interpret),
      grid=grid,
      in_specs=[pl.BlockSpec((block, padded_dim), lambda i, j: (i, 0)),
                pl.BlockSpec((block,), lambda i, j: (i,)),
                pl.BlockSpec((block,), lambda i, j: (i,)),
                pl.BlockSpec((slice_rows, padded_dim), lambda i, j: (j, 0)),
                pl.BlockSpec((slice_rows,), lambda i, j: (j,))],
      out_specs=[vector, vector, matrix] * sets,
      out_shape=shapes * sets,
      interpret=interpret,
      name='nca_pass',
      **kwargs)(q, labels, own, rows, row_labels)
  merged = [merge(*out[3 * k:3 * k + 3]) for k in range(sets)]
  m, l, g = (jnp.stack(parts) for parts in zip(*merged))
  return m[:, :batch], l[:, :batch], g[:, :batch, :dim]
