// 2:4 decode kernels for AVX-512, fp32 sums; x rows up to 4 at a time share the values, the
// indices and the row of W; output rows are split over the threads.
//
// fp32 values: one meta word holds the 2-bit in-group indices of 16 kept values, which cover 32
// columns of x: a zmm of the 16 values, the word broadcast and shifted per lane (lane l: field l,
// plus the group's base column 4 * (l / 2)), one vpermt2ps picks their x operands out of the 32
// columns (two zmm of x as fp32), one FMA.
// bf16 values (AVX-512 BF16 + VBMI): 32 kept values a step (two meta words, 64 columns); a
// group's two kept values are one pair of vdpbf16ps, so the x operands are one vpermt2w of x as
// bf16, the index lanes cut from the meta qword by one vpmultishiftqb.
// fp16 values stay on the AVX2 quads kernel (16 fp16 values a step measured slower than it).
//
// Index fields are masked to 2 bits, so a garbage meta word picks a wrong column inside its own
// window, never outside x (x is copied into a zero-padded buffer of whole windows).
//
// NOTE: against the AVX2 quads kernel these replace on AVX-512 machines (2-core Zen 4, huge
// pages): TinyLlama-1.1B shapes 2:4 lean decode, interleaved rounds, median tokens/s 1.16x in bf16
// and in fp32 (fp16 with this file's fp32 scheme: 0.87x, so it stays on quads); 2:4 fp32
// 11008x4096, 1 row, 1 thread 5.8 -> 4.1 ms. Software prefetch 2 KB ahead on every step (as
// quads does) cost 30% here: 2 threads 3.56 vs 2.55 ms; once per page is what pays (below).
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/isa.h"
#include "cpu/linear_common.h"
#include "cpu/nm_linear.h"
#include "cpu/parallel.h"

namespace sparsekern::detail {
namespace {

#define SK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// Once per 4 KiB of the values stream (each step reads 64 bytes), the first lines 2 KiB ahead:
// on 4 KiB pages the hardware prefetcher stops at every page boundary.
// NOTE: 2:4 fp32 11008x4096, 1 row, 2 threads, Zen 4, standalone (no torch), medians of 40 calls
// in alternation: 4 KiB pages 3.5-4.2 ms with it, 4.2-5.1 without, 4.4-5.7 with a prefetch every
// step (what the AVX2 kernels do); huge pages 3.0-3.7 with it, 2.8-3.8 without, 4.6-4.8 every step.
inline void prefetch_next_page(const void* p) {
  const char* ahead = static_cast<const char*>(p) + 2048;
  if ((reinterpret_cast<uintptr_t>(ahead) & 4095) < 64) {
    for (int l = 0; l < 4; ++l) _mm_prefetch(ahead + 64 * l, _MM_HINT_T0);
  }
}

// acc[r] += v * (the 16 x operands of v's meta word in the 32 columns at x + r * ldf).
template <int R>
SK_AVX512 inline void step(__m512* acc, __m512 v, int32_t word, const float* x, int64_t ldf, __m512i shifts,
                           __m512i base, __m512i three) {
  const __m512i idx = _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(word), shifts), three), base);
  for (int r = 0; r < R; ++r) {
    const float* xr = x + r * ldf;
    acc[r] = _mm512_fmadd_ps(v, _mm512_permutex2var_ps(_mm512_loadu_ps(xr), idx, _mm512_loadu_ps(xr + 16)), acc[r]);
  }
}

// Output row o for x rows r0 .. r0 + R - 1 (xf: fp32, row stride ldf, zero past K).
template <int R>
SK_AVX512 void rows24(const NMLinearArgs& a, const float* xf, int64_t ldf, int64_t r0, int64_t o) {
  const int64_t kept = a.k / 2, full = kept / 16;
  const float* v = static_cast<const float*>(a.values) + o * kept;
  const int32_t* mrow = a.meta + o * a.meta_words;
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t w = 0; w < full; ++w) {
    prefetch_next_page(v + 16 * w);
    step<R>(acc, _mm512_loadu_ps(v + 16 * w), mrow[w], xf + r0 * ldf + 32 * w, ldf, shifts, base, three);
  }
  if (const int64_t rest = kept - 16 * full; rest > 0) {  // the last word's first `rest` values
    const __m512 last = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << rest) - 1), v + 16 * full);
    step<R>(acc, last, mrow[full], xf + r0 * ldf + 32 * full, ldf, shifts, base, three);
  }
  const float b = a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f;
  for (int r = 0; r < R; ++r) store_f32(a.out, (r0 + r) * a.ldo + o, _mm512_reduce_add_ps(acc[r]) + b, a.dtype);
}

#define SK_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16")))

// bf16 values and x: 32 kept values (16 groups, 64 columns of x, two meta words) a step. A group's
// two kept values are one pair of vdpbf16ps, so the step is one vpermt2w of x (bf16, two zmm)
// and one vdpbf16ps: lane j of the index is field j of the two words (vpmultishiftqb) plus
// 4 * (j / 2), the group's base column.
struct Bf16Tables {
  alignas(64) uint8_t ctrl[64];  // byte 2j: bit offset 2 * (j % 32) of field j in the meta qword
  alignas(64) uint16_t base[32];
  Bf16Tables() : ctrl(), base() {
    for (int j = 0; j < 32; ++j) {
      ctrl[2 * j] = static_cast<uint8_t>(2 * j);
      base[j] = static_cast<uint16_t>(4 * (j / 2));
    }
  }
};
const Bf16Tables kBf16;

