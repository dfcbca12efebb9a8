// Quantized N:M decode with int8 activations (NMLinearArgs::act_block > 0, opt-in per weight).
//
// x is rounded to int8 per row and block of act_block columns (scale = max |x| / 127, round to
// nearest even, as sparsekern/reference.py), so a kept weight's integer meets its x's integer in
// an integer dot product: the arithmetic llama.cpp runs for its Q8_0 / Q4_0 weights. With
// AVX-512 VBMI + VNNI (2:4, scale groups of a multiple of 64 columns), one step covers 64 kept
// slots = 128 columns: vpmultishiftqb spreads the 2-bit meta fields into bytes, vpermi2b picks the
// 64 x bytes out of the 128 columns, vpdpbusd multiplies them with the weight bytes (made
// unsigned: int8 + 128, int4 nibbles as they are) 4 to a lane, a second vpdpbusd with ones sums
// the picked x per lane for the zero-point term, and one FMA per lane applies weight scale x
// x scale. Everything else runs the portable kernel below (same rounding of x, fp32 sums).
// NOTE: 11008x4096 2:4, 1 row, bf16 x, 2 threads, Zen 4 EPYC (bench/bench_quant_decode.py, one
// run): int8 0.76 ms, int4 g128 0.73 ms, against 1.76 / 1.89 ms for the same weights with bf16 x
// (quads kernel) and 2.13 ms for the bf16 2:4 weight.
#include <cmath>
#include <vector>

#include "cpu/nm_linear.h"
#include "cpu/parallel.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sparsekern {

// Round to nearest even without a libm call (std::nearbyint is one per element at the baseline
// ISA): adding and removing 1.5 * 2^23 leaves the rounded value for |v| < 2^22. NOTE: with
// nearbyint the rounding of one 5632-column row cost ~0.1 ms, ~17 ms per TinyLlama token.
inline float round_even(float v) {
  constexpr float kMagic = 12582912.0f;  // IEEE arithmetic (no -ffast-math): the pair is not folded away
  return (v + kMagic) - kMagic;
}

void nm_quantize_x_a8(const NMLinearArgs& a, int8_t* xq, int64_t ldq, float* sx, int64_t lds) {
  const int64_t block = a.act_block, blocks = a.k / block;
  std::vector<float> xf(a.k);
  for (int64_t r = 0; r < a.rows; ++r) {
    int8_t* q = xq + r * ldq;
    float* s = sx + r * lds;
    std::fill(q + a.k, q + ldq, int8_t{0});
    std::fill(s + blocks, s + lds, 0.0f);
    convert_rows_f32(static_cast<const char*>(a.x) + r * a.ldx * dtype_size(a.dtype), 1, a.k, a.k, a.dtype, xf.data(),
                     a.k, 1);
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = xf.data() + b * block;
      float amax = 0.0f;
      for (int64_t c = 0; c < block; ++c) amax = std::fmax(amax, std::fabs(xb[c]));
      // A non-finite row is recomputed densely by the op (redo_nonfinite_rows): any finite value here.
      const bool ok = std::isfinite(amax) && amax > 0.0f;
      const float scale = ok ? amax / 127.0f : 1.0f;
      s[b] = scale;
      for (int64_t c = 0; c < block; ++c) {
        const float v = ok ? round_even(xb[c] / scale) : 0.0f;
        q[b * block + c] = static_cast<int8_t>(std::fmax(-127.0f, std::fmin(127.0f, v)));
      }
    }
  }
}

