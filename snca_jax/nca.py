"""The NCA objective against the augmented memory (docs/METHOD.md, "Memory bank" and "NCA loss").

For a batch of unit embeddings f_i (dataset indices idx_i, labels y_i), a bank of N rows and a
temperature T:

    s_ij = f_i . bank[j] / T                      similarity to every bank row
    e_ij = exp(s_ij),  e_{i, idx_i} = 0           the example's own row is excluded
    P_i  = sum_{j: labels[j] == y_i} e_ij         same-class mass
    Z_i  = sum_j e_ij                             total mass
    P'_i = P_i exp(-m / T),  Z'_i = Z_i - P_i + P'_i,  p_i = P'_i / Z'_i     (margin m)
    loss = -(1/B) sum_{i: p_i > 0} log p_i        B counts every example

Everything here is computed in log space: log P and log(Z - P) are each a log-sum-exp with its
own row maximum, so the value is exact where the original's plain `exp` does not overflow and
finite where it would (T = 0.01, or a bank that is not yet unit-norm). An example whose class
has no other member in the bank has P_i = 0: it contributes nothing, but B still counts it.

Bank rows whose label is negative are padding (the bank is padded so that it splits evenly over
devices): they take part in neither P nor Z, and are never written.

The bank is state, not a parameter: no gradient flows into it, and the network's gradient
flows only through `features`.

Two implementations:
  - `nca_loss`: the dense reference. It builds the (B, N) similarity matrix; autodiff gives the
    gradient. Plain and obviously right; the tests hold the fast path against it.
  - `streaming_nca_loss`: the scalable kernel used for training (see its section below).
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from snca_jax import bank as bank_lib
from snca_jax import distributed
from snca_jax import nca_pallas
from snca_jax.bank import PAD_LABEL
from snca_jax.mesh import DATA
from snca_jax.models import l2_normalize


def _masked_logsumexp(s, mask):
  """log sum_{j: mask_ij} exp(s_ij) per row; -inf for rows with an empty mask, with a zero
  (not NaN) gradient there."""
  any_ = jnp.any(mask, axis=-1)
  # Rows with nothing to sum get zeros instead of -inf, so that neither value nor gradient
  # sees inf - inf; their result is replaced by -inf afterwards.
  s = jnp.where(mask, s, -jnp.inf)
  s = jnp.where(any_[:, None], s, 0.0)
  out = jax.nn.logsumexp(s, axis=-1)
  return jnp.where(any_, out, -jnp.inf)


def nca_log_probs(features, indices, bank, bank_labels, *, temperature, margin=0.0):
  """log p_i of docs/METHOD.md and whether p_i > 0, both of shape (B,).

  The dense reference: it builds the whole (B, N) similarity matrix. The batch's labels are
  the bank's labels at `indices`.
  """
  bank = jax.lax.stop_gradient(bank)
  labels = bank_labels[indices]
  s = jnp.einsum('bd,nd->bn', features, bank.astype(features.dtype),
                 preferred_element_type=jnp.float32) / temperature
  rows = jnp.arange(bank.shape[0])
  present = (bank_labels[None, :] >= 0) & (rows[None, :] != indices[:, None])
  same = bank_labels[None, :] == labels[:, None]
  log_pos = _masked_logsumexp(s, present & same)           # log P_i
  log_neg = _masked_logsumexp(s, present & ~same)          # log (Z_i - P_i)
  log_pos_m = log_pos - margin / temperature               # log P'_i
  log_z = jnp.logaddexp(log_neg, log_pos_m)                # log Z'_i
  valid = log_pos != -jnp.inf     # a same-class row exists; NaN stays NaN, never hides
  log_p = jnp.where(valid, log_pos_m - jnp.where(valid, log_z, 0.0), 0.0)
  return log_p, valid


def nca_loss(features, indices, bank, bank_labels, *, temperature, margin=0.0):
  """The NCA loss of docs/METHOD.md (a scalar), against the bank before this step's update."""
  log_p, valid = nca_log_probs(features, indices, bank, bank_labels,
                               temperature=temperature, margin=margin)
  return -jnp.sum(jnp.where(valid, log_p, 0.0)) / features.shape[0]


