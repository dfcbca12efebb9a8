// N:M decode kernel for AVX2+FMA(+F16C): 8 kept values per step, their x operands picked from a
// window of x with register permutes driven by the meta bits (no gathers for windows <= 32).
//
// For values j..j+7 of a row, lane i needs x[group(j+i)*m + idx(j+i)]. All 8 lie in a window
// that starts at group(j)*m and spans at most 16 floats for 2:4, 1:2, 3:4, 4:8 and 32 for 1:4,
// 2:8, 3:8, 4:16; lane indices inside the window come from the meta bits (shift + mask) plus a
// per-lane group offset. The window is 2 or 4 registers: vpermps each, then blend on the
// index's bit 3 (and 4). Wider windows (1:8, 1:16, 2:16, 3:16) use vgatherdps.
// NOTE: slow: 4096x4096 fp32 2:4, 1 row, 1 thread on the loaded EPYC dev box: 8.5 ms vs 3.7 ms
// dense (bf16 3.9 vs 3.4; 1:4 fp32 2.9 vs 3.4), ~24 cycles per 8 values (vpermps is slow on this
// core). Since then only M = 16 runs here: M <= 8 goes to the quads kernel
// (nm_linear_quads_avx2.cpp) or the blend-planes kernel (nm_linear_planes_avx2.cpp).
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "cpu/linear_avx2.h"
#include "cpu/nm_linear.h"
#include "cpu/parallel.h"

namespace sparsekern::detail {
namespace {

constexpr int kPad = 160;  // zeros after each converted x row: the widest window is 128 floats

// x operands of the 8 lanes from the window at p; NREG 0 means gather.
template <int NREG>
SK_AVX2 inline __m256 pick(const float* p, __m256i loc, __m256 bit3, __m256 bit4) {
  if constexpr (NREG == 0) {
    return _mm256_i32gather_ps(p, loc, 4);
  } else {
    __m256 a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), loc);
    __m256 b = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p + 8), loc);
    __m256 ab = _mm256_blendv_ps(a, b, bit3);
    if constexpr (NREG == 2) {
      return ab;
    } else {
      __m256 c = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p + 16), loc);
      __m256 d = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p + 24), loc);
      return _mm256_blendv_ps(ab, _mm256_blendv_ps(c, d, bit3), bit4);
    }
  }
}

// Per-row-chunk bookkeeping that depends only on (n, m): the residue j % n of a chunk start
// cycles through at most n values; for each, the lane group offsets and the step to the next.
struct Plan {
  int n, m, bits, per, nreg;
  alignas(32) int32_t goff[16][8];
  int next_res[16], dgroup[16];
};

Plan make_plan(int n, int m) {
  Plan p{};
  p.n = n;
  p.m = m;
  p.bits = m == 2 ? 1 : m == 4 ? 2 : m == 8 ? 3 : 4;
  p.per = 32 / p.bits;
  int width = 0;
  for (int res = 0; res < n; ++res) {
    for (int i = 0; i < 8; ++i) p.goff[res][i] = (res + i) / n * m;
    p.next_res[res] = (res + 8) % n;
    p.dgroup[res] = (res + 8) / n;
  }
  for (int res = 0, q = 0; q < n; ++q, res = (res + 8) % n) width = std::max(width, p.goff[res][7] + m);
  p.nreg = width <= 16 ? 2 : width <= 32 ? 4 : 0;
  return p;
}

