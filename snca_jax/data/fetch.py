"""Fetching data: Fashion-MNIST's download (behind a quick network probe), and the multi-host
barrier under which any dataset is prepared once."""

import jax
from jax.experimental import multihost_utils

from snca_jax.data import fashion_mnist
from snca_jax.errors import DataError


def prepare_once(is_prepared, prepare):
  """Prepares a dataset on process 0 while the others wait (the filesystem is shared)."""
  if jax.process_count() > 1:
    if jax.process_index() == 0 and not is_prepared():
      prepare()
    multihost_utils.sync_global_devices('snca_jax: dataset prepared')
  if not is_prepared():
    prepare()


def reachable(url: str, timeout: float = 5.0) -> bool:
  """Whether `url`'s host accepts a connection within `timeout` seconds (name lookup
  included), so that a machine without the network fails at once, not after retries."""
  import socket
  import threading
  import urllib.parse
  host = urllib.parse.urlparse(url).hostname
  result = []

  def connect():
    try:
      socket.create_connection((host, 443), timeout=timeout).close()
      result.append(True)
    except OSError:
      pass

  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(result)


def prepare_fashion_mnist(builder, idx_dir):
  """Prepares `builder` (a FashionMnistIdx) from the IDX files in `idx_dir`, or downloads them
  where it has none; a DataError where neither can be done."""
  if not fashion_mnist.has_idx_files(idx_dir) and not (
      builder.download and reachable(fashion_mnist.URL)):
    why = ('downloading is off (data.download=False)' if not builder.download else
           f'{fashion_mnist.URL} cannot be reached')
    raise DataError(
        f'Fashion-MNIST not found in {idx_dir}, and {why}: install Debian\'s '
        f'dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set '
        f'--config.data.idx_dir to a folder holding the four IDX files')
  try:
    builder.download_and_prepare(file_format='array_record')
  except Exception as e:  # no IDX files and no network
    raise DataError(
        f'Fashion-MNIST not found in {idx_dir} and could not be downloaded ({type(e).__name__}'
        f'): install Debian\'s dataset-fashion-mnist (apt-get install dataset-fashion-mnist) '
        f'or set --config.data.idx_dir to a folder holding the four IDX files') from e
