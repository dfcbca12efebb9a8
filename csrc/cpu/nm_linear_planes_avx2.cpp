// N:M decode kernel for AVX2+FMA(+F16C), M = 2, 4, 8: x operands selected with blends from
// per-call "planes" of x instead of permutes.
//
// Plane q of an x row holds, for every kept slot j, the x value that slot would read if its
// in-group index were q: plane[q][j] = x[m * (j / n) + q] (n * K floats per row, built once per
// call). Slot j's operand is then plane[idx(j)][j]: 8 consecutive slots are m contiguous loads
// reduced by a blendv tree whose masks are the meta bits moved to the sign bit with one vpsllvd
// (lane i of a broadcast chunk shifted left by 32 - bits * (i + 1)) and vpslld by 1 and 2.
// No permutes, no LUT, no gathers; the values stream once in their stored order.
// Used for the M <= 8 patterns the quads kernel (nm_linear_quads_avx2.cpp, faster: no blend tree)
// does not cover: 1:2, 3:4, 3:8, 5:8, 6:8, 7:8.
// NOTE: 4096x4096, 1 row, 1 thread, standalone loop on the loaded 2-core EPYC, ns per 8 kept
// values (fp32 / bf16 weights): 2:4 2.35 / 1.88, 1:4 2.39 / 1.46, 2:8 4.6 / 3.8; the vpermps
// window kernel (nm_linear_avx2.cpp, now M = 16 only) ~8.
#if defined(__x86_64__)
#include <immintrin.h>

#include <vector>

#include "cpu/linear_avx2.h"
#include "cpu/nm_linear.h"
#include "cpu/parallel.h"

namespace sparsekern::detail {
namespace {

// Shift that puts lane i's top index bit at bit 31 (chunk field i starts at bit bits * i).
template <int BITS>
SK_AVX2 inline __m256i top_shifts() {
  return _mm256_setr_epi32(32 - BITS, 32 - 2 * BITS, 32 - 3 * BITS, 32 - 4 * BITS, 32 - 5 * BITS, 32 - 6 * BITS,
                           32 - 7 * BITS, 32 - 8 * BITS);
}

// Operands of 8 slots from the M planes at p (plane stride ps); sel's lane sign bits hold the
// top index bit, and each left shift by one exposes the next lower bit.
template <int M>
SK_AVX2 inline __m256 select(const float* p, int64_t ps, __m256i sel) {
  if constexpr (M == 2) {
    return _mm256_blendv_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + ps), _mm256_castsi256_ps(sel));
  } else if constexpr (M == 4) {
    const __m256 s1 = _mm256_castsi256_ps(sel), s0 = _mm256_castsi256_ps(_mm256_slli_epi32(sel, 1));
    const __m256 lo = _mm256_blendv_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + ps), s0);
    const __m256 hi = _mm256_blendv_ps(_mm256_loadu_ps(p + 2 * ps), _mm256_loadu_ps(p + 3 * ps), s0);
    return _mm256_blendv_ps(lo, hi, s1);
  } else {
    const __m256 s2 = _mm256_castsi256_ps(sel), s1 = _mm256_castsi256_ps(_mm256_slli_epi32(sel, 1));
    const __m256 s0 = _mm256_castsi256_ps(_mm256_slli_epi32(sel, 2));
    __m256 a = _mm256_blendv_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + ps), s0);
    __m256 b = _mm256_blendv_ps(_mm256_loadu_ps(p + 2 * ps), _mm256_loadu_ps(p + 3 * ps), s0);
    __m256 c = _mm256_blendv_ps(_mm256_loadu_ps(p + 4 * ps), _mm256_loadu_ps(p + 5 * ps), s0);
    __m256 d = _mm256_blendv_ps(_mm256_loadu_ps(p + 6 * ps), _mm256_loadu_ps(p + 7 * ps), s0);
    return _mm256_blendv_ps(_mm256_blendv_ps(a, b, s1), _mm256_blendv_ps(c, d, s1), s2);
  }
}

// Meta bits of slots j .. j+7 in the low 8 * BITS bits (higher bits are ignored by the shifts:
// they land above bit 31). BITS 1 and 2 never straddle a word; 3 does (10 fields per word).
template <int BITS>
inline uint32_t chunk(const int32_t* mrow, int64_t words, int64_t j) {
  if constexpr (BITS == 3) {
    return nm_meta_chunk8(mrow, words, j / 10, static_cast<int>(j % 10), 3);
  } else {
    const int64_t bit = j * BITS;
    return static_cast<uint32_t>(mrow[bit >> 5]) >> (bit & 31);
  }
}