template <DType T, int NREG, int R>
SK_AVX2 void decode_rows(const NMLinearArgs& a, const Plan& p, const float* xf, int64_t ldf, int64_t r0,
                         int64_t o) {
  using E = typename Elem<T>::type;
  const int64_t kept = a.k / a.m * a.n;
  const E* v = static_cast<const E*>(a.values) + o * kept;
  const int32_t* mrow = a.meta + o * a.meta_words;
  const float* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = xf + (r0 + r) * ldf;
  const __m256i shifts = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(p.bits));
  const __m256i imask = _mm256_set1_epi32(p.m - 1);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t g = 0, w = 0;
  int res = 0, fld = 0;
  for (int64_t j = 0; j < kept; j += 8) {
    const bool tail = j + 8 > kept;
    __m256 wv, lane_ok;
    if (!tail) {
      wv = load8<T>(v + j);
    } else {
      wv = load_partial<T>(v + j, static_cast<int>(kept - j));
      lane_ok = lane_mask(static_cast<int>(kept - j));
    }
    const uint32_t packed = nm_meta_chunk8(mrow, a.meta_words, w, fld, p.bits);
    __m256i loc = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(packed)), shifts), imask);
    loc = _mm256_add_epi32(loc, _mm256_load_si256(reinterpret_cast<const __m256i*>(p.goff[res])));
    const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(loc, 28));
    const __m256 bit4 = _mm256_castsi256_ps(_mm256_slli_epi32(loc, 27));
    const int64_t base = g * p.m;
    for (int r = 0; r < R; ++r) {
      __m256 xv = pick<NREG>(xr[r] + base, loc, bit3, bit4);
      if (tail) xv = _mm256_and_ps(xv, lane_ok);  // lanes past the row: no 0 * inf
      acc[r] = _mm256_fmadd_ps(wv, xv, acc[r]);
    }
    g += p.dgroup[res];
    res = p.next_res[res];
    fld += 8;
    if (fld >= p.per) {
      fld -= p.per;
      ++w;
    }
  }
  const float b = a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f;
  for (int r = 0; r < R; ++r) store_f32(a.out, (r0 + r) * a.ldo + o, hsum(acc[r]) + b, a.dtype);
}

template <DType T, int NREG>
SK_AVX2 void decode_all(const NMLinearArgs& a, const Plan& p, const float* xf, int64_t ldf) {
  parallel_range(a.out_features, a.threads, 16, [&](int64_t lo, int64_t hi, int) {
    for (int64_t o = lo; o < hi; ++o) {
      int64_t r0 = 0;
      for (; r0 + 4 <= a.rows; r0 += 4) decode_rows<T, NREG, 4>(a, p, xf, ldf, r0, o);
      switch (a.rows - r0) {
        case 3: decode_rows<T, NREG, 3>(a, p, xf, ldf, r0, o); break;
        case 2: decode_rows<T, NREG, 2>(a, p, xf, ldf, r0, o); break;
        case 1: decode_rows<T, NREG, 1>(a, p, xf, ldf, r0, o); break;
        default: break;
      }
    }
  });
}

template <DType T>
void decode_dtype(const NMLinearArgs& a, const Plan& p, const float* xf, int64_t ldf) {
  switch (p.nreg) {
    case 2: return decode_all<T, 2>(a, p, xf, ldf);
    case 4: return decode_all<T, 4>(a, p, xf, ldf);
    default: return decode_all<T, 0>(a, p, xf, ldf);
  }
}

}  // namespace

void nm_linear_decode_avx2(const NMLinearArgs& a) {
  if (nm_quads_supported(a.n, a.m)) return nm_linear_decode_quads_avx2(a);
  if (nm_planes_supported(a.n, a.m)) return nm_linear_decode_planes_avx2(a);
  const Plan p = make_plan(a.n, a.m);
  const int64_t ldf = a.k + kPad;
  std::vector<float> xf(a.rows * ldf);
  convert_rows_f32(a.x, a.rows, a.k, a.ldx, a.dtype, xf.data(), ldf, a.threads);
  switch (a.dtype) {
    case DType::kBF16: return decode_dtype<DType::kBF16>(a, p, xf.data(), ldf);
    case DType::kF16: return decode_dtype<DType::kF16>(a, p, xf.data(), ldf);
    default: return decode_dtype<DType::kF32>(a, p, xf.data(), ldf);
  }
}

}  // namespace sparsekern::detail
#endif
