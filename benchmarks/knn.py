"""Weighted kNN (K=30, K=200), 2,048 queries against an ImageNet-sized bank: ours against faiss.

    python benchmarks/knn.py                 # N = 1,281,167, D = 128, Q = 2,048
    python benchmarks/knn.py --n 100000
    python benchmarks/knn.py --embeddings emb   # eval_knn.py --export emb's queries and bank

  ours   snca_jax.knn.knn_classify as eval_knn.py calls it (method='auto'; one device here),
         exact in float32: the native search (XLA's products for 1,024 queries x 4,096 rows
         at a time, each tile's scores folded into every query's running selection by a CPU
         kernel, snca_jax/cpu_select.cc); where the CPU has bfloat16 products in hardware and
         the bank is large beside K, screened in bfloat16 with a proof (the K + K/4 + 16 best
         rows by bfloat16 score scored again in float32; queries without the proof searched
         again with float32 products), else with float32 products
  ours_f32   the same with the screen off (screen='none')
  native_screened  the native search screened wherever it can run (method='native',
             screen='bfloat16')
  screened   the blocked search with the screen wherever it can run (method='blocked',
             screen='bfloat16'), what 'auto' ran before for K = 30 on ImageNet's bank
  ours_bf16  the same, scoring in bfloat16 (float32 accumulation), without the proof
  native     the native search with float32 products (method='native', screen='none')
  tiled      the tiled search of small banks (method='tiled'), 'auto' before the native one:
             all the scores of 64 queries at a time, selected from by XLA while in cache
  blocked    the two-pass search (method='blocked'), screened where 'auto' would screen
  chunked    the search before (method='chunked'): a running top-k over chunks of 16,384 rows
  faiss  faiss-cpu IndexFlatIP (exact inner-product search) + the same weighted vote in numpy

`--parts` adds, for each K, where the time of the search goes (`parts_of_search`).

Both run on the same bank and queries in one process, timed in turns (faiss, then each of
ours, --repeats rounds after one warm-up each: a shared machine's busy spells fall on all
alike); the table gives the median seconds and queries per second, and the agreement of the
two top-K lists. Needs `pip install -r benchmarks/requirements.txt`.
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


SMOKE = 'smoke run: tiny sizes, to check that the benchmark runs; its figures mean nothing'


def unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def timed(fns, repeats):
  """(output, median seconds) of each of `fns`, timed in turns: one warm-up call each, then
  `repeats` rounds that call each once, so that a busy spell of a shared machine falls on all
  of them alike."""
  outs = [fn() for fn in fns]
  times = [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      t = time.perf_counter()
      outs[i] = fn()
      times[i].append(time.perf_counter() - t)
  return [(out, float(np.median(ts))) for out, ts in zip(outs, times)]


def parts_of_search(queries, bank, labels, k, repeats):
  """Where the blocked search's time goes on one device, for one batch of queries, each part
  timed in turns with the others (medians): the bank's products alone in the search's tiles
  (float32 and bfloat16; their maxima summed away), the same reduced to block maxima, the
  first pass with its running selection of blocks (`knn._block_pass`, as the plain search
  and the screened one call it), and the whole searches; the differences are the block
  maxima's, the selection's and the rescoring's costs. Where the native search is built, its
  products in its tiles (a maximum over each tile's rows taken, so that its scores are read
  once, as its kernel reads them) and the whole native search: the difference is the kernel's
  selection; and the native search in float32 screened in bfloat16, with the queries whose
  screen proves their K best (the others are searched again). On a small bank
  (`knn._is_small`) also the tiled search's products with their
  block maxima, and the whole tiled search: the difference is its selection."""
  import functools

  import jax
  import jax.numpy as jnp
  from snca_jax import bank as bank_lib
  from snca_jax import cpu_select
  from snca_jax import knn
  bank, labels = jax.device_get(bank), jax.device_get(labels)
  q, bank, labels = jnp.asarray(queries), jnp.asarray(bank), jnp.asarray(labels)
  nq, full = q.shape[0], bank.shape[0] // knn.BLOCK * knn.BLOCK
  chunk, _ = knn._tiling(full, nq, k)

  def tiles(dtype, maxima):
    def products(q, b, _):
      def fold(carry, rows, fresh, tile):
        sims = jnp.einsum('qd,cd->qc', q.astype(dtype), tile.astype(dtype),
                          preferred_element_type=jnp.float32)
        if maxima:
          sims = jnp.max(sims.reshape(nq, -1, knn.BLOCK), axis=2)
        return carry + jnp.sum(sims, axis=1)
      return bank_lib.scan_chunks(fold, jnp.zeros(nq), (b,), chunk, total=full)
    return jax.jit(products)

  def tiled_maxima(dtype):
    """The tiled search's products (TILE_QUERIES queries against all the rows at a time),
    reduced to block maxima, summed away."""
    tile = min(nq, knn.TILE_QUERIES)

    def products(q, b, _):
      def one(qt):
        sims = jnp.einsum('qd,cd->qc', qt.astype(dtype), b[:full].astype(dtype),
                          preferred_element_type=jnp.float32)
        return jnp.sum(jnp.max(sims.reshape(tile, -1, knn.BLOCK), axis=2), axis=1)
      return jax.lax.map(one, q[:nq // tile * tile].reshape(-1, tile, q.shape[1]))
    return jax.jit(products)

  def native_products(dtype):
    """The native search's products (NATIVE_QUERIES queries against a chunk of rows at a time),
    each tile's scores read once by a maximum over its rows, summed away."""
    tile, per_chunk = knn._native_tiling(bank.shape[0], nq)

    def products(q, b, _):
      def one(qt):
        def fold(carry, _rows, _fresh, chunk_rows):
          sims = jnp.einsum('qd,cd->qc', qt.astype(dtype), chunk_rows.astype(dtype),
                            preferred_element_type=jnp.float32)
          return carry + jnp.max(sims, axis=1)
        return bank_lib.scan_chunks(fold, jnp.zeros(tile), (b,), per_chunk)
      return jax.lax.map(one, q[:nq // tile * tile].reshape(-1, tile, q.shape[1]))
    return jax.jit(products)

  def block_pass(dtype, keep):
    return jax.jit(lambda q, b, l: knn._block_pass(q, b, l, keep=keep, matmul_dtype=dtype,
                                                    full=full))

  def whole(fn, **kw):
    return jax.jit(lambda q, b, l: fn(q, b, l, k=k, **kw))

  bf16, f32 = jnp.bfloat16, jnp.float32
  rows = [('the bank read once (summed)', jax.jit(lambda q, b, l: jnp.sum(b, axis=0))),
          ('products, float32', tiles(f32, False)),
          ('products, bfloat16', tiles(bf16, False)),
          ('+ block maxima, float32', tiles(f32, True)),
          ('+ block maxima, bfloat16', tiles(bf16, True)),
          (f'first pass, float32, {k} blocks', block_pass(f32, k)),
          (f'first pass, bfloat16, {k} blocks', block_pass(bf16, k)),
          ('plain search, float32', whole(knn._plain_top_k, matmul_dtype=f32)),
          ('plain search, bfloat16', whole(knn._plain_top_k, matmul_dtype=bf16))]
  if full // knn.BLOCK > knn.SCREEN_BLOCKS(k):
    rows[7:7] = [(f'first pass, bfloat16, {knn.SCREEN_BLOCKS(k) + 1} blocks (screened)',
                  block_pass(bf16, knn.SCREEN_BLOCKS(k) + 1))]
    rows.append(('screened search', whole(knn._screened_top_k)))
  if cpu_select.available():
    rows += [('native: products + a pass over them, float32', native_products(f32)),
             ('native: products + a pass over them, bfloat16', native_products(bf16)),
             ('native search, float32', whole(knn._native_top_k, matmul_dtype=f32)),
             ('native search, bfloat16', whole(knn._native_top_k, matmul_dtype=bf16)),
             ('native search, float32 screened', whole(knn._native_screened_top_k))]
  if knn._is_small(bank.shape[0]):
    rows += [('tiled: products + block maxima, float32', tiled_maxima(f32)),
             ('tiled: products + block maxima, bfloat16', tiled_maxima(bf16)),
             ('tiled search, float32', whole(knn._tiled_top_k, matmul_dtype=f32)),
             ('tiled search, bfloat16', whole(knn._tiled_top_k, matmul_dtype=bf16))]
  times = timed([functools.partial(lambda f: jax.block_until_ready(f(q, bank, labels)), f)
                 for _, f in rows], repeats)
  print(f'where the time goes, K={k}, {nq:,} queries, one device, {full:,} rows in blocks of '
        f'{knn.BLOCK}, tiles of {chunk:,} rows (median of {repeats} rounds):')
  for (name, _), (_, t) in zip(rows, times):
    print(f'  {name:48s}{t:8.2f} s')
  again = min(k, full // knn.BLOCK) * knn.BLOCK         # rows a query, of its best blocks
  gathered = nq * again * bank.shape[1] * 4
  print(f'  (the plain search scores {again:,} rows a query again: {gathered / 1e9:.2f} GB '
        f'gathered, {gathered / bank.nbytes:.1f} x the bank)')
  if cpu_select.available():
    proven = int(jnp.sum(jax.jit(lambda q, b, l: knn._native_screen(q, b, l, k=k)[2])(
        q, bank, labels)))
    print(f'  (the screened native search proves {proven:,} of the {nq:,} queries; the others '
          'are searched again with float32 products)')
  print()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--n', type=int, default=1_281_167)
  p.add_argument('--d', type=int, default=128)
  p.add_argument('--q', type=int, default=2048)
  p.add_argument('--k', default='30,200', help='K values, comma-separated')
  p.add_argument('--classes', type=int, default=1000)
  p.add_argument('--batch_size', type=int, default=2048)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--methods', default='ours,ours_f32,ours_bf16',
                 help='of ours, ours_f32, native_screened, screened, ours_bf16, native, tiled, '
                 'blocked, chunked; comma-separated')
  p.add_argument('--embeddings', default='',
                 help='a folder written by eval_knn.py --export: its queries and database '
                 '(and their labels) instead of random unit rows')
  p.add_argument('--block', type=int, default=0,
                 help='rows per block of the blocked search (default: knn.BLOCK)')
  p.add_argument('--group_blocks', type=int, default=0,
                 help='block maxima selected at a time (default: knn.GROUP_BLOCKS)')
  p.add_argument('--tile_queries', type=int, default=0,
                 help='queries a tile of the tiled search (default: knn.TILE_QUERIES)')
  p.add_argument('--native_queries', type=int, default=0,
                 help='queries a tile of the native search (default: knn.NATIVE_QUERIES)')
  p.add_argument('--native_tile_mb', type=int, default=0,
                 help='MB of scores a tile of the native search (default: '
                 'knn.NATIVE_TILE_BYTES)')
  p.add_argument('--count_from_k', type=int, default=0,
                 help='the tiled search finds its best blocks by counting from this K up, by '
                 'top-k below it (default: knn.COUNT_FROM_K)')
  p.add_argument('--parts', action='store_true',
                 help='also where the time of the search goes, for the first batch of queries '
                 '(parts_of_search)')
  p.add_argument('--smoke', action='store_true',
                 help='tiny sizes (N = 5,000, Q = 64), to check that it runs')
  args = p.parse_args(argv)
  if args.smoke:
    args.n, args.q, args.classes, args.batch_size, args.repeats = 5_000, 64, 10, 32, 1
    print(SMOKE)

  import faiss
  import jax
  from snca_jax import bank as bank_lib
  from snca_jax import distributed
  from snca_jax import hardware
  from snca_jax import knn
  from snca_jax import mesh as mesh_lib
  knn.BLOCK = args.block or knn.BLOCK
  knn.TILE_QUERIES = args.tile_queries or knn.TILE_QUERIES
  knn.COUNT_FROM_K = args.count_from_k or knn.COUNT_FROM_K
  knn.NATIVE_QUERIES = args.native_queries or knn.NATIVE_QUERIES
  knn.NATIVE_TILE_BYTES = (args.native_tile_mb << 20) or knn.NATIVE_TILE_BYTES
  knn.GROUP_BLOCKS = args.group_blocks or knn.GROUP_BLOCKS

  rng = np.random.default_rng(0)
  if args.embeddings:
    load = lambda name: np.load(os.path.join(args.embeddings, name + '.npy'))
    bank, labels, queries = load('database'), load('database_labels').astype(np.int32), load(
        'queries').astype(np.float32)
    args.n, args.d = bank.shape
    args.q, args.classes = len(queries), int(labels.max()) + 1
    args.batch_size = min(args.batch_size, args.q)
  else:
    bank = unit(rng.normal(size=(args.n, args.d)))
    labels = rng.integers(0, args.classes, size=args.n).astype(np.int32)
    # Queries near bank rows, as real embeddings are: neighbours are well separated.
    queries = unit(bank[rng.choice(args.n, args.q)]
                   + 0.5 * unit(rng.normal(size=(args.q, args.d))))
  sigma = 0.05

  mesh = mesh_lib.make_mesh()
  dev_bank, dev_labels = bank_lib.place(bank, labels, mesh)   # padded to a multiple of devices

  def ours(k, dtype, method, screen):
    return lambda: knn.knn_classify(queries, dev_bank, dev_labels, k=k, sigma=sigma,
                                    num_classes=args.classes, mesh=mesh,
                                    batch_size=args.batch_size, matmul_dtype=dtype,
                                    method=method, screen=screen)

  # Jitted as knn_classify's search is: run op by op, each of its operations was compiled on
  # its own, most of the smoke run's time.
  neighbors = jax.jit(knn.top_k_neighbors,
                      static_argnames=('k', 'mesh', 'matmul_dtype', 'method', 'screen'))

  def ours_neighbors(k, dtype, method, screen):
    out = []
    for s in range(0, args.q, args.batch_size):
      q = jax.device_put(queries[s:s + args.batch_size], mesh_lib.replicated(mesh))
      out.append(np.asarray(neighbors(q, dev_bank, dev_labels, k=k, mesh=mesh,
                                      matmul_dtype=dtype, method=method, screen=screen)[1]))
    return np.concatenate(out)

  faiss.omp_set_num_threads(os.cpu_count())
  index = faiss.IndexFlatIP(args.d)
  index.add(bank)

  def with_faiss(k):
    def run():
      sims, idx = index.search(queries, k)
      w = np.exp((sims - sims[:, :1]) / sigma)
      scores = np.zeros((args.q, args.classes), np.float32)
      np.add.at(scores, (np.arange(args.q)[:, None], labels[idx]), w)
      return scores, idx
    return run

  methods = [m for m in (('ours', np.float32, 'auto', 'auto'),
                         ('ours_f32', np.float32, 'auto', 'none'),
                         ('screened', np.float32, 'blocked', 'bfloat16'),
                         ('ours_bf16', jax.numpy.bfloat16, 'auto', 'auto'),
                         ('native', np.float32, 'native', 'none'),
                         ('native_screened', np.float32, 'native', 'bfloat16'),
                         ('tiled', np.float32, 'tiled', 'auto'),
                         ('blocked', np.float32, 'blocked', 'auto'),
                         ('chunked', np.float32, 'chunked', 'auto'))
             if m[0] in args.methods.split(',')]
  for k in [int(v) for v in args.k.split(',')]:
    results = timed([with_faiss(k)] + [ours(k, *m[1:]) for m in methods], args.repeats)
    (faiss_scores, faiss_idx), t_faiss = results[0]
    data = f'embeddings of {args.embeddings}' if args.embeddings else 'random unit rows'
    print(f'weighted kNN, K={k}, Q={args.q:,} queries, N={args.n:,} x D={args.d} ({data}), '
          f'CPU x{os.cpu_count()} ({distributed.processor()}), median of {args.repeats} '
          f'rounds; blocks of {knn.BLOCK}, {knn.GROUP_BLOCKS:,} maxima a group, '
          f'{knn.TILE_QUERIES} queries a tile (small banks), counted from K = '
          f'{knn.COUNT_FROM_K}; native tiles of {knn.NATIVE_QUERIES} queries x '
          f'{knn.NATIVE_TILE_BYTES >> 20} MB; bfloat16 '
          f"products in hardware: {'yes' if hardware.bfloat16_in_hardware() else 'no'}")
    w = max([10] + [len(m[0]) + 1 for m in methods])
    print(f"{'method':{w}s}{'seconds':>9s}{'queries/s':>11s}{'x faiss':>9s}"
          f"{'top-K overlap':>15s}{'same class':>12s}")
    print(f"{'faiss':{w}s}{t_faiss:9.2f}{args.q / t_faiss:11.0f}{1:9.2f}")
    for (name, *how), (scores, t) in zip(methods, results[1:]):
      idx = ours_neighbors(k, *how)
      overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(idx, faiss_idx)])
      same = np.mean(np.argmax(scores, 1) == np.argmax(faiss_scores, 1))
      print(f"{name:{w}s}{t:9.2f}{args.q / t:11.0f}{t_faiss / t:9.2f}{100 * overlap:14.2f}%"
            f"{100 * same:11.2f}%")
    print()
    if args.parts:
      parts_of_search(queries[:args.batch_size], dev_bank, dev_labels, k, args.repeats)


if __name__ == '__main__':
  main()
