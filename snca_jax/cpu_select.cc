// The kNN search's selection on the CPU, as an XLA FFI custom call (snca_jax/cpu_select.py).
//
// XLA scores a tile of queries against a chunk of bank rows; this folds those scores into
// every query's running selection: a reservoir of slots holding the best rows so far and the
// rows that may still belong with them, and a threshold, a score that at least k slots beat or
// equal, below which no row can be among the k best. A row enters only if its score beats the
// threshold, which a vectorised scan of 64 scores at a time rules out for nearly all rows
// (AVX-512 or AVX2 compares into a bit mask, whose set bits alone are visited). When the slots
// are full, a pivot taken from a sample of them, a little below the k-th best, keeps the slots
// at or above it (one pass, no branch on the data) and becomes the threshold; where the sample
// misjudges, nth_element keeps the k best. Each query's slots are sorted once, by a radix sort,
// after the last chunk. The queries of a tile are shared among XLA's intra-op threads. A second
// call (Rescore) scores a selection made with bfloat16 products again in float32, from the
// bank's rows, and sorts it again.
//
// A slot holds a score and its row as one 64-bit key, larger = better: the score's bits made
// order-preserving in the high word, the row's complement in the low word, so that equal
// scores rank the lower row first (brute force's order, and lax.top_k's).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline uint64_t Key(float score, uint32_t row) {
  uint32_t u;
  std::memcpy(&u, &score, 4);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t(u) << 32) | uint32_t(~row);
}

inline float Score(uint64_t key) {
  uint32_t u = uint32_t(key >> 32);
  u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
  float score;
  std::memcpy(&score, &u, 4);
  return score;
}

// The k best of keys[0:n] into keys[0:k]; returns the k-th best score.
inline float Compact(uint64_t* keys, int64_t n, int64_t k) {
  std::nth_element(keys, keys + (k - 1), keys + n, std::greater<uint64_t>());
  return Score(keys[k - 1]);
}

// Full slots keys[0:n] (n > k, room for m) cut down, keeping the k best: the keys at or above a
// pivot key p of which at least k are, p's score the new threshold (*thr). p is the r-th best
// of 128 slots sampled, r the k-th best's expected rank among them plus a margin of at least two
// standard deviations, so that nearly always between k and k + (m - k) / 2 keys reach it
// (counted before any key moves); else nth_element keeps exactly k. Any key below p then ranks
// below the k best, and so does any later row of p's score (ties go to the lower row). Returns
// the number of keys kept.
inline int64_t Shrink(uint64_t* keys, int64_t n, int64_t k, int64_t m, float* thr) {
  constexpr int64_t S = 128;
  const int64_t r0 = (k * S + n - 1) / n;                    // rank in the sample, from 1
  const int64_t r = r0 + 2 + int64_t(2 * __builtin_sqrt(double(r0)));
  if (r < S) {
    uint64_t sample[S];
    for (int64_t i = 0; i < S; ++i) sample[i] = keys[i * n / S];
    std::nth_element(sample, sample + (r - 1), sample + S, std::greater<uint64_t>());
    const uint64_t p = sample[r - 1];
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) count += keys[i] >= p;
    if (count >= k && count <= k + (m - k) / 2) {
      int64_t kept = 0;
      for (int64_t i = 0; i < n; ++i) {
        const uint64_t key = keys[i];
        keys[kept] = key;
        kept += key >= p;
      }
      *thr = Score(p);
      return kept;
    }
  }
  *thr = Compact(keys, n, k);
  return k;
}

// keys[0:n] sorted, largest first. From 256 keys: a radix sort by the bytes of ~key, least
// significant first, leaving out the bytes all keys share (the rows' high bytes, the scores'
// sign and exponent, mostly), several times faster than std::sort there.
void SortDescending(uint64_t* keys, int64_t n) {
  if (n < 256) {
    std::sort(keys, keys + n, std::greater<uint64_t>());
    return;
  }
  std::unique_ptr<uint64_t[]> other(new uint64_t[n]);
  std::unique_ptr<uint32_t[]> count(new uint32_t[8 * 256]());
  for (int64_t i = 0; i < n; ++i)
    for (int b = 0; b < 8; ++b) ++count[b * 256 + ((~keys[i] >> (8 * b)) & 0xff)];
  uint64_t *from = keys, *to = other.get();
  for (int b = 0; b < 8; ++b) {
    uint32_t* start = count.get() + b * 256;
    if (start[(~from[0] >> (8 * b)) & 0xff] == n) continue;      // one value: in order
    uint32_t sum = 0;
    for (int v = 0; v < 256; ++v) {
      const uint32_t c = start[v];
      start[v] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) to[start[(~from[i] >> (8 * b)) & 0xff]++] = from[i];
    std::swap(from, to);
  }
  if (from != keys) std::copy_n(from, n, keys);
}

