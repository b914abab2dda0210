"""The paper's claims on Fashion-MNIST, one command: NCA beside the softmax baseline.

    python experiments.py --workdir runs/experiments            # all three
    python experiments.py --workdir runs/experiments --only fewshot --epochs 5
    python experiments.py --workdir runs/quick --override batch_size=16 --override model=tiny_resnet

Trains, for each experiment, configs/fashion_mnist.py with the NCA loss and with the softmax
baseline (same network, schedule and data), evaluates both the same way, and writes
`results.md` (a Markdown table) and `results.png` (a bar chart) into the workdir:
  knn          all 10 classes; weighted kNN (K=30) top-1 against the training set embedded
               again (and, for NCA, against its bank)
  subcategory  trained on 4 coarse classes (configs/fashion_mnist.py COARSE), weighted kNN
               top-1 on the 10 fine ones
  fewshot      trained on classes 0-4; on classes 5-9, 5-way 1-shot and 5-shot episodes
               (1,000, seed 0; nearest support example and nearest class mean, with 95%
               confidence intervals) and weighted kNN against all their training images
Runs that already finished in the workdir are evaluated again, not retrained.
"""

import json
import os
import time

from absl import app
from absl import flags

from configs import fashion_mnist
from snca_jax import cli
from snca_jax import evaluate
from snca_jax import schema
from snca_jax import train

EXPERIMENTS = {'knn': '', 'subcategory': 'coarse', 'fewshot': 'novel'}


def _row(result, experiment):
  if experiment == 'knn':
    return [('kNN top-1, all classes', result['top1'], None)]
  if experiment == 'subcategory':
    return [('kNN top-1 on 10 fine classes, trained on 4 coarse', result['subcategory/top1'],
             None)]
  rows = []
  for shots in (1, 5):
    for rule, name in (('nearest', 'nearest example'), ('mean', 'nearest class mean')):
      key = f'fewshot/5way{shots}shot_{rule}'
      rows.append((f'novel classes, 5-way {shots}-shot, {name}', result[key],
                   result[key + '_ci95']))
  rows.append(('novel classes, kNN top-1 against their training images',
               result['fewshot/knn_top1'], None))
  return rows


def bar_chart(path, rows):
  """rows: (metric, nca, softmax) with values in [0, 1] -> a PNG of grouped bars."""
  from PIL import Image, ImageDraw
  width, bar, gap, left, top = 900, 16, 14, 380, 40
  height = top + len(rows) * (2 * bar + gap) + 40
  image = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(image)
  draw.text((10, 10), 'Fashion-MNIST: NCA (blue) and softmax (orange), same network and '
            'schedule', fill='black')
  scale = width - left - 80
  for i, (name, nca, softmax) in enumerate(rows):
    y = top + i * (2 * bar + gap)
    draw.text((10, y + bar - 6), name[:60], fill='black')
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
  os.makedirs(args.workdir, exist_ok=True)
  table, timings = [], {}
  for experiment in chosen:
    results = {}
    for loss in ('nca', 'softmax'):
      options = ','.join(o for o in (EXPERIMENTS[experiment], loss) if o)
      config = fashion_mnist.get_config(options)
      config.data.idx_dir, config.data.data_dir = args.idx_dir, args.data_dir
      if args.epochs:
        config.num_epochs = args.epochs
      for item in args.override:
        schema.override(config, item)
      workdir = os.path.join(args.workdir, f'{experiment}-{loss}')
      t0 = time.time()
      train.train_and_evaluate(config, workdir)
      results[loss] = evaluate.evaluate_checkpoint(workdir, recompute=True)
      if loss == 'nca' and experiment == 'knn':
        results['nca_bank'] = evaluate.evaluate_checkpoint(workdir)
      timings[f'{experiment}-{loss}'] = time.time() - t0
      print(f'{experiment} {loss}: ' + json.dumps({k: v for k, v in results[loss].items()
                                                   if isinstance(v, float)}), flush=True)
    for (name, nca, ci_n), (_, softmax, ci_s) in zip(_row(results['nca'], experiment),
                                                      _row(results['softmax'], experiment)):
      table.append((name, nca, ci_n, softmax, ci_s))
    if 'nca_bank' in results:
      table.append(('kNN top-1, all classes, against the NCA bank', results['nca_bank']['top1'],
                    None, float('nan'), None))
  fmt = lambda v, ci: ('-' if v != v else f'{100 * v:.2f}%') + (
      f' +- {100 * ci:.2f}' if ci is not None else '')
  lines = ['| Fashion-MNIST | NCA | softmax |', '| --- | --- | --- |']
  lines += [f'| {name} | {fmt(n, cn)} | {fmt(s, cs)} |' for name, n, cn, s, cs in table]
  lines += ['', 'Run times (train and evaluate): ' + ', '.join(
      f'{k} {v / 60:.1f} min' for k, v in timings.items())]
  with open(os.path.join(args.workdir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  bar_chart(os.path.join(args.workdir, 'results.png'),
            [(name, n, s) for name, n, _, s, _ in table if s == s])
  print('\n'.join(lines))
  print(f'written: {os.path.join(args.workdir, "results.md")} and results.png')


if __name__ == '__main__':
  app.run(lambda argv: cli.run('experiments.py', lambda: main(argv)),
          flags_parser=cli.flags_parser('experiments.py'))
