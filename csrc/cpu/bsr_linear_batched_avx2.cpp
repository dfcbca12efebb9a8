// Block-sparse linear, many rows of x, AVX2+FMA(+F16C).
//
// x is first repacked (and converted to fp32) column-block-major, xp[kb][rows][bk], so the
// segment one stored block multiplies is contiguous for consecutive rows. Then one task per
// block row (bm output features), largest first: the task packs its stored blocks once,
// transposed and converted to fp32 (quantized blocks dequantized), into 16-column slices
// [slice][k_eff][16], where k_eff = (valid blocks in the row) * bk is the gathered reduction
// length, and a 6-row x 16-column register micro-kernel (12 accumulators, 2 weight loads and 6
// broadcasts per k) runs the whole k_eff loop per output tile; C is written once, bias added,
// in the output dtype.
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <numeric>
#include <vector>

#include "cpu/bsr_linear.h"
#include "cpu/linear_avx2.h"
#include "cpu/parallel.h"

namespace sparsekern::detail {
namespace {

constexpr int kMR = 6;   // x rows per micro tile
constexpr int kNR = 16;  // output features per micro tile (one packed slice)
// NOTE: x rows per chunk; every 16-column slice of a block row runs over the chunk before the
// next chunk, so its x segments (24 x k_eff fp32: 39 KB at 90% sparse 32x32, K=4096) are still
// in L1/L2 for the second slice. 4096x4096 @ 512 rows, x read in place: 12 rows 141 GFLOP/s,
// 24 141, 36 140, 114 (an L2-sized chunk) 129, all 512 rows 117; with packed x and the
// prefetch below: 24 rows 143, 48 rows 139.
constexpr int64_t kRowChunk = 24;

// NOTE: the 6x16 tile is the largest that fits AVX2's 16 registers (12 accumulators, 2 weight
// vectors, 1 broadcast). Written out with named accumulators: the earlier array-of-__m256 form
// made GCC 12 store all 12 accumulators to the stack on every k step (12 stores per 12 FMAs,
// store-port bound), which held 4096x4096 @ 512 rows, 90% of 32x32 blocks, to 51 GFLOP/s.
template <int MR>
SK_AVX2 inline void micro(const float* x, int64_t ldx, const int64_t* xoff, int64_t nblk, int bk, const float* w,
                          __m256* c) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float* x0 = x;
  const float* x1 = x + ldx * (MR > 1 ? 1 : 0);
  const float* x2 = x + ldx * (MR > 2 ? 2 : 0);
  const float* x3 = x + ldx * (MR > 3 ? 3 : 0);
  const float* x4 = x + ldx * (MR > 4 ? 4 : 0);
  const float* x5 = x + ldx * (MR > 5 ? 5 : 0);
  for (int64_t bi = 0; bi < nblk; ++bi) {
    const int64_t off = xoff[bi];
    const float *p0 = x0 + off, *p1 = x1 + off, *p2 = x2 + off, *p3 = x3 + off, *p4 = x4 + off, *p5 = x5 + off;
    // NOTE: the next tile's segment of this block (the following kMR * bk floats of packed x)
    // into L2: the broadcasts feed the FMA chains directly, so an L3 miss at each block start
    // stalls them. 4096x4096 @ 512 rows, 90% of 32x32: 126 -> 143 GFLOP/s (into L1: 140; a
    // full chunk ahead: 141). Prefetches never fault, so running past the buffer is harmless.
    const char* pf = reinterpret_cast<const char*>(p0 + kMR * ldx);
    for (int64_t l = 0; l < kMR * ldx * 4; l += 64) _mm_prefetch(pf + l, _MM_HINT_T1);
    for (int kk = 0; kk < bk; ++kk, w += kNR) {
      const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
      __m256 xv = _mm256_broadcast_ss(p0 + kk);
      c00 = _mm256_fmadd_ps(xv, w0, c00);
      c01 = _mm256_fmadd_ps(xv, w1, c01);
      if constexpr (MR > 1) {
        xv = _mm256_broadcast_ss(p1 + kk);
        c10 = _mm256_fmadd_ps(xv, w0, c10);
        c11 = _mm256_fmadd_ps(xv, w1, c11);
      }
      if constexpr (MR > 2) {
        xv = _mm256_broadcast_ss(p2 + kk);
        c20 = _mm256_fmadd_ps(xv, w0, c20);
        c21 = _mm256_fmadd_ps(xv, w1, c21);
      }
      if constexpr (MR > 3) {
        xv = _mm256_broadcast_ss(p3 + kk);
        c30 = _mm256_fmadd_ps(xv, w0, c30);
        c31 = _mm256_fmadd_ps(xv, w1, c31);
      }
      if constexpr (MR > 4) {
        xv = _mm256_broadcast_ss(p4 + kk);
        c40 = _mm256_fmadd_ps(xv, w0, c40);
        c41 = _mm256_fmadd_ps(xv, w1, c41);
      }
      if constexpr (MR > 5) {
        xv = _mm256_broadcast_ss(p5 + kk);
        c50 = _mm256_fmadd_ps(xv, w0, c50);
        c51 = _mm256_fmadd_ps(xv, w1, c51);
      }
    }
  }
  c[0] = c00, c[1] = c01, c[2] = c10, c[3] = c11, c[4] = c20, c[5] = c21;
  c[6] = c30, c[7] = c31, c[8] = c40, c[9] = c41, c[10] = c50, c[11] = c51;
}

SK_AVX2 void micro_rows(int mr, const float* x, int64_t ldx, const int64_t* xoff, int64_t nblk, int bk,
                        const float* w, __m256* c) {
  switch (mr) {
    case 6: return micro<6>(x, ldx, xoff, nblk, bk, w, c);
    case 5: return micro<5>(x, ldx, xoff, nblk, bk, w, c);
    case 4: return micro<4>(x, ldx, xoff, nblk, bk, w, c);
    case 3: return micro<3>(x, ldx, xoff, nblk, bk, w, c);
    case 2: return micro<2>(x, ldx, xoff, nblk, bk, w, c);
    default: return micro<1>(x, ldx, xoff, nblk, bk, w, c);
  }
}

// Columns kk .. kk + 7 of stored block row `row` (block * bm + i) of quantized blocks as fp32:
// (q - zero) * scale, one group for all 8 (groups are runs of a multiple of 8 columns).
template <DType T>
SK_AVX2 inline __m256 dequant8(const BSRLinearArgs& a, int64_t row, int kk) {
  const __m256i q = load8q(a.blocks, a.qbits, row * a.bk + kk);
  const int64_t g = row * a.groups + kk / (a.bk / a.groups);
  const float zero = static_cast<float>(a.zeros ? a.zeros[g] : symmetric_zero(a.qbits));
  const float scale = Elem<T>::load(static_cast<const typename Elem<T>::type*>(a.scales)[g]);
  return _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(zero)), _mm256_set1_ps(scale));
}