template <DType T, int M, int R>
SK_AVX2 void planes_rows(const NMLinearArgs& a, const float* planes, int64_t ps, int64_t r0, int64_t o) {
  constexpr int BITS = M == 2 ? 1 : M == 4 ? 2 : 3;
  using E = typename Elem<T>::type;
  const int64_t kept = a.k / a.m * a.n, rs = M * ps;  // rs: one x row's planes
  const E* v = static_cast<const E*>(a.values) + o * kept;
  const int32_t* mrow = a.meta + o * a.meta_words;
  const float* xp = planes + r0 * rs;
  const __m256i shifts = top_shifts<BITS>();
  // Two independent chains per row: an FMA's latency spans more than one 8-slot step.
  __m256 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= kept; j += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(v + j) + 2048, _MM_HINT_T0);  // NOTE: +10-15% at 1 row
    const __m256 w0 = load8<T>(v + j), w1 = load8<T>(v + j + 8);
    const __m256i sel0 = _mm256_sllv_epi32(_mm256_set1_epi32(static_cast<int>(chunk<BITS>(mrow, a.meta_words, j))),
                                           shifts);
    const __m256i sel1 = _mm256_sllv_epi32(
        _mm256_set1_epi32(static_cast<int>(chunk<BITS>(mrow, a.meta_words, j + 8))), shifts);
    for (int r = 0; r < R; ++r) {
      acc0[r] = _mm256_fmadd_ps(w0, select<M>(xp + r * rs + j, ps, sel0), acc0[r]);
      acc1[r] = _mm256_fmadd_ps(w1, select<M>(xp + r * rs + j + 8, ps, sel1), acc1[r]);
    }
  }
  for (; j < kept; j += 8) {  // planes are zero-padded to whole steps: tail lanes add 0 * 0
    const __m256 w0 = j + 8 <= kept ? load8<T>(v + j) : load_partial<T>(v + j, static_cast<int>(kept - j));
    const __m256i sel0 = _mm256_sllv_epi32(_mm256_set1_epi32(static_cast<int>(chunk<BITS>(mrow, a.meta_words, j))),
                                           shifts);
    for (int r = 0; r < R; ++r) acc0[r] = _mm256_fmadd_ps(w0, select<M>(xp + r * rs + j, ps, sel0), acc0[r]);
  }
  const float b = a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f;
  for (int r = 0; r < R; ++r)
    store_f32(a.out, (r0 + r) * a.ldo + o, hsum(_mm256_add_ps(acc0[r], acc1[r])) + b, a.dtype);
}

template <DType T, int M>
SK_AVX2 void planes_all(const NMLinearArgs& a, const float* planes, int64_t ps) {
  parallel_range(a.out_features, a.threads, 16, [&](int64_t lo, int64_t hi, int) {
    for (int64_t o = lo; o < hi; ++o) {
      int64_t r0 = 0;
      for (; r0 + 4 <= a.rows; r0 += 4) planes_rows<T, M, 4>(a, planes, ps, r0, o);
      switch (a.rows - r0) {
        case 3: planes_rows<T, M, 3>(a, planes, ps, r0, o); break;
        case 2: planes_rows<T, M, 2>(a, planes, ps, r0, o); break;
        case 1: planes_rows<T, M, 1>(a, planes, ps, r0, o); break;
        default: break;
      }
    }
  });
}

template <int M>
void planes_dtype(const NMLinearArgs& a, const float* planes, int64_t ps) {
  switch (a.dtype) {
    case DType::kBF16: return planes_all<DType::kBF16, M>(a, planes, ps);
    case DType::kF16: return planes_all<DType::kF16, M>(a, planes, ps);
    default: return planes_all<DType::kF32, M>(a, planes, ps);
  }
}

}  // namespace

bool nm_planes_supported(int n, int m) { return (m == 2 || m == 4 || m == 8) && n > 0 && n < m; }

void nm_linear_decode_planes_avx2(const NMLinearArgs& a) {
  const int64_t kept = a.k / a.m * a.n, groups = a.k / a.m;
  const int64_t ps = (kept + 7) / 8 * 8;  // plane stride: whole 8-slot steps, zero tail
  std::vector<float> planes(a.rows * a.m * ps, 0.0f);
  parallel_range(a.rows, a.threads, grain_for(a.m * ps), [&](int64_t lo, int64_t hi, int) {
    for (int64_t r = lo; r < hi; ++r) {
      float* pr = planes.data() + r * a.m * ps;
      for (int64_t g = 0; g < groups; ++g) {
        for (int q = 0; q < a.m; ++q) {
          const float xv = load_f32(a.x, r * a.ldx + g * a.m + q, a.dtype);
          for (int s = 0; s < a.n; ++s) pr[q * ps + g * a.n + s] = xv;
        }
      }
    }
  });
  switch (a.m) {
    case 2: return planes_dtype<2>(a, planes.data(), ps);
    case 4: return planes_dtype<4>(a, planes.data(), ps);
    default: return planes_dtype<8>(a, planes.data(), ps);
  }
}

}  // namespace sparsekern::detail
#endif
