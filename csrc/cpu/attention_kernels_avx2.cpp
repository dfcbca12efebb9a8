// AVX2 + FMA + F16C attention building blocks (chosen at run time by attn_kernels()).
#if defined(__x86_64__)
#include <immintrin.h>

#include <cmath>

#include "cpu/attention_kernels.h"

#define SK_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace sparsekern {
namespace {

SK_AVX2 inline __m256 load8(const void* src, DType dt, int64_t i) {
  if (dt == DType::kF32) return _mm256_loadu_ps(static_cast<const float*>(src) + i);
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(src) + i));
  if (dt == DType::kF16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

SK_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 2^x: x = n + f with n = round(x), |f| <= 0.5, 2^f by its degree-6 Taylor series (relative
// error ~1e-8, below fp32 rounding). x < -126 (and -inf) gives 0; NaN stays NaN.
SK_AVX2 inline __m256 exp2v(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-126.0f);
  __m256 zero_mask = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  __m256 xc = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(lo, x));
  __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_sub_ps(xc, n);
  __m256 p = _mm256_set1_ps(1.5403530393381608e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129107628477e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410866482158e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.2402265069591007f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.6931471805599453f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_blendv_ps(r, _mm256_setzero_ps(), zero_mask);
}

SK_AVX2 void load_row(float* dst, const void* src, DType dt, int64_t n, int64_t n_pad, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_mul_ps(load8(src, dt, i), s));
  for (; i < n; ++i) dst[i] = load_f32(src, i, dt) * scale;
  for (; i < n_pad; ++i) dst[i] = 0.0f;
}

SK_AVX2 void store_row(void* dst, DType dt, const float* src, int64_t n, float a) {
  const __m256 s = _mm256_set1_ps(a);
  int64_t i = 0;
  if (dt == DType::kF32) {
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(static_cast<float*>(dst) + i, _mm256_mul_ps(_mm256_loadu_ps(src + i), s));
  } else if (dt == DType::kF16) {
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(dst) + i),
                       _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(src + i), s), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) {
    float x = src[i] * a;
    if (dt == DType::kF32) static_cast<float*>(dst)[i] = x;
    else if (dt == DType::kF16) static_cast<uint16_t*>(dst)[i] = f32_to_f16(x);
    else static_cast<uint16_t*>(dst)[i] = f32_to_bf16(x);
  }
}

// MR x 16 register tile: 2*MR accumulators + 2 B vectors + 1 broadcast <= 15 of 16 ymm registers.
// NOTE: named accumulators, not arrays: with `__m256 c[MR]` GCC 12 kept a stack copy and stored all
// twelve every k step: pruned_attention B=1 H=8 Sq=1024 kept=1024 D=64 fp32, one thread, 191 -> 72 ms.
#define SK_ROW(r)                                                                  \
  __m256 c##r##a = _mm256_setzero_ps(), c##r##b = _mm256_setzero_ps();            \
  if (MR > r && accumulate) {                                                      \
    c##r##a = _mm256_loadu_ps(C + r * ldc), c##r##b = _mm256_loadu_ps(C + r * ldc + 8); \
  }
#define SK_FMA(r)                                                   \
  if (MR > r) {                                                     \
    const __m256 av = _mm256_broadcast_ss(a + r * sa_m);            \
    c##r##a = _mm256_fmadd_ps(av, b0, c##r##a);                     \
    c##r##b = _mm256_fmadd_ps(av, b1, c##r##b);                     \
  }
#define SK_STORE(r)                                   \
  if (MR > r) {                                       \
    _mm256_storeu_ps(C + r * ldc, c##r##a);           \
    _mm256_storeu_ps(C + r * ldc + 8, c##r##b);       \
  }
template <int MR>
SK_AVX2 inline void micro(int64_t K, const float* A, int64_t sa_m, int64_t sa_k, const float* B, int64_t ldb,
                          float* C, int64_t ldc, bool accumulate) {
  SK_ROW(0) SK_ROW(1) SK_ROW(2) SK_ROW(3) SK_ROW(4) SK_ROW(5)
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B + k * ldb), b1 = _mm256_loadu_ps(B + k * ldb + 8);
    const float* a = A + k * sa_k;
    SK_FMA(0) SK_FMA(1) SK_FMA(2) SK_FMA(3) SK_FMA(4) SK_FMA(5)
  }
  SK_STORE(0) SK_STORE(1) SK_STORE(2) SK_STORE(3) SK_STORE(4) SK_STORE(5)
}
#undef SK_ROW
#undef SK_FMA
#undef SK_STORE

