"""The paper's claims on Fashion-MNIST, one command: NCA beside the softmax baseline, over seeds.

    python experiments.py --workdir runs/experiments            # everything, seeds 0, 1, 2
    python experiments.py --workdir runs/experiments --only fewshot,fewshot_rotated --seeds 0
    python experiments.py --workdir runs/quick --override batch_size=16 --override model=tiny_resnet

Trains, for each experiment and each seed, configs/fashion_mnist.py with the NCA loss and
with the paper's softmax baseline (`:softmax`, the same backbone with its classifier on the
pooled features, evaluated on those features), and for all classes also the softmax variant
that embeds with an added 128-d layer (`:softmax_embedding`); evaluates every run the same
way; and writes into the workdir `results.md` (each metric's mean and standard deviation
over the seeds, and NCA's difference from the baseline, called a finding only where Welch's
t-test over the seeds gives p < 0.05), `results.json` (every run's figures) and `results.png`:
  knn              all 10 classes; weighted kNN (K=30) top-1 against the training set
                   embedded again (and, for NCA, against its bank)
  subcategory      trained on 4 coarse classes (configs/fashion_mnist.py COARSE), weighted kNN
                   top-1 on the 10 fine ones, also without Bag (a coarse class alone), beside
                   the chance floor of a rule that knows the coarse class
  fewshot          trained on classes 0-4; on classes 5-9, 5-way episodes (the five) and 3-way
                   episodes (three of the five drawn per episode), 1 and 5 shots, nearest
                   support example and nearest class mean, and weighted kNN against all their
                   training images
  fewshot_rotated  the same with the split rotated: trained on 5-9, tested on 0-4
Runs that already finished in the workdir are evaluated again, not retrained.
"""

import json
import os
import time

import numpy as np
from absl import app
from absl import flags

from configs import fashion_mnist
from snca_jax import cli
from snca_jax import evaluate
from snca_jax import schema
from snca_jax import train

EXPERIMENTS = {'knn': '', 'subcategory': 'coarse', 'fewshot': 'novel',
               'fewshot_rotated': 'novel_rotated'}
# What each experiment trains: NCA and the paper's baseline; all classes also the variant.
MODELS = ('nca', 'softmax', 'softmax_embedding')
COLUMNS = {'nca': 'NCA', 'softmax': 'softmax (pooled features)',
           'softmax_embedding': 'softmax (128-d layer)'}


def models_of(experiment):
  return MODELS if experiment == 'knn' else MODELS[:2]


def metrics(experiment):
  """(result key, row name) of an experiment's rows."""
  if experiment == 'knn':
    return [('top1', 'kNN top-1, all classes')]
  if experiment == 'subcategory':
    return [('subcategory/top1', 'kNN top-1 on 10 fine classes, trained on 4 coarse'),
            ('subcategory/top1_without_singletons', '... the same without Bag (a coarse class '
             'alone)'),
            ('subcategory/chance_floor', '... chance floor: the coarse class right, the fine '
             'one guessed'),
            ('subcategory/chance_floor_without_singletons', '... that floor without Bag')]
  split = 'classes 5-9' if experiment == 'fewshot' else 'classes 0-4 (rotated)'
  rows = []
  for ways in (5, 3):
    for shots in (1, 5):
      for rule, name in (('nearest', 'nearest example'), ('mean', 'nearest class mean')):
        rows.append((f'fewshot/{ways}way{shots}shot_{rule}',
                     f'novel {split}, {ways}-way {shots}-shot, {name}'))
  rows.append(('fewshot/knn_top1', f'novel {split}, kNN top-1 against their training images'))
  return rows


