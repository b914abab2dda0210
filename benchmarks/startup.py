"""How long the project's commands take to start: their imports, each in a fresh process.

    python benchmarks/startup.py [--repeats 7] [--against DIR]

Every run of train.py or eval_knn.py pays this before its first step, and so does each of the
few dozen processes that `make test` starts. Prints the median wall and CPU seconds of
`import train`, `import eval_knn` and of the heaviest packages alone, then where `import train`
spends its time (`python -X importtime`, each module's own time summed by top-level package).

--against DIR runs the same beside this environment with DIR ahead on the path: another version
of a package, installed there with `pip install --target DIR --no-deps PACKAGE==VERSION`.
"""

import argparse
import collections
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STATEMENTS = ('import train', 'import eval_knn', 'import jax', 'import numpy; import ml_dtypes',
              'import orbax.checkpoint', 'import tensorflow_datasets')
VERSIONS = ('ml_dtypes', 'numpy', 'jax')


def environment(extra_path):
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (extra_path, ROOT, env.get('PYTHONPATH'))
                                      if p)
  return env


def timed(statement, env):
  """(wall seconds, CPU seconds) of a fresh interpreter running `statement`."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  subprocess.run([sys.executable, '-c', statement], cwd=ROOT, env=env, check=True,
                 stdout=subprocess.DEVNULL)
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def import_shares(statement, env):
  """{top-level package: seconds of its modules' own import time} for `statement`."""
  r = subprocess.run([sys.executable, '-X', 'importtime', '-c', statement], cwd=ROOT, env=env,
                     check=True, capture_output=True, text=True)
  shares = collections.Counter()
  for line in r.stderr.splitlines():
    if not line.startswith('import time:') or 'imported package' in line:
      continue
    own, _, name = line[len('import time:'):].split('|')
    shares[name.strip().split('.')[0]] += int(own) / 1e6
  return shares


def versions(env):
  code = ('import importlib.metadata as m; print(" ".join(f"{p} {m.version(p)}" for p in '
          f'{VERSIONS!r}))')
  return subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, check=True,
                        capture_output=True, text=True).stdout.strip()


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--repeats', type=int, default=7)
  p.add_argument('--against', help='a directory put ahead on the path for a second column')
  p.add_argument('--smoke', action='store_true', help='to check that it runs')
  args = p.parse_args()
  statements, breakdown = STATEMENTS, 'import train'
  if args.smoke:
    print('smoke run: one repeat of the cheapest statement, to check that the benchmark runs; '
          'its figures mean nothing')
    args.repeats, statements = 1, STATEMENTS[3:4]
    breakdown = statements[0]
  from snca_jax import distributed
  settings = [('this environment', environment(None))]
  if args.against:
    settings.append((f'--against {args.against}', environment(os.path.abspath(args.against))))
  print(f'startup of a fresh process, CPU x{os.cpu_count()} ({distributed.processor()}), '
        f'median of {args.repeats}; turns alternate between the settings')
  for name, env in settings:
    print(f'  {name}: {versions(env)}')
  times = {(s, name): [] for s in statements for name, _ in settings}
  for _ in range(args.repeats):
    for statement in statements:
      for name, env in settings:
        times[statement, name].append(timed(statement, env))
  print(f"{'':34s}" + ''.join(f'{name[:24]:>26s}' for name, _ in settings))
  print(f"{'statement':34s}" + f"{'wall s':>14s}{'CPU s':>12s}" * len(settings))
  for statement in statements:
    row = ''
    for name, _ in settings:
      runs = times[statement, name]
      row += (f'{statistics.median(w for w, _ in runs):14.2f}'
              f'{statistics.median(c for _, c in runs):12.2f}')
    print(f'{statement:34s}{row}')
  for name, env in settings:
    shares = import_shares(breakdown, env)
    top = ', '.join(f'{k} {v:.2f}' for k, v in shares.most_common(8))
    print(f'`{breakdown}`, own import time by package ({name}), s: total '
          f'{sum(shares.values()):.2f}; {top}')


if __name__ == '__main__':
  main()
