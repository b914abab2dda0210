"""The paper's experiments: the softmax baseline, sub-categories, novel classes (few-shot
episodes), neighbour pictures and export; evaluators on embeddings whose answer is known."""

import dataclasses
import os

import numpy as np
import pytest

from snca_jax import evaluate
from snca_jax import evaluators
from snca_jax import mesh as mesh_lib
from snca_jax import train
from snca_jax.data import sources

from conftest import assert_accuracy_matches, weighted_knn_reference
from test_train import tiny


def _clusters(n_classes, per_class, dim=16, noise=0.0, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(n_classes, dim))
  labels = np.repeat(np.arange(n_classes), per_class)
  x = centres[labels] + noise * rng.normal(size=(len(labels), dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_few_shot_episodes_on_known_answers():
  support, s_labels = _clusters(8, 20)
  queries, q_labels = _clusters(8, 10)
  res = evaluators.few_shot_episodes(support, s_labels, queries, q_labels, ways=5, shots=1,
                                   episodes=200)
  assert res['nearest'] == (1.0, 0.0) and res['mean'] == (1.0, 0.0)     # perfect clusters
  rng = np.random.default_rng(1)
  noise = lambda n: rng.normal(size=(n, 16)).astype(np.float32)
  res = evaluators.few_shot_episodes(noise(160), s_labels, noise(80), q_labels, ways=5,
                                   shots=5, episodes=1000)
  for mean, ci in res.values():                 # random features: chance, 1 in 5
    assert abs(mean - 0.2) < 0.03 and 0 < ci < 0.01
  again = evaluators.few_shot_episodes(noise(160), s_labels, noise(80), q_labels, episodes=10)
  assert again != res
  with pytest.raises(ValueError, match='5-way episodes need 5 classes'):
    evaluators.few_shot_episodes(support[:60], s_labels[:60], queries, q_labels)


def test_views_of_a_split(fake_data_config):
  data = fake_data_config.data.copy_and_resolve_references()
  data.label_map, data.num_classes = (0, 1, 0, 1, 0, 2, 0, 2, 3, 2), 4
  data.train_classes = (0, 1, 2, 3, 4)
  fine = sources.open_source(data, 'train', 'fine')
  labels = sources.read_labels(fine)
  trained = sources.open_source(data, 'train')
  held = sources.open_source(data, 'train', 'held_out')
  assert len(trained) + len(held) == len(fine) == 96
  records = trained.__getitems__(range(len(trained)))
  assert [r['index'] for r in records] == list(range(len(trained)))        # dense bank rows
  want = np.asarray(data.label_map)[labels[np.isin(labels, data.train_classes)]]
  np.testing.assert_array_equal([r['label'] for r in records], want)
  np.testing.assert_array_equal(sources.read_labels(trained), want)
  assert set(sources.read_labels(held)) == {5, 6, 7, 8, 9}
  assert sources.num_classes(trained) == 4


def test_softmax_on_coarse_labels_then_every_evaluator(fake_data_config, tmp_path):
  config = tiny(fake_data_config, num_epochs=1, loss='softmax', low_dim=0)   # the paper's
  config.data.label_map, config.data.num_classes = (0, 1, 0, 1, 0, 2, 0, 2, 3, 2), 4
  workdir = str(tmp_path / 'w')
  state = train.train_and_evaluate(config, workdir)
  assert 'classifier' in state.params and 'head' not in state.params   # on the pooled features
  norms = np.linalg.norm(np.asarray(state.bank)[:96], axis=1)     # never written: no row
  assert not np.any(np.isclose(norms, 1.0, atol=1e-5))             # was normalised
  result = evaluate.evaluate_checkpoint(workdir, neighbours=3, export_dir=str(tmp_path / 'x'))
  assert result['database'] == 'recomputed'
  exported = {f: np.load(tmp_path / 'x' / f) for f in os.listdir(tmp_path / 'x')}
  assert exported['database.npy'].shape[1] == 16              # tiny_resnet's pooled width
  # Sub-categories: the same embeddings, searched with their fine labels.
  fine = lambda split: sources.read_labels(sources.open_source(config.data, split, 'fine'))
  np.testing.assert_array_equal(exported['query_labels.npy'],
                                np.asarray(config.data.label_map)[fine('test')])
  assert_accuracy_matches(result, weighted_knn_reference(
      exported['queries.npy'], fine('test'), exported['database.npy'], fine('train'), k=30,
      sigma=0.05), 40, prefix='subcategory/top')
  # Bag (fine 8) is coarse class 3 alone: without it, and the floors of a rule that knows the
  # coarse class and guesses inside it (4 test images a class: (4 + 4 + 4 + 4) / 40, then / 36).
  several = np.asarray(config.data.label_map)[fine('test')] != 3
  assert result['subcategory/chance_floor'] == pytest.approx(0.4)
  assert result['subcategory/chance_floor_without_singletons'] == pytest.approx(12 / 36)
  assert_accuracy_matches({'top1': result['subcategory/top1_without_singletons']},
                          weighted_knn_reference(
                              exported['queries.npy'][several], fine('test')[several],
                              exported['database.npy'], fine('train'), k=30, sigma=0.05,
                              ks=(1,)), int(several.sum()))
  from PIL import Image
  png = Image.open(os.path.join(workdir, 'neighbours', 'neighbours.png'))
  assert png.size[0] > 11 * 84 and png.size[1] > 3 * 84
  page = open(os.path.join(workdir, 'neighbours', 'neighbours.html')).read()
  assert 'wrong' in page or result['neighbours/wrong_fraction'] == 0
  assert 'Trouser' not in page and 'Coat' not in page     # coarse classes have no fine names
  names = evaluators.class_names(sources.open_source(fake_data_config.data, 'train'), 10)
  assert names[1] == 'Trouser' and names[9] == 'Ankle boot'
  assert exported['queries.npy'].shape == (40, 16) and exported['database.npy'].shape == (96, 16)
  np.testing.assert_array_equal(exported['query_index.npy'], np.arange(40))
  np.testing.assert_array_equal(exported['database_index.npy'], np.arange(96))
  np.testing.assert_allclose(np.linalg.norm(exported['database.npy'], axis=1), 1, rtol=1e-5)


def test_novel_classes_few_shot(fake_data_config, tmp_path):
  config = tiny(fake_data_config, num_epochs=1)
  config.data.train_classes = (0, 1, 2, 3, 4)
  config.seed = 3                  # the episodes are drawn with the run's seed
  workdir = str(tmp_path / 'w')
  state = train.train_and_evaluate(config, workdir)
  n_train = int(np.isin(sources.read_labels(sources.open_source(
      fake_data_config.data, 'train')), (0, 1, 2, 3, 4)).sum())
  assert int(np.sum(np.asarray(state.bank_labels) >= 0)) == n_train
  result = evaluate.evaluate_checkpoint(workdir)
  # The classes never trained on, embedded by the trained network: support from the training
  # split, queries from the test split, each with its own labels 5..9.
  embedder = evaluators.Embedder(config, mesh_lib.make_mesh())
  from snca_jax import checkpoint
  mngr = checkpoint.manager(checkpoint.checkpoint_dir(workdir), read_only=True)
  saved = checkpoint.restore_as_saved(mngr, mngr.latest_step(), mesh_lib.make_mesh())
  variables = {'params': saved['params'], 'batch_stats': saved['batch_stats']}
  support, s_labels, _ = dataclasses.astuple(embedder.embed(variables, 'train', 'held_out'))
  queries, q_labels, _ = dataclasses.astuple(embedder.embed(variables, 'test', 'held_out'))
  labels = lambda split: sources.read_labels(sources.open_source(config.data, split, 'fine'))
  np.testing.assert_array_equal(s_labels, labels('train')[labels('train') >= 5])
  np.testing.assert_array_equal(q_labels, labels('test')[labels('test') >= 5])
  assert_accuracy_matches({'top1': result['fewshot/knn_top1']}, weighted_knn_reference(
      queries, q_labels, support, s_labels, k=30, sigma=0.05, ks=(1,)), len(queries))
  for ways, shots in ((5, 1), (5, 5), (3, 1), (3, 5)):
    res = evaluators.few_shot_episodes(support, s_labels, queries, q_labels, ways=ways,
                                       shots=shots, seed=3)
    for rule, (mean, ci) in res.items():
      assert result[f'fewshot/{ways}way{shots}shot_{rule}'] == pytest.approx(mean, abs=1e-6)
      assert result[f'fewshot/{ways}way{shots}shot_{rule}_ci95'] == pytest.approx(ci, abs=1e-6)


def test_cifar100_superclasses_from_the_records(tfds_mock, tmp_path):
  """configs/cifar100_resnet18.py:coarse trains on TFDS's `coarse_label`, evaluates on `label`."""
  from configs import cifar100_resnet18
  config = cifar100_resnet18.get_config('coarse')
  config.data.data_dir = str(tmp_path)
  trained = sources.open_source(config.data, 'train')
  fine = sources.open_source(config.data, 'train', 'fine')
  records = fine.__getitems__(range(len(fine)))
  np.testing.assert_array_equal(sources.read_labels(trained),
                                [r['coarse_label'] for r in records])
  np.testing.assert_array_equal([r['label'] for r in trained.__getitems__(range(3))],
                                [r['coarse_label'] for r in records[:3]])
  assert config.data.num_classes == 20


def test_experiments_over_seeds_write_means_spreads_and_findings(fake_data_config, tmp_path):
  """experiments.py end to end on the fake data, tiny: every model of the chosen experiment
  for each seed, then results.md with means, deviations and the NCA - softmax column,
  results.json with every run, results.png. (A few-shot experiment's runs are the same loop;
  its training and evaluation: test_novel_classes_few_shot; its rows: the test below.)"""
  import json
  import subprocess
  import sys
  from conftest import subprocess_env
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / 'runs'
  cmd = [sys.executable, 'experiments.py', f'--workdir={workdir}', '--only=knn',
         '--seeds=0,1', '--epochs=1', f'--idx_dir={fake_data_config.data.idx_dir}',
         f'--data_dir={fake_data_config.data.data_dir}']
  for item in ('model=tiny_resnet', 'batch_size=16', 'knn.batch_size=16',
               'log_every_steps=100', 'keep_best=False'):
    cmd.append(f'--override={item}')
  r = subprocess.run(cmd, cwd=root, env=subprocess_env(None), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  runs = json.load(open(workdir / 'results.json'))['runs']
  assert sorted(runs) == sorted(
      [f'knn/{m}/{s}' for m in ('nca', 'softmax', 'softmax_embedding', 'nca_bank')
       for s in (0, 1)])
  table = open(workdir / 'results.md').read()
  top1 = [runs[f'knn/nca/{s}']['top1'] for s in (0, 1)]
  want = f'{100 * np.mean(top1):.2f}% +- {100 * np.std(top1, ddof=1):.2f}'
  row = next(line for line in table.splitlines() if line.startswith('| kNN top-1, all classes |'))
  assert want in row and ('(finding, p=' in row or '(within the spread, p=' in row)
  assert '2 seeds (0, 1)' in table and (workdir / 'results.png').exists()
  # The baseline embeds with its pooled features (tiny_resnet: 16 channels), the variant with
  # its 16-d layer; both runs' configs say so.
  from snca_jax import checkpoint
  def saved_config(model):
    mngr = checkpoint.manager(checkpoint.checkpoint_dir(str(workdir / f'knn-{model}-seed0')),
                              read_only=True)
    return checkpoint.read_config(mngr, mngr.latest_step())[0]
  configs = {m: saved_config(m) for m in ('softmax', 'softmax_embedding')}
  assert configs['softmax'].low_dim == 0 and configs['softmax_embedding'].low_dim == 128


def test_the_rotated_few_shot_experiment_trains_on_5_to_9_and_tabulates_its_rows():
  """What experiments.py does for fewshot_rotated without training: its configs (trained on
  classes 5-9, the models NCA and softmax) and its rows in results.md, from given results."""
  import experiments
  from configs import fashion_mnist
  assert experiments.models_of('fewshot_rotated') == ('nca', 'softmax')
  for model in experiments.models_of('fewshot_rotated'):
    config = fashion_mnist.get_config(f"{experiments.EXPERIMENTS['fewshot_rotated']},{model}")
    assert tuple(config.data.train_classes) == (5, 6, 7, 8, 9)
    assert config.loss == ('softmax' if model == 'softmax' else 'nca')
  keys = [key for key, _ in experiments.metrics('fewshot_rotated')]
  runs = {('fewshot_rotated', m, s): {k: base + 0.01 * s for k in keys}
          for m, base in (('nca', 0.8), ('softmax', 0.7)) for s in (0, 1, 2)}
  lines, chart = experiments.table(runs, ['fewshot_rotated'])
  name = 'novel classes 0-4 (rotated), 3-way 5-shot, nearest class mean'
  row = next(line for line in lines if line.startswith(f'| {name} |'))
  assert '| 81.00% +- 1.00 | 71.00% +- 1.00 | - | +10.00 (finding, p=0.000) |' in row, row
  assert len(lines) == 2 + len(keys) and len(chart) == len(keys)


def test_a_finding_is_a_difference_beyond_the_seed_spread():
  """NCA - softmax is called a finding only where Welch's t-test over the seeds says p < 0.05."""
  import experiments
  summary = lambda *v: experiments.summary(v)
  # Equal deviations 0.01 over 3 seeds each: t = 0.1 / sqrt(2 * 0.01**2 / 3) on Welch's 4
  # degrees of freedom.
  from scipy import stats
  diff, p = experiments.difference(summary(0.90, 0.91, 0.92), summary(0.80, 0.81, 0.82))
  assert diff == pytest.approx(0.10)
  assert p == pytest.approx(2 * stats.t.sf(0.1 / np.sqrt(2 * 0.01 ** 2 / 3), 4)) and p < 0.001
  # The same means, but seeds that spread over the gap: not a finding.
  diff, p = experiments.difference(summary(0.80, 0.91, 1.0), summary(0.70, 0.81, 0.92))
  assert diff == pytest.approx(2.71 / 3 - 0.81) and p > 0.05
  assert experiments.difference(summary(0.9), summary(0.8))[1] is None     # one seed