SK_AVX2 void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t sa_m, int64_t sa_k, const float* B,
                  int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  // NOTE: column panels outside, so the [K x 16] panel of B stays in L1 while A streams by.
  for (int64_t j = 0; j < N; j += kLane) {
    int64_t i = 0;
    for (; i + 6 <= M; i += 6) micro<6>(K, A + i * sa_m, sa_m, sa_k, B + j, ldb, C + i * ldc + j, ldc, accumulate);
    const float* a = A + i * sa_m;
    float* c = C + i * ldc + j;
    switch (M - i) {
      case 5: micro<5>(K, a, sa_m, sa_k, B + j, ldb, c, ldc, accumulate); break;
      case 4: micro<4>(K, a, sa_m, sa_k, B + j, ldb, c, ldc, accumulate); break;
      case 3: micro<3>(K, a, sa_m, sa_k, B + j, ldb, c, ldc, accumulate); break;
      case 2: micro<2>(K, a, sa_m, sa_k, B + j, ldb, c, ldc, accumulate); break;
      case 1: micro<1>(K, a, sa_m, sa_k, B + j, ldb, c, ldc, accumulate); break;
      default: break;
    }
  }
}

SK_AVX2 void softmax_cols(float* S, int64_t rows, int64_t ld, int64_t n, float* m, float* l, float* alpha) {
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  for (int64_t c = 0; c < n; c += 8) {
    const __m256 m_old = _mm256_loadu_ps(m + c);
    __m256 mx = m_old;
    for (int64_t r = 0; r < rows; ++r) mx = _mm256_max_ps(mx, _mm256_loadu_ps(S + r * ld + c));
    // A column that has seen no key yet (max -inf) subtracts 0, so its probabilities are 0, not NaN.
    const __m256 use = _mm256_blendv_ps(mx, _mm256_setzero_ps(), _mm256_cmp_ps(mx, ninf, _CMP_EQ_OQ));
    const __m256 a = exp2v(_mm256_sub_ps(m_old, use));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
      const __m256 p = exp2v(_mm256_sub_ps(_mm256_loadu_ps(S + r * ld + c), use));
      _mm256_storeu_ps(S + r * ld + c, p);
      sum = _mm256_add_ps(sum, p);
    }
    _mm256_storeu_ps(l + c, _mm256_fmadd_ps(_mm256_loadu_ps(l + c), a, sum));
    _mm256_storeu_ps(m + c, mx);
    _mm256_storeu_ps(alpha + c, a);
  }
}

SK_AVX2 void exp_rowsum(const float* S, int64_t rows, int64_t ld, int64_t n, const float* lse, float* col) {
  for (int64_t r = 0; r < rows; ++r) {
    __m256 sum = _mm256_setzero_ps();
    for (int64_t c = 0; c < n; c += 8)
      sum = _mm256_add_ps(sum, exp2v(_mm256_sub_ps(_mm256_loadu_ps(S + r * ld + c), _mm256_loadu_ps(lse + c))));
    col[r] += hsum(sum);
  }
}

SK_AVX2 void scale(float* x, int64_t n, float a) {
  const __m256 s = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), s));
  for (; i < n; ++i) x[i] *= a;
}

// Decode reads every kept row exactly once from memory; prefetching a few rows ahead hides the
// latency of the scattered (gathered) row addresses.
constexpr int64_t kAhead = 8;

