// AVX2 helpers shared by the N:M and BSR kernels (x86-64 only; compiled per function with
// target attributes so the library still runs on CPUs without AVX2).
#pragma once
#if defined(__x86_64__)
#include <immintrin.h>

#include "cpu/linear_common.h"

#define SK_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace sparsekern::detail {

// 8 consecutive elements as fp32.
template <DType T>
SK_AVX2 inline __m256 load8(const typename Elem<T>::type* p) {
  if constexpr (T == DType::kF32) {
    return _mm256_loadu_ps(p);
  } else if constexpr (T == DType::kBF16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

// The first n (< 8) elements as fp32, the other lanes zero; reads only n elements.
template <DType T>
SK_AVX2 inline __m256 load_partial(const typename Elem<T>::type* p, int n) {
  typename Elem<T>::type tmp[8] = {};
  for (int i = 0; i < n; ++i) tmp[i] = p[i];
  return load8<T>(tmp);
}

SK_AVX2 inline __m256 lane_mask(int n) {
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

SK_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace sparsekern::detail
#endif