# ---------------------------------------------------------------------------------------------
# The streaming kernel.
#
# Split the mass of example i into its same-class part P_i and its other-class part
# N_i = Z_i - P_i, and the gradient into the two softmax-weighted means of bank rows
#     Gp_i = sum_{j same} (e_ij / P_i) bank[j],     Gn_i = sum_{j other} (e_ij / N_i) bank[j].
# With p_i = P'_i / Z'_i, differentiating -log p_i through s_ij = f_i . bank[j] / T gives
#     d(-log p_i)/df_i = (1 - p_i) (Gn_i - Gp_i) / T            (any margin; docs/METHOD.md's closed
#                                                               form for margin 0 rearranged)
# so one pass over the bank that accumulates, per example, (max, sum, weighted row sum) for the
# same-class and the other-class rows yields both the loss and its feature gradient.
#
# Each device walks its own rows of the bank in chunks of `chunk_size` (inside `jax.shard_map`),
# keeping online log-sum-exp accumulators: a running max m, a sum l = sum exp(s - m) and a row
# sum G = sum exp(s - m) bank[j], rescaled by exp(m_old - m_new) whenever the max grows. Peak
# memory is O(B x chunk_size). The devices then combine their partials: pmax of the (B,) maxima,
# psum of the rescaled (B,) sums and (B, D) row sums, so what crosses devices does not grow with
# N. The result is a `jax.custom_vjp`: the backward pass only scales the stored (B, D) gradient.
#
# With many classes, the same-class sums are a small share of the work but, summed in the pass
# over the whole bank, cost as much as the other-class ones: a second (B, chunk) x (chunk, D)
# product of which all but about 1/classes of the entries are zero. With a class index
# (`class_index`: each device's rows sorted by label, made once per run) the pass over the bank
# sums only the other-class rows, and each example's same-class (max, sum, row sum) comes from
# its own class's rows, gathered through the index `class_window` at a time. Same loss and
# gradient; at ImageNet's 1,000 classes about a third less time; with ten classes, more
# (`class_index_pays` decides; BENCHMARKS.md).
# ---------------------------------------------------------------------------------------------

def _rescaled(m, s, masks):
  """The online log-sum-exp's step for the K entry sets of `masks` (K, B, C) among the scores
  `s` (B, C): the new maxima (K, B), the factor (K, B) that rescales what was summed under the
  old ones, and the (K, B, C) exponentials under the new ones (0 off each set). One exp per
  score."""
  m_new = jnp.maximum(m, jnp.max(jnp.where(masks, s, -jnp.inf), axis=-1))
  m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  scale = jnp.exp(m - m_safe)                                     # 0 while m is -inf
  shift = m_safe[0][:, None]
  for k in range(1, masks.shape[0]):
    shift = jnp.where(masks[k], m_safe[k][:, None], shift)
  return m_new, scale, jnp.where(masks, jnp.exp(s - shift), 0.0)


def _online_update(carry, s, masks, rows, matmul_dtype):
  """Folds one chunk's scores `s` (B, C) into the running (max, sum, row sum) of each of the
  K entry sets of `masks` (K, B, C) (same-class, other-class): one (K B, C) x (C, D) product."""
  m_new, scale, e = _rescaled(carry[0], s, masks)
  g = jnp.einsum('kbc,cd->kbd', e.astype(matmul_dtype), rows,
                 preferred_element_type=jnp.float32)
  return (m_new, carry[1] * scale + jnp.sum(e, axis=2),
          carry[2] * scale[..., None] + g)


def _combine(m, l, g):
  """Merges per-device (m, l, g) into the global ones."""
  m_all = jax.lax.pmax(m, DATA)
  m_safe = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
  scale = jnp.exp(m - m_safe)
  return m_all, jax.lax.psum(l * scale, DATA), jax.lax.psum(g * scale[..., None], DATA)


@dataclasses.dataclass(frozen=True)
class KernelOptions:
  """What the streaming kernel is built for (static: part of the compiled program)."""
  temperature: float
  margin: float
  mesh: jax.sharding.Mesh
  chunk_size: int             # bank rows per step of the scan
  matmul_dtype: jnp.dtype     # of both matrix products (float32 accumulation)
  update: bool                # also write the batch's bank rows (nca_step)
  kernel: str = 'xla'         # 'pallas': the pass over the rows as one Pallas kernel
  class_window: int = 0       # with a class index: its rows per step of the same-class pass