// Bit t: whether scores[t] > thr, for t in [0, 64) (false for NaN).
inline uint64_t Above64(const float* scores, float thr) {
#if defined(__AVX512F__)
  const __m512 v = _mm512_set1_ps(thr);
  uint64_t bits = 0;
  for (int i = 0; i < 4; ++i)
    bits |= uint64_t(_mm512_cmp_ps_mask(_mm512_loadu_ps(scores + 16 * i), v, _CMP_GT_OQ))
            << (16 * i);
  return bits;
#elif defined(__AVX2__)
  const __m256 v = _mm256_set1_ps(thr);
  uint64_t bits = 0;
  for (int i = 0; i < 8; ++i)
    bits |= uint64_t(uint32_t(_mm256_movemask_ps(
                _mm256_cmp_ps(_mm256_loadu_ps(scores + 8 * i), v, _CMP_GT_OQ))))
            << (8 * i);
  return bits;
#else
  int any = 0;                                  // vectorised by the compiler: most blocks stop
  for (int t = 0; t < 64; ++t) any |= scores[t] > thr;
  if (!any) return 0;
  uint64_t bits = 0;
  for (int t = 0; t < 64; ++t) bits |= uint64_t(scores[t] > thr) << t;
  return bits;
#endif
}

// One query: `scores` of rows base + [0, c) (labels below 0: padding, or rows folded before,
// never taken) into its `m` slots; meta = {slots filled, threshold's bits}. `last`: its k best,
// sorted, into the first k slots (slots no row filled: -inf, row 0).
void FoldQuery(const float* scores, const int32_t* labels, int64_t c, uint32_t base,
               uint64_t* keys, int32_t* meta, int64_t k, int64_t m, bool last) {
  int64_t n = meta[0];
  float thr;
  std::memcpy(&thr, meta + 1, 4);
  // Strictly above: a later row equal to the threshold ranks below the row that set it. The
  // threshold may have risen since a block's mask was taken: checked again.
  auto take = [&](int64_t j) {
    if (scores[j] > thr && labels[j] >= 0) {
      keys[n] = Key(scores[j], base + uint32_t(j));
      if (++n == m) n = Shrink(keys, n, k, m, &thr);
    }
  };
  int64_t j = 0;
  for (; j + 64 <= c; j += 64)
    for (uint64_t bits = Above64(scores + j, thr); bits; bits &= bits - 1)
      take(j + __builtin_ctzll(bits));
  for (; j < c; ++j) take(j);
  if (last) {
    if (n > k && k < 256) {    // few to keep: selected, then sorted (from 256, all n radix-sorted)
      Compact(keys, n, k);
      n = k;
    }
    SortDescending(keys, n);
    n = std::min(n, k);
    for (int64_t s = n; s < k; ++s) keys[s] = Key(-__builtin_inff(), 0);
  }
  meta[0] = int32_t(n);
  std::memcpy(meta + 1, &thr, 4);
}

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable all_done;
};

