// Block-sparse linear, decode kernel (few rows), AVX2+FMA(+F16C): each stored block is streamed
// once; every block row i is a dot product with the matching x segment, accumulated as 8-lane
// partial sums across the blocks of a block row and reduced once at the end. The batched
// kernel is in bsr_linear_batched_avx2.cpp.
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "cpu/bsr_linear.h"
#include "cpu/linear_avx2.h"
#include "cpu/parallel.h"

namespace sparsekern::detail {
namespace {

constexpr int kPad = 8;  // zeros after each converted x row: the bk tail reads one full vector

template <DType T, int R>
SK_AVX2 void decode_block_row(const BSRLinearArgs& a, const float* xf, int64_t ldf, int64_t r0, int64_t rb,
                              __m256* accbuf) {
  using E = typename Elem<T>::type;
  const int bm = a.bm, bk = a.bk, full = bk / 8 * 8, rem = bk - full;
  const int64_t kb = a.k / bk, bsz = static_cast<int64_t>(bm) * bk;
  const E* blocks = static_cast<const E*>(a.blocks);
  const __m256 tail_ok = lane_mask(rem);
  for (int i = 0; i < bm * R; ++i) accbuf[i] = _mm256_setzero_ps();
  int64_t begin, end;
  bsr_row_range(a, rb, &begin, &end);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t c = a.col[b];
    if (c < 0 || c >= kb) continue;
    const float* xs[R];
    for (int r = 0; r < R; ++r) xs[r] = xf + (r0 + r) * ldf + c * bk;
    const E* blk = blocks + b * bsz;
    for (int i = 0; i < bm; ++i) {
      const E* wr = blk + static_cast<int64_t>(i) * bk;
      __m256 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = accbuf[i * R + r];
      for (int kk = 0; kk < full; kk += 8) {
        const __m256 w = load8<T>(wr + kk);
        for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs[r] + kk), acc[r]);
      }
      if (rem) {
        const __m256 w = load_partial<T>(wr + full, rem);
        for (int r = 0; r < R; ++r)
          acc[r] = _mm256_fmadd_ps(w, _mm256_and_ps(_mm256_loadu_ps(xs[r] + full), tail_ok), acc[r]);
      }
      for (int r = 0; r < R; ++r) accbuf[i * R + r] = acc[r];
    }
  }
  for (int i = 0; i < bm; ++i)
    for (int r = 0; r < R; ++r) bsr_store(a, r0 + r, rb * bm + i, hsum(accbuf[i * R + r]));
}

// decode_block_row<T, 1> for bk = 8 * NV: the block's x segment is loaded once into NV registers
// for all bm rows of the block (decode_block_row loads it again for every row: accbuf's stores
// may alias it). NOTE: 2 threads, Zen 4, 1 row, block 32x32 at 90%, weights streamed from memory
// (>= 100 MB in rotation), 5 interleaved rounds, decode_block_row -> this: fp32 2048x2048 62 ->
// 52 us, 4096x4096 198 -> 176, 32000x2048 819 -> 713 (1.11-1.19x over five shapes); bf16 1.10-1.16x.
template <DType T, int NV>
SK_AVX2 void decode_block_row1(const BSRLinearArgs& a, const float* x, int64_t rb, __m256* accbuf) {
  using E = typename Elem<T>::type;
  const int bm = a.bm, bk = 8 * NV;
  const int64_t kb = a.k / bk, bsz = static_cast<int64_t>(bm) * bk;
  const E* blocks = static_cast<const E*>(a.blocks);
  for (int i = 0; i < bm; ++i) accbuf[i] = _mm256_setzero_ps();
  int64_t begin, end;
  bsr_row_range(a, rb, &begin, &end);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t c = a.col[b];
    if (c < 0 || c >= kb) continue;
    __m256 xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = _mm256_loadu_ps(x + c * bk + 8 * v);
    const E* blk = blocks + b * bsz;
    for (int i = 0; i < bm; ++i) {
      const E* wr = blk + static_cast<int64_t>(i) * bk;
      __m256 acc = accbuf[i];
      for (int v = 0; v < NV; ++v) acc = _mm256_fmadd_ps(load8<T>(wr + 8 * v), xv[v], acc);
      accbuf[i] = acc;
    }
  }
  for (int i = 0; i < bm; ++i) bsr_store(a, 0, rb * bm + i, hsum(accbuf[i]));
}

template <DType T>
void decode_dtype(const BSRLinearArgs& a, const float* xf, int64_t ldf) {
  // 8-lane partial sums for bm x 4 rows per thread, 32-byte aligned by hand (vector<__m256> is not).
  const size_t per = static_cast<size_t>(a.bm) * 4 * 8;
  std::vector<float> store(per * a.threads + 8);
  float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(store.data()) + 31) & ~uintptr_t{31});
  parallel_block_rows(a, [&](int64_t rb, int slot) {
    __m256* accbuf = reinterpret_cast<__m256*>(base + per * slot);
    if (a.rows == 1) {
      switch (a.bk) {
        case 16: return decode_block_row1<T, 2>(a, xf, rb, accbuf);
        case 32: return decode_block_row1<T, 4>(a, xf, rb, accbuf);
        case 64: return decode_block_row1<T, 8>(a, xf, rb, accbuf);
        default: break;
      }
    }
    int64_t r0 = 0;
    for (; r0 + 4 <= a.rows; r0 += 4) decode_block_row<T, 4>(a, xf, ldf, r0, rb, accbuf);
    switch (a.rows - r0) {
      case 3: decode_block_row<T, 3>(a, xf, ldf, r0, rb, accbuf); break;
      case 2: decode_block_row<T, 2>(a, xf, ldf, r0, rb, accbuf); break;
      case 1: decode_block_row<T, 1>(a, xf, ldf, r0, rb, accbuf); break;
      default: break;
    }
  });
}

}  // namespace

void bsr_linear_decode_avx2(const BSRLinearArgs& a) {
  const int64_t ldf = a.k + kPad;
  std::vector<float> xf(a.rows * ldf);
  convert_rows_f32(a.x, a.rows, a.k, a.ldx, a.dtype, xf.data(), ldf, a.threads);
  switch (a.dtype) {
    case DType::kBF16: return decode_dtype<DType::kBF16>(a, xf.data(), ldf);
    case DType::kF16: return decode_dtype<DType::kF16>(a, xf.data(), ldf);
    default: return decode_dtype<DType::kF32>(a, xf.data(), ldf);
  }
}

}  // namespace sparsekern::detail
#endif