def summary(values):
  """(mean, standard deviation over the seeds or None for one seed, n)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None), len(v)


def difference(a, b):
  """NCA's mean minus the baseline's, and Welch's two-sided t-test p-value for it (None for a
  single seed): a finding where p < 0.05, the difference beyond the seed-to-seed spread."""
  (ma, sa, na), (mb, sb, nb) = a, b
  diff = ma - mb
  if sa is None or sb is None:
    return diff, None
  if sa == 0 and sb == 0:
    return diff, 0.0 if diff else 1.0
  from scipy import stats
  return diff, float(stats.ttest_ind_from_stats(ma, sa, na, mb, sb, nb, equal_var=False).pvalue)


def table(runs, chosen):
  """runs: {(experiment, model, seed): result dict} -> (Markdown lines, chart rows)."""
  fmt = lambda s: '-' if s is None else (
      f'{100 * s[0]:.2f}%' + (f' +- {100 * s[1]:.2f}' if s[1] is not None else ''))
  head = ['metric'] + [COLUMNS[m] for m in MODELS] + ['NCA - softmax']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  chart = []
  for experiment in chosen:
    for key, name in metrics(experiment):
      cells = {}
      for model in models_of(experiment):
        values = [r[key] for (e, m, _), r in sorted(runs.items()) if (e, m) == (experiment,
                                                                                  model)]
        cells[model] = summary(values) if values else None
      diff = '-'
      if cells.get('nca') and cells.get('softmax') and 'floor' not in key:
        d, p = difference(cells['nca'], cells['softmax'])
        diff = f'{100 * d:+.2f}' + (' (one seed)' if p is None else
                                    f' (finding, p={p:.3f})' if p < 0.05 else
                                    f' (within the spread, p={p:.2f})')
        chart.append((name, cells['nca'][0], cells['softmax'][0]))
      lines.append(f'| {name} | ' + ' | '.join(fmt(cells.get(m)) for m in MODELS) +
                   f' | {diff} |')
    if experiment == 'knn':
      bank = [r['top1'] for (e, m, _), r in sorted(runs.items()) if (e, m) == ('knn',
                                                                             'nca_bank')]
      if bank:
        lines.append(f'| kNN top-1, all classes, against the NCA bank | {fmt(summary(bank))} |'
                     ' - | - | - |')
  return lines, chart


def bar_chart(path, rows):
  """rows: (metric, nca, softmax) with values in [0, 1] -> a PNG of grouped bars."""
  from PIL import Image, ImageDraw
  width, bar, gap, left, top = 1000, 16, 14, 480, 40
  height = top + len(rows) * (2 * bar + gap) + 40
  image = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(image)
  draw.text((10, 10), 'Fashion-MNIST: NCA (blue) and the softmax baseline (orange), same '
            'backbone and schedule; means over seeds', fill='black')
  scale = width - left - 80
  for i, (name, nca, softmax) in enumerate(rows):
    y = top + i * (2 * bar + gap)
    draw.text((10, y + bar - 6), name[:75], fill='black')
    for j, (value, colour) in enumerate(((nca, (31, 119, 180)), (softmax, (255, 127, 14)))):
      y0 = y + j * bar
      draw.rectangle((left, y0, left + int(scale * value), y0 + bar - 2), fill=colour)
      draw.text((left + int(scale * value) + 4, y0 + 2), f'{100 * value:.1f}%', fill='black')
  draw.line((left, top - 4, left, height - 30), fill='black')
  image.save(path)


FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Where the runs, results.md and results.png go.',
                    required=True)
flags.DEFINE_list('only', list(EXPERIMENTS), 'Experiments to run: ' + ', '.join(EXPERIMENTS))
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Training seeds of every run.')
flags.DEFINE_integer('epochs', None, 'Epochs of every run (default: the config\'s, 5).')
flags.DEFINE_string('idx_dir', '', 'Fashion-MNIST IDX files (default: Debian\'s).')
flags.DEFINE_string('data_dir', '', 'TFDS data dir (default: ~/tensorflow_datasets).')
flags.DEFINE_multi_string('override', [], 'FIELD=VALUE set on every config, VALUE a Python '
                          'literal or a string (e.g. batch_size=16, model=tiny_resnet, '
                          'keep_best=False).')


def main(argv):
  del argv
  args = FLAGS
  chosen = list(args.only)
  unknown = set(chosen) - set(EXPERIMENTS)
  if unknown:
    raise ValueError(f'unknown experiments {sorted(unknown)}: choose from '
                     f'{", ".join(EXPERIMENTS)}')
  seeds = [int(s) for s in args.seeds]
  os.makedirs(args.workdir, exist_ok=True)
  runs, timings = {}, {}
  for experiment in chosen:
    for model in models_of(experiment):
      for seed in seeds:
        options = ','.join(o for o in (EXPERIMENTS[experiment], model) if o)
        config = fashion_mnist.get_config(options)
        config.data.idx_dir, config.data.data_dir = args.idx_dir, args.data_dir
        config.seed = seed
        if args.epochs:
          config.num_epochs = args.epochs
        for item in args.override:
          schema.override(config, item)
        name = f'{experiment}-{model}-seed{seed}'
        workdir = os.path.join(args.workdir, name)
        t0 = time.time()
        train.train_and_evaluate(config, workdir)
        runs[experiment, model, seed] = evaluate.evaluate_checkpoint(workdir, recompute=True)
        if model == 'nca' and experiment == 'knn':
          runs[experiment, 'nca_bank', seed] = evaluate.evaluate_checkpoint(workdir)
        timings[name] = time.time() - t0
        print(f'{name}: ' + json.dumps({k: v for k, v in runs[experiment, model, seed].items()
                                         if isinstance(v, float)}), flush=True)
  lines, chart = table(runs, chosen)
  total = sum(timings.values())
  lines += ['', f'{len(seeds)} seeds ({", ".join(map(str, seeds))}); mean +- standard '
            f'deviation over them. {len(timings)} runs, {total / 60:.0f} min in all (train and '
            f'evaluate), {total / max(len(timings), 1) / 60:.1f} min a run.']
  with open(os.path.join(args.workdir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(args.workdir, 'results.json'), 'w') as f:
    json.dump({'seeds': seeds, 'minutes': {k: v / 60 for k, v in timings.items()},
               'runs': {f'{e}/{m}/{s}': {k: v for k, v in r.items()
                                         if isinstance(v, (int, float, str))}
                        for (e, m, s), r in runs.items()}}, f, indent=1)
  bar_chart(os.path.join(args.workdir, 'results.png'), chart)
  print('\n'.join(lines))
  print(f'written: {os.path.join(args.workdir, "results.md")}, results.json and results.png')


if __name__ == '__main__':
  app.run(lambda argv: cli.run('experiments.py', lambda: main(argv)),
          flags_parser=cli.flags_parser('experiments.py'))