// fn(q) for q in [0, t), shared among the pool's threads. The caller works too, so the work is
// done even if no other thread is free; the state is shared, so that a helper that starts late
// finds nothing left and touches nothing else.
template <typename Fn>
void ForEachQuery(ffi::ThreadPool& pool, int64_t t, Fn fn) {
  auto progress = std::make_shared<Progress>();
  auto work = [=](Progress& p) {
    int64_t q, mine = 0;
    while ((q = p.next.fetch_add(1)) < t) {
      fn(q);
      ++mine;
    }
    if (mine && p.done.fetch_add(mine) + mine == t) {
      std::lock_guard<std::mutex> lock(p.mu);
      p.all_done.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), t - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([progress, work] { work(*progress); });
  work(*progress);
  std::unique_lock<std::mutex> lock(progress->mu);
  progress->all_done.wait(lock, [&] { return progress->done.load() == t; });
}

// scores (T, C) f32; labels (C,) s32; keys (T, 2m) u32, read as (T, m) u64; meta (T, 2) s32;
// bounds {the chunk's first row, whether the chunk is the last}.
ffi::Error Fold(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scores, ffi::Buffer<ffi::S32> labels,
                ffi::Buffer<ffi::U32> keys_in, ffi::Buffer<ffi::S32> meta_in,
                ffi::Buffer<ffi::S32> bounds, int64_t k, ffi::ResultBuffer<ffi::U32> keys_out,
                ffi::ResultBuffer<ffi::S32> meta_out) {
  const int64_t t = scores.dimensions()[0], c = scores.dimensions()[1];
  const int64_t m = keys_in.dimensions()[1] / 2;
  if (k < 1 || k > m || labels.dimensions()[0] != c || meta_in.dimensions()[1] != 2 ||
      bounds.element_count() != 2)
    return ffi::Error::InvalidArgument("snca_cpu_select: inconsistent shapes");
  const int32_t* b = bounds.typed_data();
  const int64_t base = b[0];
  const bool last = b[1] != 0;
  uint32_t* keys = keys_out->typed_data();
  int32_t* meta = meta_out->typed_data();
  if (keys != keys_in.typed_data()) std::copy_n(keys_in.typed_data(), t * 2 * m, keys);
  if (meta != meta_in.typed_data()) std::copy_n(meta_in.typed_data(), t * 2, meta);
  const float* s = scores.typed_data();
  const int32_t* l = labels.typed_data();
  uint64_t* slots = reinterpret_cast<uint64_t*>(keys);
  ForEachQuery(pool, t, [=](int64_t q) {
    FoldQuery(s + q * c, l, c, uint32_t(base), slots + q * m, meta + 2 * q, k, m, last);
  });
  return ffi::Error::Success();
}

// The dot product of two float32 rows of d, in 16 partial sums (which the compiler vectorises).
inline float Dot(const float* a, const float* b, int64_t d) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= d; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float sum = 0;
  for (; i < d; ++i) sum += a[i] * b[i];
  for (int j = 0; j < 16; ++j) sum += acc[j];
  return sum;
}

// queries (T, D) f32; bank (N, D) f32; found (T, K) f32 and rows (T, K) s32: each query's
// selection made with other scores (bfloat16 products). Out: the same rows scored again in
// float32 and sorted again, best first, ties to the lower row; entries found at -inf (slots no
// row filled) stay -inf, after the others.
ffi::Error Rescore(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> queries,
                   ffi::Buffer<ffi::F32> bank, ffi::Buffer<ffi::F32> found,
                   ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> scores_out,
                   ffi::ResultBuffer<ffi::S32> rows_out) {
  const int64_t t = found.dimensions()[0], k = found.dimensions()[1];
  const int64_t d = queries.dimensions()[1], n = bank.dimensions()[0];
  if (queries.dimensions()[0] != t || bank.dimensions()[1] != d ||
      rows.dimensions()[0] != t || rows.dimensions()[1] != k)
    return ffi::Error::InvalidArgument("snca_cpu_rescore: inconsistent shapes");
  const float *q = queries.typed_data(), *b = bank.typed_data(), *f = found.typed_data();
  const int32_t* r = rows.typed_data();
  float* s_out = scores_out->typed_data();
  int32_t* r_out = rows_out->typed_data();
  ForEachQuery(pool, t, [=](int64_t i) {
    std::unique_ptr<uint64_t[]> keys(new uint64_t[k]);
    const float* qi = q + i * d;
    const float* fi = f + i * k;
    const int32_t* ri = r + i * k;
    for (int64_t j = 0; j < k; ++j) {
      if (j + 4 < k && ri[j + 4] >= 0 && ri[j + 4] < n)     // the row after next's lines
        for (int64_t e = 0; e < d; e += 16) __builtin_prefetch(b + ri[j + 4] * d + e);
      const bool row = fi[j] > -__builtin_inff() && ri[j] >= 0 && ri[j] < n;
      keys[j] = Key(row ? Dot(qi, b + ri[j] * d, d) : -__builtin_inff(), uint32_t(ri[j]));
    }
    SortDescending(keys.get(), k);
    for (int64_t j = 0; j < k; ++j) {
      s_out[i * k + j] = Score(keys[j]);
      r_out[i * k + j] = int32_t(~uint32_t(keys[j]));
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SncaCpuSelect, Fold,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k")
                                  .Ret<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SncaCpuRescore, Rescore,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
