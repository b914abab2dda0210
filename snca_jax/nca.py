"""The NCA objective against the augmented memory (SPEC.md, "Memory bank" and "NCA loss").

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

The bank is state, not a parameter: `nca_loss` stops its gradient, so the network's gradient
flows only through `features`.
"""

import jax
import jax.numpy as jnp

from snca_jax.models import l2_normalize

PAD_LABEL = -1


def init_bank(key, num_rows: int, dim: int, dtype=jnp.float32):
  """Uniform in [-s, s] with s = 1 / sqrt(dim / 3), not normalised (as the original)."""
  stdv = 1.0 / (dim / 3.0) ** 0.5
  return jax.random.uniform(key, (num_rows, dim), dtype, minval=-stdv, maxval=stdv)


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
  """log p_i of SPEC.md and whether p_i > 0, both of shape (B,).

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
  valid = jnp.isfinite(log_pos)
  log_p = jnp.where(valid, log_pos_m - jnp.where(valid, log_z, 0.0), 0.0)
  return log_p, valid


def nca_loss(features, indices, bank, bank_labels, *, temperature, margin=0.0):
  """The NCA loss of SPEC.md (a scalar), against the bank before this step's update."""
  log_p, valid = nca_log_probs(features, indices, bank, bank_labels,
                               temperature=temperature, margin=margin)
  return -jnp.sum(jnp.where(valid, log_p, 0.0)) / features.shape[0]


def update_bank(bank, indices, features, momentum):
  """bank[i] <- normalize(momentum * bank[i] + (1 - momentum) * f_i) for every batch row."""
  features = jax.lax.stop_gradient(features).astype(bank.dtype)
  rows = bank[indices]
  new = l2_normalize(momentum * rows + (1.0 - momentum) * features)
  return bank.at[indices].set(new, unique_indices=False)
