// Per-ISA building blocks of the attention drivers (attention.cpp). Each table entry works on
// whole rows or tiles, so one indirect call covers hundreds of FMAs and the drivers stay ISA-free.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/attention.h"
#include "cpu/isa.h"

namespace sparsekern {

// Padded widths: GEMM tiles are 16 floats wide (two AVX2 registers).
constexpr int64_t kLane = 16;
inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

struct AttnKernels {
  // dst[i] = float(src[i]) * scale for i < n, 0 for n <= i < n_pad.
  void (*load_row)(float* dst, const void* src, DType dt, int64_t n, int64_t n_pad, float scale);
  // dst (dt) = src * a, n elements.
  void (*store_row)(void* dst, DType dt, const float* src, int64_t n, float a);
  // C[M][N] (+)= A[M][K] * B[K][N]; A[i][k] at A[i*sa_m + k*sa_k]; N a multiple of kLane.
  void (*gemm)(int64_t M, int64_t N, int64_t K, const float* A, int64_t sa_m, int64_t sa_k, const float* B,
               int64_t ldb, float* C, int64_t ldc, bool accumulate);
  // Online softmax down the columns of S [rows][n] (base-2 logits; one column per query): per
  // column update m, l, write alpha = exp2(m_old - m_new) and turn S into probabilities.
  void (*softmax_cols)(float* S, int64_t rows, int64_t ld, int64_t n, float* m, float* l, float* alpha);
  // col[r] += sum_c exp2(S[r][c] - lse[c]) for r < rows, c < n (n a multiple of kLane).
  void (*exp_rowsum)(const float* S, int64_t rows, int64_t ld, int64_t n, const float* lse, float* col);
  // x[i] *= a, i < n.
  void (*scale)(float* x, int64_t n, float a);
  // Decode: s[r] = q . row(idx[r]) for the rows of base (row stride ss, dtype dt), D long.
  void (*dots)(const float* q, const void* base, int64_t ss, const int64_t* idx, int64_t n, DType dt, int64_t D,
               float* s);
  // Decode: o[0..D) += sum_r p[r] * row(idx[r]).
  void (*axpys)(float* o, const float* p, const void* base, int64_t ss, const int64_t* idx, int64_t n, DType dt,
                int64_t D);
  // y[i] = exp2(x[i] - sub), i < n; returns sum(y).
  float (*exp_sub)(float* x, int64_t n, float sub);
};

const AttnKernels& attn_kernels_portable();
#if defined(__x86_64__)
const AttnKernels& attn_kernels_avx2();
#endif
inline const AttnKernels& attn_kernels() {
#if defined(__x86_64__)
  if (active_isa() != Isa::kPortable) return attn_kernels_avx2();  // AVX-512 machines use AVX2 here
#endif
  return attn_kernels_portable();
}

inline const void* elem_ptr(const void* base, DType dt, int64_t offset) {
  return static_cast<const char*>(base) + offset * dtype_size(dt);
}

}  // namespace sparsekern
