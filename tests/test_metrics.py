"""The metric files: metrics.jsonl and TensorBoard events, without importing torch."""

import json
import os
import subprocess
import sys

from conftest import ROOT, subprocess_env


def test_writer_writes_both_files_and_leaves_torch_unimported(tmp_path):
  """tensorboardX's writer module imports torch where it is installed (1.5 s a run, for
  tensors scalars never are): MetricWriter keeps it out, and torch stays importable."""
  code = ('import sys; from snca_jax import metrics; w = metrics.MetricWriter(sys.argv[1]); '
          "w.write(3, {'loss': 0.5}); w.close(); print('torch' in sys.modules); "
          'import torch; print(torch.ones(1).item())')
  r = subprocess.run([sys.executable, '-c', code, str(tmp_path)], cwd=ROOT,
                     env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ['False', '1.0']
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert len(rows) == 1 and rows[0]['step'] == 3 and rows[0]['loss'] == 0.5
  events = os.listdir(tmp_path / 'tensorboard')
  assert len(events) == 1 and events[0].startswith('events.out.tfevents.')
