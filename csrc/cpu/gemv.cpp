// Dense GEMV (see gemv.h), 32 bf16 per vdpbf16ps or 16 fp32 per FMA, the K tail by masked loads;
// on CPUs without them, 8 fp32 per AVX2 FMA (bf16 widened by a shift), the K tail by partial loads.
// One x row: one weight row at a time, 4 accumulators along K (each thread reads one stream).
// More x rows: 8 weight rows at a time, each x row against all 8 (weights read once per call, x
// rows from L1).
//
// NOTE: one stream per thread: TinyLlama-1.1B shapes dense bf16 lean decode, the two kernels
// switched in alternating rounds in one process (2-core Zen 4, weights on huge pages): 1.032x
// tokens/s. bench/cpp/gemv_stream.cpp (the GEMV alone over the model's 2.07 GB) favoured it in 5
// of 6 alternations on huge pages, by 2-18 GB/s, with run-to-run swings as large
// (bench/results/cpu-epyc-zen4-avx512-2core-2026-11-26-session6.md).
#include "cpu/gemv.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/isa.h"
#include "cpu/linear_common.h"
#include "cpu/parallel.h"

#if defined(__x86_64__)
#include <immintrin.h>

#include "cpu/linear_avx2.h"
#endif

namespace sparsekern {

bool gemv_supported(DType t) {
#if defined(__x86_64__)
  return (t == DType::kBF16 || t == DType::kF32) && active_isa() >= Isa::kAvx2;
#else
  (void)t;
  return false;
#endif
}

#if defined(__x86_64__)
namespace {

#define SK_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

constexpr int kTile = 8;  // weight rows per pass: 8 streams in flight, 8 accumulators per x row

template <int R>
SK_BF16 void tile(const uint16_t* x, int64_t rows, int64_t ldx, const uint16_t* w, const uint16_t* bias, int64_t k,
                  int64_t o, uint16_t* y, int64_t ldy) {
  const uint16_t* wr = w + o * k;
  for (int64_t r = 0; r < rows; ++r) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    const uint16_t* xr = x + r * ldx;
    for (int64_t c = 0; c < k; c += 32) {
      const __mmask32 mask = k - c >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << (k - c)) - 1);
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, xr + c);
      if (r == 0) {  // the next tile's rows, 1 KB ahead of use
        for (int i = 0; i < R; ++i) _mm_prefetch(reinterpret_cast<const char*>(wr + (R + i) * k + c), _MM_HINT_T0);
      }
      for (int i = 0; i < R; ++i) {
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, wr + i * k + c);
        acc[i] = _mm512_dpbf16_ps(acc[i], wv, xv);
      }
    }
    for (int i = 0; i < R; ++i) {
      const float b = bias ? bf16_to_f32(bias[o + i]) : 0.0f;
      y[r * ldy + o + i] = f32_to_bf16(_mm512_reduce_add_ps(acc[i]) + b);
    }
  }
}

// One x row: output rows [o0, o1), each weight row read alone.
SK_BF16 void one_row(const uint16_t* x, const uint16_t* w, const uint16_t* bias, int64_t k, int64_t o0, int64_t o1,
                     uint16_t* y) {
  for (int64_t o = o0; o < o1; ++o) {
    const uint16_t* wr = w + o * k;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t c = 0;
    for (; c + 128 <= k; c += 128) {
      for (int i = 0; i < 4; ++i) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + c + 32 * i);
        acc[i] = _mm512_dpbf16_ps(acc[i], wv, (__m512bh)_mm512_loadu_si512(x + c + 32 * i));
      }
    }
    for (; c < k; c += 32) {
      const __mmask32 mask = k - c >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << (k - c)) - 1);
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, wr + c);
      acc[0] = _mm512_dpbf16_ps(acc[0], wv, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + c));
    }
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    y[o] = f32_to_bf16(_mm512_reduce_add_ps(sum) + (bias ? bf16_to_f32(bias[o]) : 0.0f));
  }
}

#define SK_F32 __attribute__((target("avx512f")))

