// Portable (plain C++) attention building blocks: the fallback on any CPU, and the reference the
// SIMD table is unit-tested against (cpp_tests/test_attention.cpp).
#include <cmath>
#include <limits>

#include "cpu/attention_kernels.h"

namespace sparsekern {
namespace {

void load_row(float* dst, const void* src, DType dt, int64_t n, int64_t n_pad, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = load_f32(src, i, dt) * scale;
  for (int64_t i = n; i < n_pad; ++i) dst[i] = 0.0f;
}

void store_row(void* dst, DType dt, const float* src, int64_t n, float a) {
  for (int64_t i = 0; i < n; ++i) {
    float x = src[i] * a;
    if (dt == DType::kF32) static_cast<float*>(dst)[i] = x;
    else if (dt == DType::kF16) static_cast<uint16_t*>(dst)[i] = f32_to_f16(x);
    else static_cast<uint16_t*>(dst)[i] = f32_to_bf16(x);
  }
}

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t sa_m, int64_t sa_k, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    if (!accumulate) for (int64_t j = 0; j < N; ++j) c[j] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[i * sa_m + k * sa_k];
      const float* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// exp2 that maps -inf to 0; the drivers never pass (-inf) - (-inf).
inline float ex2(float x) { return std::exp2(x); }

void softmax_cols(float* S, int64_t rows, int64_t ld, int64_t n, float* m, float* l, float* alpha) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < n; ++c) {
    float mx = m[c];
    for (int64_t r = 0; r < rows; ++r) mx = std::fmax(mx, S[r * ld + c]);
    const float use = mx == ninf ? 0.0f : mx;  // a column that sees no key yet stays at l = 0
    alpha[c] = ex2(m[c] - use);
    float sum = 0.0f;
    for (int64_t r = 0; r < rows; ++r) sum += (S[r * ld + c] = ex2(S[r * ld + c] - use));
    l[c] = l[c] * alpha[c] + sum;
    m[c] = mx;
  }
}

void exp_rowsum(const float* S, int64_t rows, int64_t ld, int64_t n, const float* lse, float* col) {
  for (int64_t r = 0; r < rows; ++r) {
    float sum = 0.0f;
    for (int64_t c = 0; c < n; ++c) sum += ex2(S[r * ld + c] - lse[c]);
    col[r] += sum;
  }
}

void scale(float* x, int64_t n, float a) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

void dots(const float* q, const void* base, int64_t ss, const int64_t* idx, int64_t n, DType dt, int64_t D,
          float* s) {
  for (int64_t r = 0; r < n; ++r) {
    const void* row = elem_ptr(base, dt, idx[r] * ss);
    float acc = 0.0f;
    for (int64_t d = 0; d < D; ++d) acc += q[d] * load_f32(row, d, dt);
    s[r] = acc;
  }
}

void axpys(float* o, const float* p, const void* base, int64_t ss, const int64_t* idx, int64_t n, DType dt,
           int64_t D) {
  for (int64_t r = 0; r < n; ++r) {
    const void* row = elem_ptr(base, dt, idx[r] * ss);
    for (int64_t d = 0; d < D; ++d) o[d] += p[r] * load_f32(row, d, dt);
  }
}

float exp_sub(float* x, int64_t n, float sub) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += (x[i] = ex2(x[i] - sub));
  return sum;
}

}  // namespace

const AttnKernels& attn_kernels_portable() {
  static const AttnKernels k{load_row, store_row, gemm, softmax_cols, exp_rowsum, scale, dots, axpys, exp_sub};
  return k;
}

}  // namespace sparsekern
