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

// Scalar dtype conversions (IEEE half, bfloat16 with round-to-nearest-even).
inline float half_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
    bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds past 65504: inf
  if (ax < 0x38800000u) {                                     // subnormal or zero half
    if (ax < 0x33000000u) return (uint16_t)sign;
    uint32_t e = ax >> 23, man = (ax & 0x7fffffu) | 0x800000u, shift = 126 - e;
    uint32_t r = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return (uint16_t)(sign | r);
  }
  uint32_t r = ax + 0xfffu + ((ax >> 13) & 1);  // round to nearest even on the 13 dropped bits
  return (uint16_t)(sign | (((r >> 23) - 112) << 10) | ((r >> 13) & 0x3ffu));
}

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);  // keep NaN a NaN
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

inline float load_elem(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::kF16: return half_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kBF16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

inline const void* elem_ptr(const void* base, DType dt, int64_t offset) {
  return static_cast<const char*>(base) + offset * (dt == DType::kF32 ? 4 : 2);
}

}  // namespace sparsekern