SK_F32 void one_row(const float* x, const float* w, const float* bias, int64_t k, int64_t o0, int64_t o1, float* y) {
  for (int64_t o = o0; o < o1; ++o) {
    const float* wr = w + o * k;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t c = 0;
    for (; c + 64 <= k; c += 64) {
      for (int i = 0; i < 4; ++i) {
        acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(wr + c + 16 * i), _mm512_loadu_ps(x + c + 16 * i), acc[i]);
      }
    }
    for (; c < k; c += 16) {
      const __mmask16 mask = k - c >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (k - c)) - 1);
      acc[0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, wr + c), _mm512_maskz_loadu_ps(mask, x + c), acc[0]);
    }
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    y[o] = _mm512_reduce_add_ps(sum) + (bias ? bias[o] : 0.0f);
  }
}

template <int R>
SK_F32 void tile(const float* x, int64_t rows, int64_t ldx, const float* w, const float* bias, int64_t k, int64_t o,
                     float* y, int64_t ldy) {
  const float* wr = w + o * k;
  for (int64_t r = 0; r < rows; ++r) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    const float* xr = x + r * ldx;
    for (int64_t c = 0; c < k; c += 16) {
      const __mmask16 mask = k - c >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (k - c)) - 1);
      const __m512 xv = _mm512_maskz_loadu_ps(mask, xr + c);
      if (r == 0) {
        for (int i = 0; i < R; ++i) _mm_prefetch(reinterpret_cast<const char*>(wr + (R + i) * k + c), _MM_HINT_T0);
      }
      for (int i = 0; i < R; ++i) acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, wr + i * k + c), xv, acc[i]);
    }
    for (int i = 0; i < R; ++i) y[r * ldy + o + i] = _mm512_reduce_add_ps(acc[i]) + (bias ? bias[o + i] : 0.0f);
  }
}

// Output rows [o0, o1): one x row by one_row; more by whole tiles of kTile weight rows, then one
// weight row at a time (bf16 or fp32: the overloads).
template <class T>
void run_rows(const T* x, int64_t rows, int64_t ldx, const T* w, const T* bias, int64_t k, int64_t o0, int64_t o1,
              T* y, int64_t ldy) {
  if (rows == 1) return one_row(x, w, bias, k, o0, o1, y);
  int64_t o = o0;
  for (; o + kTile <= o1; o += kTile) tile<kTile>(x, rows, ldx, w, bias, k, o, y, ldy);
  for (; o < o1; ++o) tile<1>(x, rows, ldx, w, bias, k, o, y, ldy);
}

// AVX2 + FMA: the same two loops, 8 fp32 per FMA; bf16 weights widened by a shift, x (already
// fp32: bf16 x is widened once per call by the caller) read from L1.
template <DType T>
SK_AVX2 void one_row_avx2(const float* x, const typename Elem<T>::type* w,
                          const typename Elem<T>::type* bias, int64_t k, int64_t o0, int64_t o1,
                          typename Elem<T>::type* y) {
  using detail::load8;
  using Io = Elem<T>;
  for (int64_t o = o0; o < o1; ++o) {
    const auto* wr = w + o * k;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t c = 0;
    for (; c + 32 <= k; c += 32) {
      for (int i = 0; i < 4; ++i) acc[i] = _mm256_fmadd_ps(load8<T>(wr + c + 8 * i), _mm256_loadu_ps(x + c + 8 * i), acc[i]);
    }
    for (; c + 8 <= k; c += 8) acc[0] = _mm256_fmadd_ps(load8<T>(wr + c), _mm256_loadu_ps(x + c), acc[0]);
    if (c < k) {
      const int left = static_cast<int>(k - c);
      acc[1] = _mm256_fmadd_ps(detail::load_partial<T>(wr + c, left), detail::load_partial<DType::kF32>(x + c, left),
                               acc[1]);
    }
    const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    y[o] = Io::store(detail::hsum(sum) + (bias ? Io::load(bias[o]) : 0.0f));
  }
}