// acc[r] += the pairs of w (16 groups) . their x operands in the 64 columns at x + r * ldb;
// m: the step's two meta words in every qword.
template <int R>
SK_BF16 inline void step_bf16(__m512* acc, __m512i w, __m512i m, const uint16_t* x, int64_t ldb, __m512i ctrl,
                              __m512i base, __m512i three) {
  const __m512i idx = _mm512_add_epi16(_mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, m), three), base);
  for (int r = 0; r < R; ++r) {
    const uint16_t* xr = x + r * ldb;
    const __m512i xs = _mm512_permutex2var_epi16(_mm512_loadu_si512(xr), idx, _mm512_loadu_si512(xr + 32));
    acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)w, (__m512bh)xs);
  }
}

template <int R>
SK_BF16 void rows24_bf16(const NMLinearArgs& a, const uint16_t* xb, int64_t ldb, int64_t r0, int64_t o) {
  const int64_t kept = a.k / 2, full = kept / 32;
  const uint16_t* v = static_cast<const uint16_t*>(a.values) + o * kept;
  const int32_t* mrow = a.meta + o * a.meta_words;
  const __m512i ctrl = _mm512_load_si512(kBf16.ctrl), base = _mm512_load_si512(kBf16.base);
  const __m512i three = _mm512_set1_epi16(3);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const uint16_t* x0 = xb + r0 * ldb;
  for (int64_t s = 0; s < full; ++s) {
    int64_t q;
    std::memcpy(&q, mrow + 2 * s, sizeof q);
    prefetch_next_page(v + 32 * s);
    step_bf16<R>(acc, _mm512_loadu_si512(v + 32 * s), _mm512_set1_epi64(q), x0 + 64 * s, ldb, ctrl, base, three);
  }
  if (const int64_t rest = kept - 32 * full; rest > 0) {  // the first `rest` values of one more step
    const int64_t words = std::min<int64_t>(2, a.meta_words - 2 * full);
    const __m128i m = _mm_maskz_loadu_epi32(static_cast<__mmask8>((1u << words) - 1), mrow + 2 * full);
    const __m512i w = _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t{1} << rest) - 1), v + 32 * full);
    step_bf16<R>(acc, w, _mm512_broadcastq_epi64(m), x0 + 64 * full, ldb, ctrl, base, three);
  }
  const float b = a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f;
  for (int r = 0; r < R; ++r) store_f32(a.out, (r0 + r) * a.ldo + o, _mm512_reduce_add_ps(acc[r]) + b, a.dtype);
}

// f(o, r0, rows) for every output row o of the thread's range and x rows 4 at a time.
template <class F>
void each_row(const NMLinearArgs& a, F f) {
  parallel_range(a.out_features, a.threads, 16, [&](int64_t lo, int64_t hi, int) {
    for (int64_t o = lo; o < hi; ++o) {
      int64_t r0 = 0;
      for (; r0 + 4 <= a.rows; r0 += 4) f(o, r0, std::integral_constant<int, 4>());
      switch (a.rows - r0) {
        case 3: f(o, r0, std::integral_constant<int, 3>()); break;
        case 2: f(o, r0, std::integral_constant<int, 2>()); break;
        case 1: f(o, r0, std::integral_constant<int, 1>()); break;
        default: break;
      }
    }
  });
}

bool bf16_kernel_here() { return active_isa() >= Isa::kAvx512Bf16 && has_avx512_vnni_vbmi(); }

}  // namespace

bool nm_24_avx512_supported(const NMLinearArgs& a) {
  if (a.n != 2 || a.m != 4 || a.qbits || a.act_block) return false;
  return a.dtype == DType::kF32 || (a.dtype == DType::kBF16 && bf16_kernel_here());
}

void nm_linear_decode_24_avx512(const NMLinearArgs& a) {
  if (a.dtype == DType::kBF16) {
    const int64_t ldb = (a.k + 63) / 64 * 64;  // whole 64-column windows, zero past K
    std::vector<uint16_t> xb(a.rows * ldb, 0);
    for (int64_t r = 0; r < a.rows; ++r)
      std::memcpy(xb.data() + r * ldb, static_cast<const uint16_t*>(a.x) + r * a.ldx, a.k * sizeof(uint16_t));
    return each_row(a, [&](int64_t o, int64_t r0, auto rows) {
      rows24_bf16<decltype(rows)::value>(a, xb.data(), ldb, r0, o);
    });
  }
  const int64_t ldf = (a.k + 31) / 32 * 32;  // whole 32-column windows, zero past K
  std::vector<float> xf(a.rows * ldf);
  convert_rows_f32(a.x, a.rows, a.k, a.ldx, a.dtype, xf.data(), ldf, a.threads);
  each_row(a, [&](int64_t o, int64_t r0, auto rows) { rows24<decltype(rows)::value>(a, xf.data(), ldf, r0, o); });
}

}  // namespace sparsekern::detail
#endif
