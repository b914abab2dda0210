"""The environment `make` builds: exactly one PIL, the one make says it installed.

Pillow-SIMD and Pillow install the same `PIL` package; with both installed, whichever pip
wrote last owns the files, and `import PIL` is not the build the README and the benchmarks
name. make records its choice in <venv>/.pillow.
"""

import importlib.metadata
import os
import sys

import PIL


def pillow_distributions():
  names = {}
  for dist in importlib.metadata.distributions():
    name = (dist.metadata['Name'] or '').lower()
    if name in ('pillow', 'pillow-simd'):
      names[name] = dist.version
  return names


def test_exactly_one_pillow_and_it_is_the_one_imported():
  found = pillow_distributions()
  assert len(found) == 1, f'both Pillow and Pillow-SIMD are installed: {found}'
  (name, version), = found.items()
  assert PIL.__version__ == version, (name, version, PIL.__version__)
  record = os.path.join(sys.prefix, '.pillow')
  if os.path.exists(record):                     # a venv that make built
    with open(record) as f:
      assert f.read().strip().lower() == name