namespace detail {

void nm_linear_decode_a8_portable(const NMLinearArgs& a) {
  const int64_t ldq = a.k, lds = a.k / a.act_block, groups = a.k / a.m;
  std::vector<int8_t> xq(a.rows * ldq);
  std::vector<float> sx(a.rows * lds);
  nm_quantize_x_a8(a, xq.data(), ldq, sx.data(), lds);
  parallel_range(a.out_features, a.threads, 16, [&](int64_t o0, int64_t o1, int) {
    for (int64_t o = o0; o < o1; ++o) {
      for (int64_t r = 0; r < a.rows; ++r) {
        const int8_t* q = xq.data() + r * ldq;
        const float* s = sx.data() + r * lds;
        float acc = 0.0f;
        MetaReader meta(a.meta + o * a.meta_words, a.meta_words, log2i(a.m));
        int64_t j = 0;
        for (int64_t g = 0; g < groups; ++g) {
          for (int t = 0; t < a.n; ++t, ++j) {
            const int64_t c = g * a.m + meta.next();
            acc += nm_weight(a, o, j) * (static_cast<float>(q[c]) * s[c / a.act_block]);
          }
        }
        const float b = a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f;
        store_f32(a.out, r * a.ldo + o, acc + b, a.dtype);
      }
    }
  });
}

#if defined(__x86_64__)
#define SK_A8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vnni")))

bool nm_a8_avx512_supported(const NMLinearArgs& a) {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512vbmi") || !__builtin_cpu_supports("avx512vnni")) return false;
  // A step (64 kept slots) lies in one scale group, or in two of 32 (G2 below).
  return a.n == 2 && a.m == 4 && a.act_block == 32 && (a.groups == 1 || a.group_kept == 32 || a.group_kept % 64 == 0);
}

namespace {

struct A8Tables {
  alignas(64) uint8_t ctrl[64];  // bit offset of slot b's 2-bit field in its qword
  alignas(64) uint8_t base[64];  // first column of slot b's group of 4 in the 128-column window
};

constexpr A8Tables make_a8_tables() {
  A8Tables t{};
  for (int b = 0; b < 64; ++b) {
    t.ctrl[b] = static_cast<uint8_t>(2 * (b % 32));
    t.base[b] = static_cast<uint8_t>(4 * (b / 2));
  }
  return t;
}

constexpr A8Tables kA8 = make_a8_tables();

// Scale of group g of row o, scales of element type T (that of x).
template <DType T>
SK_A8 inline float scale_at(const NMLinearArgs& a, int64_t i) {
  if constexpr (T == DType::kF32) {
    return static_cast<const float*>(a.scales)[i];
  } else if constexpr (T == DType::kBF16) {
    return bf16_to_f32(static_cast<const uint16_t*>(a.scales)[i]);
  } else {
    return f16_to_f32(static_cast<const uint16_t*>(a.scales)[i]);
  }
}

// Output row o against x rows r0 .. r0+R-1. Q = 8: int8 values, 4: int4; T: x's (and the
// scales') type; Z: zero points stored (else the symmetric zero, applied as a shift); G2: scale
// groups of 32 kept slots (two per step), else a step lies in one group.
// sxl: per row, the x scale of each lane of each step (16 floats a step, expanded once per call).
template <int Q, DType T, bool Z, bool G2, int R>
SK_A8 void a8_rows(const NMLinearArgs& a, const int8_t* xq, int64_t ldq, const float* sxl, int64_t lds, int64_t r0,
                   int64_t o) {
  const int64_t kept = a.k / 2, steps = (kept + 63) / 64, words = a.meta_words;
  const uint8_t* v = static_cast<const uint8_t*>(a.values) + o * (Q == 4 ? kept / 2 : kept);
  const int32_t* mrow = a.meta + o * words;
  const __m512i ctrl = _mm512_load_si512(kA8.ctrl), base = _mm512_load_si512(kA8.base);
  const __m512i three = _mm512_set1_epi8(3), ones = _mm512_set1_epi8(1), zero = _mm512_setzero_si512();
  const __m512i qsel = _mm512_set_epi64(1, 1, 1, 1, 0, 0, 0, 0);
  constexpr int zshift = Q == 8 ? 128 : 0;  // int8 values are made unsigned by +128
  constexpr int sym_shift = Q == 8 ? 7 : 3;  // symmetric: zero 0 (+128 = 2^7) for int8, 8 = 2^3 for int4
  const int64_t g_row = o * a.groups;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  __m512 sw = _mm512_set1_ps(scale_at<T>(a, g_row));
  __m512i zw = _mm512_set1_epi32((Z ? a.zeros[g_row] : 0) + zshift);
  int64_t group = 0, group_end = a.groups == 1 ? INT64_MAX : a.group_kept;  // in kept slots
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t left = kept - 64 * s;  // kept slots from this step on
    if constexpr (G2) {  // lanes 0-7: group 2s, lanes 8-15: group 2s+1
      const int64_t g0 = g_row + 2 * s, g1 = g_row + std::min<int64_t>(2 * s + 1, a.groups - 1);
      sw = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(scale_at<T>(a, g0)), _mm512_set1_ps(scale_at<T>(a, g1)));
      if constexpr (Z) {
        zw = _mm512_mask_blend_epi32(0xff00, _mm512_set1_epi32(a.zeros[g0] + zshift),
                                     _mm512_set1_epi32(a.zeros[g1] + zshift));
      }
    } else if (64 * s >= group_end) {
      ++group;
      group_end += a.group_kept;
      sw = _mm512_set1_ps(scale_at<T>(a, g_row + group));
      if constexpr (Z) zw = _mm512_set1_epi32(a.zeros[g_row + group] + zshift);
    }
    const bool full = left >= 64 && 4 * s + 4 <= words;
    const __m128i m = full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(mrow + 4 * s))
                           : _mm_maskz_loadu_epi32(static_cast<__mmask8>((1u << std::min<int64_t>(4, words - 4 * s)) - 1),
                                                   mrow + 4 * s);
    const __m512i mq = _mm512_permutexvar_epi64(qsel, _mm512_castsi128_si512(m));
    const __m512i idx = _mm512_add_epi8(_mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, mq), three), base);
    __m512i w;
    if constexpr (Q == 8) {
      // Slots past the row read as 0 (+128 below): their x bytes are the zero padding of xq.
      const __m512i raw = left >= 64 ? _mm512_loadu_si512(v + 64 * s)
                                     : _mm512_maskz_loadu_epi8((~0ULL) >> (64 - left), v + 64 * s);
      w = _mm512_xor_si512(raw, _mm512_set1_epi8(static_cast<char>(0x80)));
      _mm_prefetch(reinterpret_cast<const char*>(v + 64 * s) + 1024, _MM_HINT_T0);
    } else {
      const int64_t nbytes = left >= 64 ? 32 : (left + 1) / 2;
      const __m256i raw = nbytes == 32 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32 * s))
                                       : _mm256_maskz_loadu_epi8((1u << nbytes) - 1u, v + 32 * s);
      const __m512i w16 = _mm512_cvtepu8_epi16(raw);  // byte 2j = low nibble (slot 2j), 2j+1 = high
      w = _mm512_or_si512(_mm512_and_si512(w16, _mm512_set1_epi16(0x000f)),
                          _mm512_slli_epi16(_mm512_and_si512(w16, _mm512_set1_epi16(0x00f0)), 4));
      _mm_prefetch(reinterpret_cast<const char*>(v + 32 * s) + 1024, _MM_HINT_T0);
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* xr = xq + (r0 + r) * ldq + 128 * s;
      const __m512i xp = _mm512_permutex2var_epi8(_mm512_loadu_si512(xr), idx, _mm512_loadu_si512(xr + 64));
      const __m512i dot = _mm512_dpbusd_epi32(zero, w, xp);
      const __m512i xsum = _mm512_dpbusd_epi32(zero, ones, xp);
      const __m512i zx = Z ? _mm512_mullo_epi32(zw, xsum) : _mm512_slli_epi32(xsum, sym_shift);
      const __m512 sx = _mm512_loadu_ps(sxl + (r0 + r) * lds + 16 * s);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot, zx)), _mm512_mul_ps(sw, sx), acc[r]);
    }
  }
  const float b = a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f;
  for (int r = 0; r < R; ++r) store_f32(a.out, (r0 + r) * a.ldo + o, _mm512_reduce_add_ps(acc[r]) + b, a.dtype);
}