def _same_class_pass(queries, indices, labels, bank, scan_labels, index, offset,
                     opts: KernelOptions):
  """One device's (m, l, G) of each example's same-class rows, found through the class index:
  `opts.class_window` of them per example at a time, gathered from the bank, until the largest
  class among the batch's is covered. Each example reads its own class's rows, not the bank."""
  order, sorted_labels = index
  rows = bank.shape[0]
  window = opts.class_window
  lo = jnp.searchsorted(sorted_labels, labels, side='left', method='scan')
  hi = jnp.searchsorted(sorted_labels, labels, side='right', method='scan')
  steps = (jnp.max(hi - lo) + window - 1) // window

  def body(t, carry):
    at = lo[:, None] + t * window + jnp.arange(window)[None, :]          # (B, W)
    r = order[jnp.minimum(at, rows - 1)]
    x = bank[r].astype(opts.matmul_dtype)                                 # (B, W, D)
    s = jnp.einsum('bd,bwd->bw', queries, x, preferred_element_type=jnp.float32)
    # In the class's range; not a row this step writes (relabelled as padding); not its own.
    present = ((at < hi[:, None]) & (scan_labels[r] == labels[:, None])
               & (offset + r != indices[:, None]))
    m, l, g = carry
    m_new, scale, e = _rescaled(m, s, present[None])
    g_t = jnp.einsum('kbw,bwd->kbd', e.astype(opts.matmul_dtype), x,
                     preferred_element_type=jnp.float32)
    return m_new, l * scale + jnp.sum(e, axis=2), g * scale[..., None] + g_t

  batch, dim = queries.shape
  init = (jnp.full((1, batch), -jnp.inf), jnp.zeros((1, batch)), jnp.zeros((1, batch, dim)))
  return jax.lax.fori_loop(0, steps, body, init)


def _device_pass(features, indices, bank, bank_labels, momentum, opts: KernelOptions,
                 index=None):
  """One device: its rows of the bank -> global (m, l, G) for same- and other-class rows (m is
  -inf exactly for examples without any such row), and its rows of the bank after the step.

  With a class `index` (`class_index`), the pass over all the rows sums only the other-class
  ones, and the same-class sums come from `_same_class_pass`.

  With `opts.update`, the batch's rows are written first, in place (so that the bank, donated,
  is never copied), the scan skips them, and they are counted afterwards at the values they had
  before the step: the loss is still the one against the bank before the update (docs/METHOD.md).
  """
  rows, dim = bank.shape
  batch = features.shape[0]
  offset = jax.lax.axis_index(DATA) * rows
  # The batch's labels (and rows) are bank_labels[indices]: each device gives the ones it holds.
  local = indices - offset
  mine = (local >= 0) & (local < rows)
  safe = jnp.clip(local, 0, rows - 1)
  labels = jax.lax.psum(jnp.where(mine, bank_labels[safe], 0), DATA)
  target = jnp.where(mine, local, rows)                  # out of range: not on this device
  if opts.update:
    old = jax.lax.psum(jnp.where(mine[:, None], bank[safe], 0.0), DATA)          # (B, D)
    new = l2_normalize(momentum * old + (1.0 - momentum) * features.astype(bank.dtype))
    bank = bank.at[target].set(new, mode='drop')
    # The scan skips these rows (marked as padding); they are counted after it, at their old
    # values.
    scan_labels = bank_labels.at[target].set(PAD_LABEL, mode='drop')
  else:
    scan_labels = bank_labels
  queries = (features / opts.temperature).astype(opts.matmul_dtype)

  def fold(carry, local_rows, fresh, rows_c, labels_c):
    rows_c = rows_c.astype(opts.matmul_dtype)
    s = jnp.einsum('bd,cd->bc', queries, rows_c, preferred_element_type=jnp.float32)
    present = ((labels_c >= 0) & fresh)[None, :]
    # Each example's own row. (With `update` it is skipped already; the (B, C) test is kept
    # there too because XLA's CPU fusion of the chunk was much slower without it.)
    present &= (offset + local_rows)[None, :] != indices[:, None]
    same = labels_c[None, :] == labels[:, None]
    masks = (present & ~same)[None] if index is not None else jnp.stack(
        [present & same, present & ~same])
    return _online_update(carry, s, masks, rows_c, opts.matmul_dtype)

  sets = 1 if index is not None else 2          # other-class only, or same- and other-class
  init = (jnp.full((sets, batch), -jnp.inf), jnp.zeros((sets, batch)),
          jnp.zeros((sets, batch, dim)))
  covered = nca_pallas.covered_rows(batch, rows) if opts.kernel == 'pallas' else 0
  if covered:      # the leading rows in one Pallas kernel, the few after them as below
    init = nca_pallas.partials(queries, labels, jnp.where(mine, local, -1), bank, scan_labels,
                               matmul_dtype=opts.matmul_dtype, other_only=index is not None)
  if covered < rows:
    m, l, g = bank_lib.scan_chunks(
        lambda carry, r, fresh, *chunks: fold(carry, r + covered, fresh, *chunks), init,
        (bank[covered:], scan_labels[covered:]), opts.chunk_size)
  else:
    m, l, g = init
  if index is not None:
    pos = _same_class_pass(queries, indices, labels, bank, scan_labels, index, offset, opts)
    m, l, g = (jnp.concatenate([p, n]) for p, n in zip(pos, (m, l, g)))
  m, l, g = _combine(m, l, g)
  if opts.update:   # the batch's own rows, before the update, each example's own excluded
    old_c = old.astype(opts.matmul_dtype)
    s = jnp.einsum('bd,cd->bc', queries, old_c, preferred_element_type=jnp.float32)
    present = indices[None, :] != indices[:, None]
    same = labels[None, :] == labels[:, None]
    m, l, g = _online_update((m, l, g), s, jnp.stack([present & same, present & ~same]),
                             old_c, opts.matmul_dtype)
  return (m[0], l[0], g[0]), (m[1], l[1], g[1]), bank