// Packs block row rb: valid blocks (in storage order; quantized ones dequantized) transposed
// into fp32 slices wt[s][k_eff][kNR], columns past bm zero; xoff[i] = where the i-th valid
// block's column block starts in the packed x (see pack_x).
template <DType T>
SK_AVX2 int64_t pack_row(const BSRLinearArgs& a, int64_t rb, std::vector<float>& wt, std::vector<int64_t>& xoff) {
  using E = typename Elem<T>::type;
  const int bm = a.bm, bk = a.bk;
  const int64_t kb = a.k / bk, bsz = static_cast<int64_t>(bm) * bk, slices = (bm + kNR - 1) / kNR;
  const E* blocks = static_cast<const E*>(a.blocks);
  int64_t begin, end;
  bsr_row_range(a, rb, &begin, &end);
  xoff.clear();
  for (int64_t b = begin; b < end; ++b) {
    const int64_t c = a.col[b];
    if (c >= 0 && c < kb) xoff.push_back(c * a.rows * bk);
  }
  const int64_t nblk = static_cast<int64_t>(xoff.size()), keff = nblk * bk;
  wt.resize(static_cast<size_t>(slices * keff * kNR));
  if (bm % kNR) {  // zero the padding columns of the last slice
    float* last = wt.data() + (slices - 1) * keff * kNR;
    for (int64_t i = 0; i < keff; ++i) std::fill(last + i * kNR + bm % kNR, last + (i + 1) * kNR, 0.0f);
  }
  int64_t bi = 0;
  for (int64_t b = begin; b < end; ++b) {
    const int64_t c = a.col[b];
    if (c < 0 || c >= kb) continue;
    for (int o = 0; o < bm; ++o) {
      float* dst = wt.data() + (o / kNR) * keff * kNR + bi * bk * kNR + o % kNR;
      const E* src = a.qbits ? nullptr : blocks + b * bsz + static_cast<int64_t>(o) * bk;
      int kk = 0;
      for (; kk + 8 <= bk; kk += 8) {
        alignas(32) float v[8];
        _mm256_store_ps(v, a.qbits ? dequant8<T>(a, b * bm + o, kk) : load8<T>(src + kk));
        for (int j = 0; j < 8; ++j) dst[(kk + j) * kNR] = v[j];
      }
      for (; kk < bk; ++kk) dst[kk * kNR] = load_f32(src, kk, T);  // float blocks only (quantized: bk % 8 == 0)
    }
    ++bi;
  }
  return nblk;
}