template <int Q, DType T, bool Z, bool G2>
void a8_all(const NMLinearArgs& a, const int8_t* xq, int64_t ldq, const float* sxl, int64_t lds) {
  parallel_range(a.out_features, a.threads, 16, [&](int64_t lo, int64_t hi, int) {
    for (int64_t o = lo; o < hi; ++o) {
      int64_t r0 = 0;
      for (; r0 + 4 <= a.rows; r0 += 4) a8_rows<Q, T, Z, G2, 4>(a, xq, ldq, sxl, lds, r0, o);
      switch (a.rows - r0) {
        case 3: a8_rows<Q, T, Z, G2, 3>(a, xq, ldq, sxl, lds, r0, o); break;
        case 2: a8_rows<Q, T, Z, G2, 2>(a, xq, ldq, sxl, lds, r0, o); break;
        case 1: a8_rows<Q, T, Z, G2, 1>(a, xq, ldq, sxl, lds, r0, o); break;
        default: break;
      }
    }
  });
}

template <int Q, DType T>
void a8_dispatch(const NMLinearArgs& a, const int8_t* xq, int64_t ldq, const float* sxl, int64_t lds) {
  const bool g2 = a.groups > 1 && a.group_kept == 32;
  if (a.zeros) return g2 ? a8_all<Q, T, true, true>(a, xq, ldq, sxl, lds) : a8_all<Q, T, true, false>(a, xq, ldq, sxl, lds);
  g2 ? a8_all<Q, T, false, true>(a, xq, ldq, sxl, lds) : a8_all<Q, T, false, false>(a, xq, ldq, sxl, lds);
}

template <int Q>
void a8_typed(const NMLinearArgs& a, const int8_t* xq, int64_t ldq, const float* sxl, int64_t lds) {
  switch (a.dtype) {
    case DType::kBF16: return a8_dispatch<Q, DType::kBF16>(a, xq, ldq, sxl, lds);
    case DType::kF16: return a8_dispatch<Q, DType::kF16>(a, xq, ldq, sxl, lds);
    default: return a8_dispatch<Q, DType::kF32>(a, xq, ldq, sxl, lds);
  }
}

}  // namespace

void nm_linear_decode_a8_avx512(const NMLinearArgs& a) {
  const int64_t steps = (a.k / 2 + 63) / 64, ldq = 128 * steps + 64, blocks = 4 * steps;
  std::vector<int8_t> xq(a.rows * ldq);
  std::vector<float> sx(a.rows * blocks), sxl(a.rows * 16 * steps);
  nm_quantize_x_a8(a, xq.data(), ldq, sx.data(), blocks);
  // Lane l of step s holds 4 kept slots = 8 columns: x block (32 columns) 4s + l / 4.
  for (int64_t i = 0; i < a.rows * blocks; ++i) std::fill_n(sxl.data() + 4 * i, 4, sx[i]);
  if (a.qbits == 8) return a8_typed<8>(a, xq.data(), ldq, sxl.data(), 16 * steps);
  a8_typed<4>(a, xq.data(), ldq, sxl.data(), 16 * steps);
}
#endif

}  // namespace detail
}  // namespace sparsekern
