"""The kNN search's selection on the CPU as an XLA custom call (`cpu_select.cc`).

XLA's CPU top-k is a partial sort on one thread whose cost grows with k, and it made the
search on a CPU slower than faiss's for K of 200 and more (BENCHMARKS.md, kNN search). The
kernel here keeps every query's best rows as XLA scores the bank chunk by chunk: a threshold
rules out nearly every row in a vectorised scan, and the few that pass are kept in a reservoir
cut, when full, at a pivot sampled from it, and radix-sorted at the end, on XLA's intra-op
threads. A second call (`rescore`) scores the rows selected with bfloat16 products again in
float32 and sorts them again. The products, the sharding and the merge across devices stay
JAX's; accelerators never call it.

The kernel is compiled on first use with the host's C++ compiler (`$CXX`, else `c++`) for this
CPU (`-march=native`), into `$XDG_CACHE_HOME/snca_jax` (default `~/.cache/snca_jax`), named by
a hash of its source, the flags, jaxlib's version and the CPU, so a changed source or another
CPU builds again. Where it cannot be built or loaded, `available()` says False (once, on
stderr, why) and the search keeps XLA's top-k. `SNCA_JAX_CPU_SELECT=0` turns it off.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

TARGET = 'snca_cpu_select'
RESCORE_TARGET = 'snca_cpu_rescore'
SOURCE = os.path.join(os.path.dirname(__file__), 'cpu_select.cc')
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w')


def _cpu() -> str:
  """This host's CPU model and flags, which `-march=native` compiles for."""
  try:
    with open('/proc/cpuinfo') as f:
      return ''.join(line for line in f if line.startswith(('model name', 'flags')))[:4096]
  except OSError:
    return ''


def _cache_dir() -> str:
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'snca_jax')


def _build(flags=FLAGS) -> str:
  """The kernel's shared library, compiled with `flags` into the cache unless there already
  (the tests build the scans this CPU's `-march=native` leaves out with other flags)."""
  compiler = os.environ.get('CXX', 'c++')
  flags = tuple(flags)
  with open(SOURCE, 'rb') as f:
    source = f.read()
  digest = hashlib.sha256(b'\0'.join([
      source, ' '.join((compiler,) + flags).encode(), jaxlib.__version__.encode(),
      _cpu().encode()])).hexdigest()[:16]
  path = os.path.join(_cache_dir(), f'cpu_select-{digest}.so')
  if os.path.exists(path):
    return path
  if shutil.which(compiler) is None:
    raise RuntimeError(f'no C++ compiler {compiler!r} (set $CXX)')
  os.makedirs(_cache_dir(), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=_cache_dir())   # then renamed: concurrent
  os.close(fd)                                                   # builds never meet half a file
  try:
    run = subprocess.run([compiler, *flags, '-I', jax.ffi.include_dir(), SOURCE, '-o', tmp],
                         capture_output=True, text=True)
    if run.returncode:
      raise RuntimeError(f'{compiler} failed: {run.stderr.strip()[-500:]}')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _register(flags=FLAGS, suffix=''):
  """Builds the kernel with `flags` (`_build`), loads it and registers its two handlers with
  XLA for the CPU as TARGET + suffix and RESCORE_TARGET + suffix."""
  library = ctypes.CDLL(_build(flags))
  for target, handler in ((TARGET, library.SncaCpuSelect),
                          (RESCORE_TARGET, library.SncaCpuRescore)):
    jax.ffi.register_ffi_target(target + suffix, jax.ffi.pycapsule(handler), platform='cpu')


@functools.cache
def available() -> bool:
  """Whether the kernel is built, loaded and registered with XLA for the CPU."""
  if os.environ.get('SNCA_JAX_CPU_SELECT', '1') == '0':
    return False
  try:
    _register()
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    print(f'snca_jax: the kNN search on the CPU keeps XLA\'s top-k, slower for large K: its '
          f'selection kernel could not be built ({e})', file=sys.stderr)
    return False
  return True


def slots(k: int) -> int:
  """A query's reservoir: its k best and room for as many rows again (at least 256) before a
  compaction."""
  return k + max(k, 256)


def init(queries: int, k: int):
  """The empty selection of `queries` queries: (keys (queries, 2 x slots) uint32, meta
  (queries, 2) int32: slots filled, the threshold's bits)."""
  keys = jnp.zeros((queries, 2 * slots(k)), jnp.uint32)
  meta = jnp.tile(jnp.array([0, np.float32(-np.inf).view(np.int32)], jnp.int32), (queries, 1))
  return keys, meta


def fold(state, scores, labels, start, last, *, k):
  """`state` (`init`) with the (T, C) float32 `scores` of rows start + [0, C) folded in, those
  whose `labels` are negative left out (padding, or rows folded before), in the order of the
  rows (ties go to the row folded first); `last`: the selection ends here (its k best sorted,
  best first, into the first k slots)."""
  bounds = jnp.stack([start, last]).astype(jnp.int32)
  return jax.ffi.ffi_call(
      TARGET, tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in state),
      input_output_aliases={2: 0, 3: 1})(scores, labels, *state, bounds, k=np.int64(k))


def result(state, k: int):
  """The k best of a finished selection: (scores (T, k) float32, rows (T, k) int32), best
  first, ties to the lower row; -inf (row 0) where fewer than k rows were taken."""
  keys = state[0][:, :2 * k].reshape(-1, k, 2)
  low, high = keys[..., 0], keys[..., 1]                # little-endian halves of the keys
  sign = jnp.uint32(0x80000000)
  bits = jnp.where(high >= sign, high & ~sign, ~high)
  return (jax.lax.bitcast_convert_type(bits, jnp.float32),
          jax.lax.bitcast_convert_type(~low, jnp.int32))


def rescore(queries, bank, scores, rows):
  """The rows `rows` (T, k) of `bank` (N, D) that each of `queries` (T, D) selected by other
  `scores` (bfloat16 products), scored again in float32 and sorted again: (scores (T, k)
  float32, rows (T, k) int32), best first, ties to the lower row; entries at -inf in `scores`
  (no row) stay -inf, last."""
  return jax.ffi.ffi_call(
      RESCORE_TARGET, (jax.ShapeDtypeStruct(scores.shape, jnp.float32),
                       jax.ShapeDtypeStruct(rows.shape, jnp.int32)))(
          queries.astype(jnp.float32), bank.astype(jnp.float32), scores, rows)
