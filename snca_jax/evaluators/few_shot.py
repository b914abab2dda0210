"""Novel classes: a run trained on `data.train_classes`, evaluated on the classes it never saw,
in N-way K-shot episodes and by weighted kNN."""

import numpy as np

from snca_jax.evaluators.knn import Database, KnnSettings


def few_shot_episodes(support, support_labels, queries, query_labels, *, ways=5, shots=1,
                      queries_per_class=15, episodes=1000, seed=0) -> dict:
  """N-way K-shot episodes on unit-norm embeddings: each episode draws `ways` classes, `shots`
  support examples of each from `support` and `queries_per_class` queries of each from
  `queries`; a query takes the class of its most similar support example ('nearest') or of
  the most similar class mean ('mean'). Returns the mean accuracy of each rule over the
  episodes with the half-width of its 95% confidence interval (1.96 standard errors)."""
  rng = np.random.default_rng(seed)
  classes = np.intersect1d(np.unique(support_labels), np.unique(query_labels))
  if len(classes) < ways:
    raise ValueError(f'{ways}-way episodes need {ways} classes; the held-out ones are '
                     f'{classes.tolist()}')
  by_class_s = {c: np.flatnonzero(support_labels == c) for c in classes}
  by_class_q = {c: np.flatnonzero(query_labels == c) for c in classes}
  acc = {'nearest': [], 'mean': []}
  for _ in range(episodes):
    chosen = rng.choice(classes, ways, replace=False)
    s_idx = np.stack([rng.choice(by_class_s[c], shots, replace=False) for c in chosen])
    q_idx = np.concatenate([rng.choice(by_class_q[c], min(queries_per_class,
                                                          len(by_class_q[c])), replace=False)
                            for c in chosen])
    q_true = np.concatenate([np.full(min(queries_per_class, len(by_class_q[c])), i)
                             for i, c in enumerate(chosen)])
    q = queries[q_idx]
    s_feat = support[s_idx]                                   # (ways, shots, D)
    sims = q @ s_feat.reshape(ways * shots, -1).T             # (Q, ways * shots)
    acc['nearest'].append(np.mean(sims.argmax(1) // shots == q_true))
    means = s_feat.mean(1)
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    acc['mean'].append(np.mean((q @ means.T).argmax(1) == q_true))
  return {rule: (float(np.mean(v)), float(1.96 * np.std(v) / np.sqrt(len(v))))
          for rule, v in acc.items()}


class FewShotEvaluator:
  """N-way 1-shot and 5-shot episodes on the held-out classes (support from their training
  images, queries from their evaluation images; nearest support example and nearest class
  mean), and weighted kNN of their evaluation images against all their training images:
  {'fewshot/5way1shot_nearest', ..._ci95, 'fewshot/knn_top1'} (and 'fewshot/knn_k' where they
  have fewer training images than K).

  N is each of `ways` that the held-out classes allow. With exactly 5 of them (Fashion-MNIST's
  novel split), 5-way episodes always use the same 5 classes; 3-way episodes sample theirs, so
  their interval covers the choice of classes too. `seed` draws the episodes (paper_evaluators
  passes the run's `config.seed`)."""

  def __init__(self, config, settings: KnnSettings, *, ways=(5, 3), shots=(1, 5),
               episodes=1000, seed=0):
    self.config, self.settings, self.ways, self.shots = config, settings, ways, shots
    self.episodes, self.seed = episodes, seed

  def run(self, embeddings, database=None) -> dict:
    del database
    d = self.config.data
    support = embeddings.get(d.train_split, 'held_out')
    queries = embeddings.get(d.eval_split, 'held_out')
    out = {}
    held_out = len(np.intersect1d(support.labels, queries.labels))
    ways = [n for n in self.ways if n <= held_out] or [max(self.ways)]   # none: its error
    for n, shots in ((n, s) for n in ways for s in self.shots):
      res = few_shot_episodes(support.features, support.labels, queries.features,
                              queries.labels, ways=n, shots=shots, episodes=self.episodes,
                              seed=self.seed)
      for rule, (mean, ci) in res.items():
        out[f'fewshot/{n}way{shots}shot_{rule}'] = mean
        out[f'fewshot/{n}way{shots}shot_{rule}_ci95'] = ci
    k, acc = self.settings.accuracy(
        queries.features, queries.labels, Database(support.features, support.labels),
        num_classes=int(support.labels.max()) + 1, mesh=embeddings.mesh, ks=(1,))
    out['fewshot/knn_top1'] = acc[1]
    if k != self.settings.k:                # fewer held-out training images than K
      out['fewshot/knn_k'] = k
    return out
