"""Checksums: `checksums.json`, the size and SHA-256 of every file of the step, written by
process 0 once Orbax has finished the step (in a thread, while training goes on), to a temporary file that is
renamed. Every restore checks them first (in parallel, in 4 MiB chunks: ~1 GB/s and more), so a
checkpoint damaged on disk ends in one CheckpointError naming the file, not in figures computed
from a garbage bank. A step without the file (written before it existed, or killed in the
instant between Orbax's rename and the file's) restores unchecked. Orbax 0.12.8 checksums only
the shard index of zarr3 arrays, not the data, so it cannot do this itself.
"""

import concurrent.futures
import hashlib
import json
import os

from snca_jax.errors import CheckpointError

CHECKSUMS = 'checksums.json'
RESUME_ADVICE = 'move it away to resume from an earlier one, or use a new --workdir'
_CHUNK = 1 << 22


class ChecksumError(CheckpointError):
  """A file of a checkpoint that is not as it was written. `advice(what_to_do)` is the same
  message with another remedy (evaluation says: evaluate an earlier step)."""

  def __init__(self, step_dir: str, path: str, problem: str, what_to_do: str = RESUME_ADVICE):
    self.step_dir, self.path, self.problem = step_dir, path, problem
    super().__init__(f'checkpoint {step_dir} is damaged and cannot be read: {path} {problem}: '
                     f'{what_to_do}')

  def advice(self, what_to_do: str) -> 'ChecksumError':
    return ChecksumError(self.step_dir, self.path, self.problem, what_to_do)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  buf = bytearray(_CHUNK)
  view = memoryview(buf)
  with open(path, 'rb', buffering=0) as f:
    while n := f.readinto(buf):
      h.update(view[:n])          # hashlib lets go of the GIL: files hash in parallel
  return h.hexdigest()


def _digests(root: str, names) -> list:
  names = list(names)
  workers = max(1, min(8, os.cpu_count() or 1, len(names)))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda name: _sha256(os.path.join(root, name)), names))


def _files(step_dir: str) -> list:
  out = []
  for root, dirs, files in os.walk(step_dir):
    dirs.sort()
    for f in sorted(files):
      if root == step_dir and (f == CHECKSUMS or f.startswith('.' + CHECKSUMS)):
        continue
      out.append(os.path.relpath(os.path.join(root, f), step_dir))
  return out


def write_checksums(step_dir: str):
  """`<step_dir>/checksums.json`: size and SHA-256 of every file under `step_dir`."""
  names = _files(step_dir)
  sizes = [os.path.getsize(os.path.join(step_dir, n)) for n in names]
  files = {n: {'size': s, 'sha256': d} for n, s, d in zip(names, sizes, _digests(step_dir, names))}
  tmp = os.path.join(step_dir, f'.{CHECKSUMS}.{os.getpid()}.tmp')
  try:
    with open(tmp, 'w') as f:
      json.dump({'algorithm': 'sha256', 'files': files}, f, indent=0, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, CHECKSUMS))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def verify(step_dir: str) -> bool:
  """Checks the files of `step_dir` against its checksums.json (sizes first, then SHA-256);
  raises ChecksumError naming the first that does not match. False where the step has no
  checksums (a checkpoint written before them): nothing to check."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      files = json.load(f)['files']
    expected = {str(n): (int(e['size']), str(e['sha256'])) for n, e in files.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ChecksumError(step_dir, path, f'cannot be read ({type(e).__name__})') from e
  names = sorted(expected)
  for name in names:
    full = os.path.join(step_dir, name)
    if not os.path.isfile(full):
      raise ChecksumError(step_dir, full, f'is missing (listed in {CHECKSUMS})')
    size = os.path.getsize(full)
    if size != expected[name][0]:
      raise ChecksumError(step_dir, full, f'has {size} bytes where {expected[name][0]} were '
                                          f'written ({CHECKSUMS})')
  for name, digest in zip(names, _digests(step_dir, names)):
    if digest != expected[name][1]:
      raise ChecksumError(step_dir, os.path.join(step_dir, name),
                          f'does not match its SHA-256 in {CHECKSUMS}')
  return True
