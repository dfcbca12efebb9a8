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

// Quantized elements i .. i + 7 as int32 lanes: int8, or int4 two per byte (element 2j in the
// low nibble of byte j, unsigned; i even).
SK_AVX2 inline __m256i load8q(const void* values, int qbits, int64_t i) {
  if (qbits == 8) {
    const int8_t* p = static_cast<const int8_t*>(values) + i;
    return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  int32_t four;  // nibble c at bits 4c
  std::memcpy(&four, static_cast<const uint8_t*>(values) + i / 2, sizeof four);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(four), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                          _mm256_set1_epi32(15));
}

// 8 fp32 lanes to the output dtype; n < 8 writes only the first n elements.
template <DType T>
SK_AVX2 inline void store8(typename Elem<T>::type* p, __m256 v, int n) {
  if constexpr (T == DType::kF32) {
    if (n == 8) return _mm256_storeu_ps(p, v);
    return _mm256_maskstore_ps(p, _mm256_castps_si256(lane_mask(n)), v);
  } else {
    __m128i h;
    if constexpr (T == DType::kF16) {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {  // bf16, round to nearest even, NaN kept quiet (as f32_to_bf16)
      const __m256i u = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
      const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
      const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
      const __m256i r = _mm256_blendv_epi8(rounded, quiet, nan);
      // 32-bit lanes hold values < 2^16: pack to 16 bits (packus works per 128-bit half).
      h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    }
    if (n == 8) return _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    alignas(16) uint16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
    for (int i = 0; i < n; ++i) p[i] = tmp[i];
  }
}

// In-place transpose of 8 x 8 floats (r[i] lane j <- r[j] lane i).
SK_AVX2 inline void transpose8(__m256* r) {
  __m256 t[8], s[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    s[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
  }
}

}  // namespace sparsekern::detail
#endif
