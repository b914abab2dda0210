"""The package's layers: each module imports only modules of the layers below it (README, "How
it is built", lists them bottom up), and nothing in snca_jax/ imports configs/, edits
sys.path, or keeps state for tests."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom up. A package's modules may import each other; a module may import any module of an
# earlier layer, none of its own layer (but its package's) or of a later one.
LAYERS = (
    ('errors', 'schema', 'mesh', 'distributed', 'metrics', 'lookahead', 'hardware'),
    ('cli', 'models', 'optim', 'stop'),
    ('data',),
    ('validate', 'bank', 'nca_pallas', 'cpu_select'),
    ('nca', 'knn', 'state'),
    ('checkpoint', 'step'),
    ('evaluators',),
    ('evaluate',),
    ('train', 'convert'),
)


def _modules():
  """{module path relative to snca_jax, dotted: its imports of snca_jax modules}."""
  out = {}
  for root, _, files in os.walk(os.path.join(ROOT, 'snca_jax')):
    for f in files:
      if not f.endswith('.py'):
        continue
      path = os.path.join(root, f)
      name = os.path.relpath(path, os.path.join(ROOT, 'snca_jax'))[:-3].replace(os.sep, '.')
      tree = ast.parse(open(path).read())
      imports = set()
      for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
          if node.module == 'snca_jax':
            imports |= {a.name for a in node.names}
          elif node.module.startswith('snca_jax.'):
            imports.add(node.module[len('snca_jax.'):])
          elif node.module.split('.')[0] == 'configs':
            imports.add('configs')
        elif isinstance(node, ast.Import):
          imports |= {a.name[len('snca_jax.'):] if a.name.startswith('snca_jax.') else
                      a.name for a in node.names if a.name.split('.')[0] in ('snca_jax',
                                                                               'configs')}
      out[name] = (imports, open(path).read())
  return out


def _layer(name: str) -> int:
  top = name.split('.')[0]
  for i, layer in enumerate(LAYERS):
    if top in layer:
      return i
  raise AssertionError(f'snca_jax/{name.replace(".", "/")}.py is in no layer of LAYERS')


def test_every_import_looks_down():
  bad = []
  for name, (imports, _) in _modules().items():
    if name.endswith('__init__') and name.count('.') == 0:
      continue
    for dep in imports:
      assert dep != 'configs', f'snca_jax/{name}.py imports configs/'
      if dep.split('.')[0] == name.split('.')[0]:      # within its own package
        continue
      if _layer(dep) >= _layer(name):
        bad.append(f'{name} -> {dep}')
  assert not bad, bad


def test_no_sys_path_edits_or_test_state_in_the_package():
  for name, (_, text) in _modules().items():
    assert 'sys.path' not in text, name
    assert 'TRACES' not in text, name