def _loss_and_grad(features, indices, bank, bank_labels, momentum, index, opts: KernelOptions):
  features = features.astype(jnp.float32)
  temperature = opts.temperature

  def per_device(f, idx, b, lab, mu, index):
    (m_p, l_p, g_p), (m_n, l_n, g_n), b = _device_pass(f, idx, b, lab, mu, opts, index)
    valid, has_neg = m_p != -jnp.inf, m_n != -jnp.inf          # any such row at all
    log_pos = m_p + jnp.log(jnp.where(valid, l_p, 1.0)) - opts.margin / temperature  # log P'
    log_neg = jnp.where(has_neg, m_n + jnp.log(jnp.where(has_neg, l_n, 1.0)), -jnp.inf)
    log_p = log_pos - jnp.logaddexp(log_neg, log_pos)                            # log p
    batch = f.shape[0]
    loss = -jnp.sum(jnp.where(valid, log_p, 0.0)) / batch
    # A non-finite feature must stop training, not pass for an example without neighbours
    # (a reduction's max need not propagate NaN).
    loss = jnp.where(jnp.all(jnp.isfinite(f)), loss, jnp.nan)
    mean_pos = g_p / jnp.where(valid, l_p, 1.0)[:, None]                         # Gp
    mean_neg = g_n / jnp.where(has_neg, l_n, 1.0)[:, None]                       # Gn
    coef = jnp.where(valid, -jnp.expm1(log_p), 0.0) / (temperature * batch)      # (1 - p)/(T B)
    return loss, coef[:, None] * (mean_neg - mean_pos), b

  return jax.shard_map(per_device, mesh=opts.mesh,
                       in_specs=(P(), P(), P(DATA), P(DATA), P(), P(DATA)),
                       out_specs=(P(), P(), P(DATA)), check_vma=False)(
                           features, indices, bank, bank_labels,
                           jnp.asarray(momentum, bank.dtype), index)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _streaming(features, indices, bank, bank_labels, momentum, index, opts: KernelOptions):
  loss, _, bank = _loss_and_grad(features, indices, bank, bank_labels, momentum, index, opts)
  return loss, bank


def _streaming_fwd(features, indices, bank, bank_labels, momentum, index, opts: KernelOptions):
  loss, grad, bank = _loss_and_grad(features, indices, bank, bank_labels, momentum, index, opts)
  return (loss, bank), grad.astype(features.dtype)


def _streaming_bwd(opts, grad, cotangents):
  del opts
  # Only the loss has a gradient, and only into the features.
  return cotangents[0] * grad, None, None, None, None, None


_streaming.defvjp(_streaming_fwd, _streaming_bwd)