SK_AVX2 inline void prefetch_row(const void* base, DType dt, int64_t off, int64_t D) {
  const char* p = static_cast<const char*>(elem_ptr(base, dt, off));
  const int64_t bytes = D * (dt == DType::kF32 ? 4 : 2);
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

SK_AVX2 void dots(const float* q, const void* base, int64_t ss, const int64_t* idx, int64_t n, DType dt, int64_t D,
                  float* s) {
  const int64_t D8 = D / 8 * 8;
  for (int64_t r = 0; r < n; ++r) {
    if (r + kAhead < n) prefetch_row(base, dt, idx[r + kAhead] * ss, D);
    const void* row = elem_ptr(base, dt, idx[r] * ss);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D8; d += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(row, dt, d), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), load8(row, dt, d + 8), a1);
    }
    if (d < D8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(row, dt, d), a0), d += 8;
    float acc = hsum(_mm256_add_ps(a0, a1));
    for (; d < D; ++d) acc += q[d] * load_f32(row, d, dt);
    s[r] = acc;
  }
}

SK_AVX2 void axpys(float* o, const float* p, const void* base, int64_t ss, const int64_t* idx, int64_t n, DType dt,
                   int64_t D) {
  const int64_t D8 = D / 8 * 8;
  int64_t r = 0;
  // Four rows per sweep over o: one load/store of o per four FMAs.
  for (; r + 4 <= n; r += 4) {
    if (r + 4 + kAhead < n) {
      for (int64_t t = 0; t < 4; ++t) prefetch_row(base, dt, idx[r + kAhead + t] * ss, D);
    }
    const void* v0 = elem_ptr(base, dt, idx[r] * ss);
    const void* v1 = elem_ptr(base, dt, idx[r + 1] * ss);
    const void* v2 = elem_ptr(base, dt, idx[r + 2] * ss);
    const void* v3 = elem_ptr(base, dt, idx[r + 3] * ss);
    const __m256 p0 = _mm256_set1_ps(p[r]), p1 = _mm256_set1_ps(p[r + 1]);
    const __m256 p2 = _mm256_set1_ps(p[r + 2]), p3 = _mm256_set1_ps(p[r + 3]);
    int64_t d = 0;
    for (; d < D8; d += 8) {
      __m256 acc = _mm256_loadu_ps(o + d);
      acc = _mm256_fmadd_ps(p0, load8(v0, dt, d), acc);
      acc = _mm256_fmadd_ps(p1, load8(v1, dt, d), acc);
      acc = _mm256_fmadd_ps(p2, load8(v2, dt, d), acc);
      acc = _mm256_fmadd_ps(p3, load8(v3, dt, d), acc);
      _mm256_storeu_ps(o + d, acc);
    }
    for (; d < D; ++d)
      o[d] += p[r] * load_f32(v0, d, dt) + p[r + 1] * load_f32(v1, d, dt) + p[r + 2] * load_f32(v2, d, dt) +
              p[r + 3] * load_f32(v3, d, dt);
  }
  for (; r < n; ++r) {
    const void* v0 = elem_ptr(base, dt, idx[r] * ss);
    const __m256 p0 = _mm256_set1_ps(p[r]);
    int64_t d = 0;
    for (; d < D8; d += 8) _mm256_storeu_ps(o + d, _mm256_fmadd_ps(p0, load8(v0, dt, d), _mm256_loadu_ps(o + d)));
    for (; d < D; ++d) o[d] += p[r] * load_f32(v0, d, dt);
  }
}

SK_AVX2 float exp_sub(float* x, int64_t n, float sub) {
  const __m256 s = _mm256_set1_ps(sub);
  __m256 sum = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 y = exp2v(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
    _mm256_storeu_ps(x + i, y);
    sum = _mm256_add_ps(sum, y);
  }
  float total = hsum(sum);
  for (; i < n; ++i) total += (x[i] = std::exp2(x[i] - sub));
  return total;
}

}  // namespace

const AttnKernels& attn_kernels_avx2() {
  static const AttnKernels k{load_row, store_row, gemm, softmax_cols, exp_rowsum, scale, dots, axpys, exp_sub};
  return k;
}

}  // namespace sparsekern
#endif  // __x86_64__
