"""What this host's CPU can do, where a choice depends on it."""

import functools


@functools.cache
def bfloat16_in_hardware() -> bool:
  """Whether this host's CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX-BF16), as
  /proc/cpuinfo says: there a bfloat16 matrix product takes about half a float32 one's time
  in XLA (BENCHMARKS.md, kNN search); elsewhere it may take longer."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('flags'):
          flags = line.split()
          return 'avx512_bf16' in flags or 'amx_bf16' in flags
  except OSError:
    pass
  return False
