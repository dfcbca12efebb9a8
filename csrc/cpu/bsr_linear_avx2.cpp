// Block-sparse linear kernels for AVX2+FMA(+F16C).
//
// Decode (few rows): each stored block is streamed once; every block row i is a dot product
// with the matching x segment, accumulated as 8-lane partial sums across the blocks of a block
// row and reduced once at the end.
// Batched (many rows): per (block row, chunk of x rows) task, the block row's blocks are packed
// transposed into fp32 [block][bk][bm rounded up to 8], then a 6-row x 16-column register
// micro-kernel (12 accumulators) broadcasts x and streams the packed weights, accumulating
// over every block of the row before it stores.
#if defined(__x86_64__)
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <vector>

#include "cpu/bsr_linear.h"
#include "cpu/linear_avx2.h"

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
  for (int i = 0; i < bm; ++i) {
    const int64_t o = rb * bm + i;
    const float bias = a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f;
    for (int r = 0; r < R; ++r) store_f32(a.out, (r0 + r) * a.ldo + o, hsum(accbuf[i * R + r]) + bias, a.dtype);
  }
}

template <DType T>
void decode_dtype(const BSRLinearArgs& a, const float* xf, int64_t ldf) {
#pragma omp parallel num_threads(a.threads)
  {
    // 8-lane partial sums for bm x 4 rows, 32-byte aligned by hand (vector<__m256> is not).
    std::vector<float> store(static_cast<size_t>(a.bm) * 4 * 8 + 8);
    __m256* accbuf = reinterpret_cast<__m256*>((reinterpret_cast<uintptr_t>(store.data()) + 31) & ~uintptr_t{31});
#pragma omp for schedule(dynamic, 1)
    for (int64_t rb = 0; rb < a.block_rows; ++rb) {
      int64_t r0 = 0;
      for (; r0 + 4 <= a.rows; r0 += 4) decode_block_row<T, 4>(a, xf, ldf, r0, rb, accbuf);
      switch (a.rows - r0) {
        case 3: decode_block_row<T, 3>(a, xf, ldf, r0, rb, accbuf); break;
        case 2: decode_block_row<T, 2>(a, xf, ldf, r0, rb, accbuf); break;
        case 1: decode_block_row<T, 1>(a, xf, ldf, r0, rb, accbuf); break;
        default: break;
      }
    }
  }
}

// acc[MR][NV*8] += x rows (broadcast) * packed weights, over all packed blocks of a block row.
template <int MR, int NV>
SK_AVX2 void micro(const float* x, int64_t ldx, const int64_t* xoff, const float* wt, int64_t nblk, int bk,
                   int64_t bmp, float* res) {
  __m256 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t bi = 0; bi < nblk; ++bi) {
    const float* xb = x + xoff[bi];
    const float* w = wt + bi * bk * bmp;
    for (int kk = 0; kk < bk; ++kk, w += bmp) {
      __m256 wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = _mm256_loadu_ps(w + 8 * v);
      for (int r = 0; r < MR; ++r) {
        const __m256 xv = _mm256_broadcast_ss(xb + r * ldx + kk);
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(xv, wv[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(res + r * 16 + 8 * v, acc[r][v]);
}

template <int NV>
SK_AVX2 void micro_rows(int mr, const float* x, int64_t ldx, const int64_t* xoff, const float* wt, int64_t nblk,
                        int bk, int64_t bmp, float* res) {
  switch (mr) {
    case 6: return micro<6, NV>(x, ldx, xoff, wt, nblk, bk, bmp, res);
    case 5: return micro<5, NV>(x, ldx, xoff, wt, nblk, bk, bmp, res);
    case 4: return micro<4, NV>(x, ldx, xoff, wt, nblk, bk, bmp, res);
    case 3: return micro<3, NV>(x, ldx, xoff, wt, nblk, bk, bmp, res);
    case 2: return micro<2, NV>(x, ldx, xoff, wt, nblk, bk, bmp, res);
    default: return micro<1, NV>(x, ldx, xoff, wt, nblk, bk, bmp, res);
  }
}

constexpr int kMR = 6;
// NOTE: 96 rows of x per task keep the x segments one block row touches (~96 x 410 fp32 at
// 90% sparse 32x32, K=4096: 157 KB) in L2 while the packed weights of one 16-column slice
// (~26 KB) stay in L1.
constexpr int64_t kRowChunk = 96;

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

void bsr_linear_batched_avx2(const BSRLinearArgs& a) {
  const float* x = static_cast<const float*>(a.x);
  int64_t ldx = a.ldx;
  std::vector<float> xf;
  if (a.dtype != DType::kF32) {
    xf.resize(a.rows * a.k);
    convert_rows_f32(a.x, a.rows, a.k, a.ldx, a.dtype, xf.data(), a.k, a.threads);
    x = xf.data();
    ldx = a.k;
  }
  const int bm = a.bm, bk = a.bk;
  const int64_t bmp = (bm + 7) / 8 * 8, kb = a.k / bk, bsz = static_cast<int64_t>(bm) * bk;
  const int64_t chunks = (a.rows + kRowChunk - 1) / kRowChunk, tasks = a.block_rows * chunks;
#pragma omp parallel num_threads(a.threads)
  {
    std::vector<float> wt;
    std::vector<int64_t> xoff;
    alignas(32) float res[kMR * 16];
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t rb = task / chunks, rlo = task % chunks * kRowChunk;
      const int64_t rhi = std::min(a.rows, rlo + kRowChunk);
      int64_t begin, end;
      bsr_row_range(a, rb, &begin, &end);
      xoff.clear();
      wt.assign(static_cast<size_t>(end - begin) * bk * bmp, 0.0f);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t c = a.col[b];
        if (c < 0 || c >= kb) continue;
        float* dst = wt.data() + static_cast<int64_t>(xoff.size()) * bk * bmp;
        for (int o = 0; o < bm; ++o)
          for (int kk = 0; kk < bk; ++kk) dst[kk * bmp + o] = load_f32(a.blocks, b * bsz + o * bk + kk, a.dtype);
        xoff.push_back(c * bk);
      }
      const int64_t nblk = static_cast<int64_t>(xoff.size());
      for (int64_t o = 0; o < bmp; o += 16) {
        const int nv = bmp - o >= 16 ? 2 : 1, ncol = std::min<int>(nv * 8, bm - static_cast<int>(o));
        for (int64_t r0 = rlo; r0 < rhi; r0 += kMR) {
          const int mr = static_cast<int>(std::min<int64_t>(kMR, rhi - r0));
          const float* xr = x + r0 * ldx;
          if (nv == 2) {
            micro_rows<2>(mr, xr, ldx, xoff.data(), wt.data() + o, nblk, bk, bmp, res);
          } else {
            micro_rows<1>(mr, xr, ldx, xoff.data(), wt.data() + o, nblk, bk, bmp, res);
          }
          for (int r = 0; r < mr; ++r) {
            for (int l = 0; l < ncol; ++l) {
              const int64_t col = rb * bm + o + l;
              const float bias = a.bias ? load_f32(a.bias, col, a.dtype) : 0.0f;
              store_f32(a.out, (r0 + r) * a.ldo + col, res[r * 16 + l] + bias, a.dtype);
            }
          }
        }
      }
    }
  }
}

}  // namespace sparsekern::detail
#endif