// xp[c][r][0:bk] = fp32(x[r][c*bk : (c+1)*bk]) for column blocks c < kb, rows [r0, r1).
template <DType T>
SK_AVX2 void pack_x(const BSRLinearArgs& a, float* xp, int64_t r0, int64_t r1) {
  using E = typename Elem<T>::type;
  const int bk = a.bk, full = bk / 8 * 8;
  const int64_t kb = a.k / bk;
  const E* x = static_cast<const E*>(a.x);
  for (int64_t r = r0; r < r1; ++r) {
    const E* src = x + r * a.ldx;
    for (int64_t c = 0; c < kb; ++c, src += bk) {
      float* dst = xp + (c * a.rows + r) * bk;
      for (int kk = 0; kk < full; kk += 8) _mm256_storeu_ps(dst + kk, load8<T>(src + kk));
      for (int kk = full; kk < bk; ++kk) dst[kk] = load_f32(src, kk, T);
    }
  }
}

// One block row rb: its blocks packed (into the thread's wt/xoff), then every row of x.
template <DType T>
SK_AVX2 void block_row(const BSRLinearArgs& a, const float* xp, int64_t rb, std::vector<float>& wt,
                       std::vector<int64_t>& xoff) {
  using E = typename Elem<T>::type;
  const int bm = a.bm, bk = a.bk;
  const int64_t slices = (bm + kNR - 1) / kNR;
  E* out = static_cast<E*>(a.out);
  alignas(32) float bias[kNR];
  __m256 c[2 * kMR];
  const int64_t nblk = pack_row<T>(a, rb, wt, xoff), keff = nblk * bk;
  for (int64_t lo = 0; lo < a.rows; lo += kRowChunk) {
    const int64_t hi = std::min(a.rows, lo + kRowChunk);
    for (int64_t s = 0; s < slices; ++s) {
      const int64_t col0 = rb * bm + s * kNR;
      const int ncol = std::min<int>(kNR, bm - static_cast<int>(s * kNR));
      for (int j = 0; j < kNR; ++j) bias[j] = a.bias && j < ncol ? load_f32(a.bias, col0 + j, a.dtype) : 0.0f;
      const __m256 b0 = _mm256_load_ps(bias), b1 = _mm256_load_ps(bias + 8);
      const float* ws = wt.data() + s * keff * kNR;
      for (int64_t r0 = lo; r0 < hi; r0 += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, hi - r0));
        micro_rows(mr, xp + r0 * bk, bk, xoff.data(), nblk, bk, ws, c);
        for (int r = 0; r < mr; ++r) {
          E* dst = out + (r0 + r) * a.ldo + col0;
          store8<T>(dst, _mm256_add_ps(c[2 * r], b0), std::min(ncol, 8));
          if (ncol > 8) store8<T>(dst + 8, _mm256_add_ps(c[2 * r + 1], b1), ncol - 8);
        }
      }
    }
  }
}

template <DType T>
void batched(const BSRLinearArgs& a) {
  const int64_t kb = a.k / a.bk;
  // NOTE: x repacked column-block-major: 4096x4096 @ 512 rows, 90% of 32x32 blocks ran 134
  // GFLOP/s reading x rows in place (each 6-row tile gathers from ~80 pages 16 KB apart, x's
  // 8 MB overflowing the TLB), 172 GFLOP/s when the same x fit in cache; the repack costs
  // one pass over x (~0.4 ms of ~10 ms) and is also where bf16/fp16 x is converted.
  std::unique_ptr<float[]> xp(new float[static_cast<size_t>(kb * a.rows * a.bk)]);
  // Largest block rows first: the last chunks claimed are small ones.
  std::vector<int64_t> order(a.block_rows), nnz_of(a.block_rows);
  for (int64_t rb = 0; rb < a.block_rows; ++rb) {
    int64_t begin, end;
    bsr_row_range(a, rb, &begin, &end);
    nnz_of[rb] = end - begin;
  }
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return nnz_of[p] > nnz_of[q]; });
  parallel_range(a.rows, a.threads, grain_for(a.k),
                 [&](int64_t r0, int64_t r1, int) { pack_x<T>(a, xp.get(), r0, r1); });
  std::vector<std::vector<float>> wt(a.threads);
  std::vector<std::vector<int64_t>> xoff(a.threads);
  parallel_for(a.block_rows, a.threads,
               [&](int64_t t, int slot) { block_row<T>(a, xp.get(), order[t], wt[slot], xoff[slot]); });
}

}  // namespace

void bsr_linear_batched_avx2(const BSRLinearArgs& a) {
  switch (a.dtype) {
    case DType::kBF16: return batched<DType::kBF16>(a);
    case DType::kF16: return batched<DType::kF16>(a);
    default: return batched<DType::kF32>(a);
  }
}

}  // namespace sparsekern::detail
#endif