def default_chunk_size(batch: int, platform: str | None = None) -> int:
  """Bank rows per chunk. On a CPU, a (B, chunk) float32 score block of about 2 MB, which stays
  in cache. On an accelerator, a block of about 256 MB: there each chunk costs a few kernel
  launches, and at ImageNet scale (B = 256) the kernel went from 7.2x to 1.9x the time of its
  two matrix products on an H200 as the chunk grew from 2,048 to 262,144 rows
  (`benchmarks/nca_step.py --chunk`, BENCHMARKS.md)."""
  platform = platform or jax.default_backend()
  if platform == 'cpu':
    return int(min(8192, max(256, 2 ** 19 // max(batch, 1))))
  return int(max(4096, 2 ** 26 // max(batch, 1)))


class ClassIndex(NamedTuple):
  """Each device's bank rows ordered by class, both (N',) and sharded like the bank's labels:
  `order` holds row numbers local to the device, `labels` their labels (ascending), so that a
  class's rows on a device are a range found by binary search."""
  order: jax.Array
  labels: jax.Array


def class_index(bank_labels, mesh) -> ClassIndex:
  """The `ClassIndex` of `bank_labels` (sharded by rows over `mesh`), for `nca_step`'s
  `class_index`: made once per run (a sort of each device's labels), it lets each example's
  same-class sums read only its class's rows. It depends on the mesh, so it is made again,
  never saved, where the state is restored."""
  def per_device(labels):
    rows = jnp.arange(labels.shape[0], dtype=jnp.int32)
    sorted_labels, order = jax.lax.sort((labels, rows), num_keys=1, is_stable=True)
    return ClassIndex(order=order, labels=sorted_labels)

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(DATA),
                               out_specs=ClassIndex(P(DATA), P(DATA))))(bank_labels)


CLASS_INDEX_MIN_CLASSES = 50


def class_index_pays(bank_labels) -> bool:
  """Whether `class_index` makes the kernel faster for these labels: where no class holds more
  than 1/50 of the rows (each example then reads at most that share of the bank through the
  index). Measured at N = 1,281,167, B = 256 on a CPU (`benchmarks/nca_step.py --classes`):
  with 1,000 or 100 classes the step is faster with the index, with 32 level, with 10 slower."""
  labels = np.asarray(distributed.to_host(bank_labels))
  labels = labels[labels >= 0]
  _, counts = np.unique(labels, return_counts=True)
  return counts.size > 0 and int(counts.max()) * CLASS_INDEX_MIN_CLASSES <= labels.size


def default_class_window(batch: int, rows: int, platform: str | None = None) -> int:
  """Same-class rows per example per step of the class-index pass: a (B, window, D) block of
  about 32 MB on a CPU at D = 128 (B = 256: 256 rows), four times that on an accelerator; at
  most 1/32 of a device's `rows` (no longer than a class where the index pays)."""
  platform = platform or jax.default_backend()
  budget = 2 ** 16 if platform == 'cpu' else 2 ** 18
  return int(max(16, min(budget // max(batch, 1), rows // 32)))


def _call(features, indices, bank, bank_labels, momentum, update, temperature, margin, mesh,
          chunk_size, matmul_dtype, kernel, index):
  if kernel not in ('xla', 'pallas'):
    raise ValueError(f"NCA kernel {kernel!r}: use 'xla' or 'pallas'")
  batch = features.shape[0]
  opts = KernelOptions(temperature=float(temperature), margin=float(margin), mesh=mesh,
                       chunk_size=int(chunk_size or default_chunk_size(batch)),
                       matmul_dtype=jnp.dtype(matmul_dtype), update=update, kernel=kernel,
                       class_window=(default_class_window(batch, bank.shape[0] // mesh.size)
                                     if index is not None else 0))
  return _streaming(features, indices, bank, bank_labels, momentum, index, opts)


def streaming_nca_loss(features, indices, bank, bank_labels, *, temperature, margin=0.0, mesh,
                       chunk_size=None, matmul_dtype=jnp.float32, kernel='xla', class_index=None):
  """The NCA loss of docs/METHOD.md, equal to `nca_loss`, in one streaming pass over a row-sharded
  bank that also yields the feature gradient. `bank` (N, D) and `bank_labels` (N,) are sharded
  by rows over `mesh`'s data axis; `features` (B, D) and `indices` (B,) are replicated by it.
  `matmul_dtype=jnp.bfloat16` runs both matrix products in bfloat16 with float32 accumulation.
  `chunk_size` (bank rows per step of the scan) defaults to `default_chunk_size(B)`.
  `kernel='pallas'` walks each device's rows in one Pallas kernel (`nca_pallas.py`; GPUs).
  `class_index` (`class_index(bank_labels, mesh)`): the same-class sums read only each
  example's class's rows; the pass over the whole bank then sums the other-class rows alone
  (with many classes, about a third less work: BENCHMARKS.md). Same loss and gradient.
  """
  return _call(features, indices, bank, bank_labels, 0.0, False, temperature, margin, mesh,
               chunk_size, matmul_dtype, kernel, class_index)[0]


def nca_step(features, indices, bank, bank_labels, momentum, *, temperature, margin=0.0, mesh,
             chunk_size=None, matmul_dtype=jnp.float32, kernel='xla', class_index=None):
  """One training step's NCA work: (loss, bank after `bank.update`), in one pass.

  The loss, and its gradient (into `features` only), are those of `nca_loss` against the bank
  before the update; the returned bank is `bank.update(bank, indices, features, momentum)`,
  each row written by the device that holds it. Donate the bank to the enclosing jit and the
  update happens in place. The batch's indices must be distinct (as in any epoch).
  `class_index` as in `streaming_nca_loss`.
  """
  return _call(features, indices, bank, bank_labels, momentum, True, temperature, margin, mesh,
               chunk_size, matmul_dtype, kernel, class_index)