template <DType T, int R>
SK_AVX2 void tile_avx2(const float* x, int64_t rows, int64_t ldx, const typename Elem<T>::type* w,
                       const typename Elem<T>::type* bias, int64_t k, int64_t o,
                       typename Elem<T>::type* y, int64_t ldy) {
  using detail::load8;
  using Io = Elem<T>;
  const auto* wr = w + o * k;
  for (int64_t r = 0; r < rows; ++r) {
    __m256 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    const float* xr = x + r * ldx;
    int64_t c = 0;
    for (; c + 8 <= k; c += 8) {
      const __m256 xv = _mm256_loadu_ps(xr + c);
      if (r == 0) {
        for (int i = 0; i < R; ++i) _mm_prefetch(reinterpret_cast<const char*>(wr + (R + i) * k + c), _MM_HINT_T0);
      }
      for (int i = 0; i < R; ++i) acc[i] = _mm256_fmadd_ps(load8<T>(wr + i * k + c), xv, acc[i]);
    }
    if (c < k) {
      const int left = static_cast<int>(k - c);
      const __m256 xv = detail::load_partial<DType::kF32>(xr + c, left);
      for (int i = 0; i < R; ++i) acc[i] = _mm256_fmadd_ps(detail::load_partial<T>(wr + i * k + c, left), xv, acc[i]);
    }
    for (int i = 0; i < R; ++i) {
      y[r * ldy + o + i] = Io::store(detail::hsum(acc[i]) + (bias ? Io::load(bias[o + i]) : 0.0f));
    }
  }
}

template <DType T>
void run_rows_avx2(const float* x, int64_t rows, int64_t ldx, const typename Elem<T>::type* w,
                   const typename Elem<T>::type* bias, int64_t k, int64_t o0, int64_t o1,
                   typename Elem<T>::type* y, int64_t ldy) {
  if (rows == 1) return one_row_avx2<T>(x, w, bias, k, o0, o1, y);
  int64_t o = o0;
  for (; o + kTile <= o1; o += kTile) tile_avx2<T, kTile>(x, rows, ldx, w, bias, k, o, y, ldy);
  for (; o < o1; ++o) tile_avx2<T, 1>(x, rows, ldx, w, bias, k, o, y, ldy);
}

// Whether this dtype runs the AVX-512 loops above (else the AVX2 ones).
template <class T>
bool use_avx512() {
  return std::is_same_v<T, uint16_t> ? active_isa() >= Isa::kAvx512Bf16 : active_isa() >= Isa::kAvx512;
}

template <class T>
void gemv_typed(const void* x, int64_t rows, int64_t ldx, const void* w, const void* bias, int64_t n, int64_t k,
                void* y, int64_t ldy, int threads) {
  constexpr DType kT = std::is_same_v<T, uint16_t> ? DType::kBF16 : DType::kF32;
  const bool wide = use_avx512<T>();
  // AVX2 with bf16 x: x widened to fp32 once, here, not per weight row.
  std::vector<float> widened;
  const float* xf = reinterpret_cast<const float*>(x);
  int64_t ldxf = ldx;
  if (!wide && kT == DType::kBF16) {
    widened.resize(static_cast<size_t>(rows * k));
    convert_rows_f32(x, rows, k, ldx, kT, widened.data(), k, 1);
    xf = widened.data();
    ldxf = k;
  }
  // Chunks of whole tiles (the last one takes the remainder rows).
  const int64_t tiles = (n + kTile - 1) / kTile;
  parallel_range(tiles, decode_threads(threads, rows * n * k), 64, [&](int64_t t0, int64_t t1, int) {
    const int64_t o0 = t0 * kTile, o1 = std::min(n, t1 * kTile);
    if (wide) {
      return run_rows(static_cast<const T*>(x), rows, ldx, static_cast<const T*>(w), static_cast<const T*>(bias), k,
                      o0, o1, static_cast<T*>(y), ldy);
    }
    run_rows_avx2<kT>(xf, rows, ldxf, static_cast<const T*>(w), static_cast<const T*>(bias), k, o0, o1,
                      static_cast<T*>(y), ldy);
  });
}

}  // namespace

void gemv(const void* x, int64_t rows, int64_t ldx, const void* w, const void* bias, int64_t n, int64_t k, void* y,
          int64_t ldy, DType t, int threads) {
  if (t == DType::kBF16) return gemv_typed<uint16_t>(x, rows, ldx, w, bias, n, k, y, ldy, threads);
  gemv_typed<float>(x, rows, ldx, w, bias, n, k, y, ldy, threads);
}
#else
void gemv(const void*, int64_t, int64_t, const void*, const void*, int64_t, int64_t, void*, int64_t, DType, int) {}
#endif

}  // namespace sparsekern
