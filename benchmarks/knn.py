"""Weighted kNN (K=30) for 2,048 queries against an ImageNet-sized bank: ours against faiss.

    python benchmarks/knn.py                 # N = 1,281,167, D = 128, Q = 2,048
    python benchmarks/knn.py --n 100000

  ours   snca_jax.knn.knn_classify: sharded matmul + per-device top-k (one device here)
  faiss  faiss-cpu IndexFlatIP (exact inner-product search) + the same weighted vote in numpy

Both run on the same bank and queries in one process; the table gives queries per second
(median of --repeats, after one warm-up), and the agreement of the two top-K lists. Needs
`pip install -r benchmarks/requirements.txt`.
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def timed(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
  return out, float(np.median(times))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--n', type=int, default=1_281_167)
  p.add_argument('--d', type=int, default=128)
  p.add_argument('--q', type=int, default=2048)
  p.add_argument('--k', type=int, default=30)
  p.add_argument('--classes', type=int, default=1000)
  p.add_argument('--batch_size', type=int, default=512)
  p.add_argument('--repeats', type=int, default=3)
  args = p.parse_args()

  import faiss
  import jax
  from snca_jax import knn
  from snca_jax import mesh as mesh_lib

  rng = np.random.default_rng(0)
  bank = unit(rng.normal(size=(args.n, args.d)))
  labels = rng.integers(0, args.classes, size=args.n).astype(np.int32)
  # Queries near bank rows, as real embeddings are: neighbours are well separated.
  queries = unit(bank[rng.choice(args.n, args.q)] + 0.5 * unit(rng.normal(size=(args.q, args.d))))
  sigma = 0.05

  mesh = mesh_lib.make_mesh()
  dev_bank = jax.device_put(bank, mesh_lib.rows(mesh))
  dev_labels = jax.device_put(labels, mesh_lib.rows(mesh))

  def ours():
    return knn.knn_classify(queries, dev_bank, dev_labels, k=args.k, sigma=sigma,
                            num_classes=args.classes, mesh=mesh, batch_size=args.batch_size)

  def ours_neighbors():
    out = []
    for s in range(0, args.q, args.batch_size):
      q = jax.device_put(queries[s:s + args.batch_size], mesh_lib.replicated(mesh))
      out.append(np.asarray(knn.top_k_neighbors(q, dev_bank, dev_labels, k=args.k,
                                                mesh=mesh)[1]))
    return np.concatenate(out)

  faiss.omp_set_num_threads(os.cpu_count())
  index = faiss.IndexFlatIP(args.d)
  index.add(bank)

  def with_faiss():
    sims, idx = index.search(queries, args.k)
    w = np.exp((sims - sims[:, :1]) / sigma)
    scores = np.zeros((args.q, args.classes), np.float32)
    np.add.at(scores, (np.arange(args.q)[:, None], labels[idx]), w)
    return scores, idx

  ours_scores, t_ours = timed(ours, args.repeats)
  (faiss_scores, faiss_idx), t_faiss = timed(with_faiss, args.repeats)
  ours_idx = ours_neighbors()
  overlap = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ours_idx, faiss_idx)])
  same_top1 = np.mean(np.argmax(ours_scores, 1) == np.argmax(faiss_scores, 1))

  print(f'weighted kNN, K={args.k}, Q={args.q:,} queries, N={args.n:,} x D={args.d}, '
        f'CPU x{os.cpu_count()}, median of {args.repeats}')
  print(f"{'method':8s}{'seconds':>10s}{'queries/s':>12s}")
  print(f"{'ours':8s}{t_ours:10.2f}{args.q / t_ours:12.0f}")
  print(f"{'faiss':8s}{t_faiss:10.2f}{args.q / t_faiss:12.0f}")
  print(f'ours / faiss throughput: {t_faiss / t_ours:.2f}x; top-{args.k} overlap '
        f'{100 * overlap:.2f}%; same predicted class {100 * same_top1:.2f}%')


if __name__ == '__main__':
  main()
