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

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from snca_jax import bank as bank_lib
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
# ---------------------------------------------------------------------------------------------

def _online_update(carry, s, pos, neg, rows, matmul_dtype):
  """Folds one chunk's scores `s` (B, C) into the running (max, sum, row sum) of the same-class
  (`pos`) and other-class (`neg`) entries. One exp per score, one (2B, C) x (C, D) product."""
  m = carry[0]                                                    # (2, B)
  chunk_max = jnp.stack([jnp.max(jnp.where(pos, s, -jnp.inf), axis=1),
                         jnp.max(jnp.where(neg, s, -jnp.inf), axis=1)])
  m_new = jnp.maximum(m, chunk_max)
  m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  scale = jnp.exp(m - m_safe)                                     # 0 while m is -inf
  e = jnp.exp(s - jnp.where(pos, m_safe[0][:, None], m_safe[1][:, None]))
  e = jnp.stack([jnp.where(pos, e, 0.0), jnp.where(neg, e, 0.0)])   # (2, B, C)
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


def _device_pass(features, indices, bank, bank_labels, momentum, opts: KernelOptions):
  """One device: its rows of the bank -> global (m, l, G) for same- and other-class rows (m is
  -inf exactly for examples without any such row), and its rows of the bank after the step.

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
    return _online_update(carry, s, present & same, present & ~same, rows_c, opts.matmul_dtype)

  init = (jnp.full((2, batch), -jnp.inf), jnp.zeros((2, batch)), jnp.zeros((2, batch, dim)))
  covered = nca_pallas.covered_rows(batch, rows) if opts.kernel == 'pallas' else 0
  if covered:      # the leading rows in one Pallas kernel, the few after them as below
    init = nca_pallas.partials(queries, labels, jnp.where(mine, local, -1), bank, scan_labels,
                               matmul_dtype=opts.matmul_dtype)
  if covered < rows:
    m, l, g = bank_lib.scan_chunks(
        lambda carry, r, fresh, *chunks: fold(carry, r + covered, fresh, *chunks), init,
        (bank[covered:], scan_labels[covered:]), opts.chunk_size)
  else:
    m, l, g = init
  m, l, g = _combine(m, l, g)
  if opts.update:   # the batch's own rows, before the update, each example's own excluded
    old_c = old.astype(opts.matmul_dtype)
    s = jnp.einsum('bd,cd->bc', queries, old_c, preferred_element_type=jnp.float32)
    present = indices[None, :] != indices[:, None]
    same = labels[None, :] == labels[:, None]
    m, l, g = _online_update((m, l, g), s, present & same, present & ~same, old_c,
                             opts.matmul_dtype)
  return (m[0], l[0], g[0]), (m[1], l[1], g[1]), bank


def _loss_and_grad(features, indices, bank, bank_labels, momentum, opts: KernelOptions):
  features = features.astype(jnp.float32)
  temperature = opts.temperature

  def per_device(f, idx, b, lab, mu):
    (m_p, l_p, g_p), (m_n, l_n, g_n), b = _device_pass(f, idx, b, lab, mu, opts)
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
                       in_specs=(P(), P(), P(DATA), P(DATA), P()),
                       out_specs=(P(), P(), P(DATA)), check_vma=False)(
                           features, indices, bank, bank_labels,
                           jnp.asarray(momentum, bank.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _streaming(features, indices, bank, bank_labels, momentum, opts: KernelOptions):
  loss, _, bank = _loss_and_grad(features, indices, bank, bank_labels, momentum, opts)
  return loss, bank


def _streaming_fwd(features, indices, bank, bank_labels, momentum, opts: KernelOptions):
  loss, grad, bank = _loss_and_grad(features, indices, bank, bank_labels, momentum, opts)
  return (loss, bank), grad.astype(features.dtype)


def _streaming_bwd(opts, grad, cotangents):
  del opts
  # Only the loss has a gradient, and only into the features.
  return cotangents[0] * grad, None, None, None, None


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


def _call(features, indices, bank, bank_labels, momentum, update, temperature, margin, mesh,
          chunk_size, matmul_dtype, kernel):
  if kernel not in ('xla', 'pallas'):
    raise ValueError(f"NCA kernel {kernel!r}: use 'xla' or 'pallas'")
  opts = KernelOptions(temperature=float(temperature), margin=float(margin), mesh=mesh,
                       chunk_size=int(chunk_size or default_chunk_size(features.shape[0])),
                       matmul_dtype=jnp.dtype(matmul_dtype), update=update, kernel=kernel)
  return _streaming(features, indices, bank, bank_labels, momentum, opts)


def streaming_nca_loss(features, indices, bank, bank_labels, *, temperature, margin=0.0, mesh,
                       chunk_size=None, matmul_dtype=jnp.float32, kernel='xla'):
  """The NCA loss of docs/METHOD.md, equal to `nca_loss`, in one streaming pass over a row-sharded
  bank that also yields the feature gradient. `bank` (N, D) and `bank_labels` (N,) are sharded
  by rows over `mesh`'s data axis; `features` (B, D) and `indices` (B,) are replicated by it.
  `matmul_dtype=jnp.bfloat16` runs both matrix products in bfloat16 with float32 accumulation.
  `chunk_size` (bank rows per step of the scan) defaults to `default_chunk_size(B)`.
  `kernel='pallas'` walks each device's rows in one Pallas kernel (`nca_pallas.py`; GPUs).
  """
  return _call(features, indices, bank, bank_labels, 0.0, False, temperature, margin, mesh,
               chunk_size, matmul_dtype, kernel)[0]


def nca_step(features, indices, bank, bank_labels, momentum, *, temperature, margin=0.0, mesh,
             chunk_size=None, matmul_dtype=jnp.float32, kernel='xla'):
  """One training step's NCA work: (loss, bank after `bank.update`), in one pass.

  The loss, and its gradient (into `features` only), are those of `nca_loss` against the bank
  before the update; the returned bank is `bank.update(bank, indices, features, momentum)`,
  each row written by the device that holds it. Donate the bank to the enclosing jit and the
  update happens in place. The batch's indices must be distinct (as in any epoch).
  """
  return _call(features, indices, bank, bank_labels, momentum, True, temperature, margin, mesh,
               chunk_size, matmul_dtype, kernel)
