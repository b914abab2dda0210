"""Multi-host runs on JAX's own multi-controller runtime (`jax.distributed`).

The same program runs on every host. `initialize` starts the runtime when asked, or when the
environment says this is one process of several:
  - explicit: coordinator address, process count and process id, as flags or as the variables
    SNCA_COORDINATOR_ADDRESS, SNCA_NUM_PROCESSES, SNCA_PROCESS_ID;
  - `--multihost`: JAX detects the cluster itself (Cloud TPU pod slices, SLURM, Open MPI, k8s);
  - automatically under SLURM with more than one task, and on multi-worker Cloud TPU slices.
With none of these it does nothing, and the program runs as a single process.

After it, `jax.devices()` lists every device of every host, and the mesh's data axis spans
them all (snca_jax.mesh).
"""

import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def _cluster_environment() -> bool:
  slurm_tasks = int(os.environ.get('SLURM_NTASKS', '1') or 1)
  if 'SLURM_JOB_ID' in os.environ and slurm_tasks > 1:
    return True
  workers = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return ',' in workers or 'MEGASCALE_COORDINATOR_ADDRESS' in os.environ


def initialize(*, multihost: bool = False, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Starts jax.distributed where asked or where the environment says so; True if it did."""
  env = os.environ
  address = coordinator_address or env.get('SNCA_COORDINATOR_ADDRESS')
  count = num_processes if num_processes is not None else env.get('SNCA_NUM_PROCESSES')
  pid = process_id if process_id is not None else env.get('SNCA_PROCESS_ID')
  if address or count is not None or pid is not None:
    if not (address and count is not None and pid is not None):
      raise ValueError('a multi-process run needs all three of --coordinator_address, '
                       '--num_processes and --process_id (or SNCA_COORDINATOR_ADDRESS, '
                       'SNCA_NUM_PROCESSES, SNCA_PROCESS_ID)')
    jax.distributed.initialize(coordinator_address=address, num_processes=int(count),
                               process_id=int(pid))
    return True
  if multihost or _cluster_environment():
    jax.distributed.initialize()
    return True
  return False


def local_cores() -> int:
  """The CPU cores this process may run on (its affinity: a SLURM task's or a container's
  share, not the whole host's)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def processor() -> str:
  """This host's CPU model, as /proc/cpuinfo names it (timings name it: the project's machines
  differ by about 2x in XLA's CPU speed)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return 'unknown processor'


def to_host(x) -> np.ndarray:
  """A global jax.Array as one numpy array on every process (gathered across hosts if needed);
  a host array as it is."""
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def put_global(x: np.ndarray, sharding) -> jax.Array:
  """A host array, identical on every process, placed as `sharding` over all devices."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_process_local(batch: dict, sharding, keys) -> dict:
  """This process's share of a global batch (host arrays, the same rows on every call's
  process order) -> global arrays placed as `sharding`, for the fields `keys`."""
  return {k: jax.make_array_from_process_local_data(sharding, batch[k]) for k in keys}
