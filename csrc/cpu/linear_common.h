// Shared by the N:M and block-sparse CPU linears: element types, scalar conversions, argument
// structs. Torch-free so ctest can link the kernels without libtorch.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/dtype.h"
#include "cpu/isa.h"

namespace sparsekern {

// x rows converted to fp32, each padded with zeros so window loads past K stay in bounds.
void convert_rows_f32(const void* x, int64_t rows, int64_t k, int64_t ldx, DType t, float* dst, int64_t ld_dst,
                      int threads);

// y = x @ W.T + bias for an N:M weight; x [rows, k] (row stride ldx), out [rows, out] (ldo).
struct NMLinearArgs {
  const void* x;
  int64_t rows, k, ldx;
  const void* values;  // [out, k*n/m]
  const int32_t* meta;  // [out, meta_words]
  int64_t out_features, meta_words;
  int n, m;
  const void* bias;  // [out] or nullptr
  void* out;
  int64_t ldo;
  DType dtype;
  int threads;
  // Quantized values (sparsekern/formats/quant.py), qbits 8 or 4 (0: values are of dtype):
  // values int8 [out, kept] or uint8 [out, kept / 2] (int4: slot 2j in the low nibble, 2j+1 in
  // the high one, unsigned). Kept slot j of row o is (q - zero) * scale of group j / group_kept;
  // scales [out, groups] of dtype, zeros int8 [out, groups] or nullptr (0 for int8, 8 for int4).
  int qbits = 0;
  const void* scales = nullptr;
  const int8_t* zeros = nullptr;
  int64_t groups = 1, group_kept = 0;
  // int8 activations (opt-in, quantized values only): x rounded per row and block of act_block
  // columns (nm_linear_a8.cpp); 0: x used as it is.
  int64_t act_block = 0;
  // fp32 x with quantized values on the AVX-512 BF16 kernels, x as bf16 parts: 3 sum to x exactly
  // (fp32 products; one row of x only, the AVX2 kernel past it); 2 keep x within 2^-17 |x|, for
  // any rows (what torch's float32 matmul precision "high" or "medium" admits; set by the op).
  int x_parts = 3;
};

// Element i (row-major, rows of an even count when int4) of quantized integers: int8, or int4
// two per byte, element 2j in the low nibble, 2j+1 in the high one (unsigned).
inline int stored_int(const void* values, int qbits, int64_t i) {
  if (qbits == 8) return static_cast<const int8_t*>(values)[i];
  const uint8_t v = static_cast<const uint8_t*>(values)[i / 2];
  return (i & 1) ? v >> 4 : v & 15;
}

// The zero point of a symmetric quantized weight: 0 for int8, 8 for int4.
inline int symmetric_zero(int qbits) { return qbits == 4 ? 8 : 0; }

// The scale and zero of group g of row o of a quantized weight.
inline float nm_scale(const NMLinearArgs& a, int64_t o, int64_t g) { return load_f32(a.scales, o * a.groups + g, a.dtype); }
inline int nm_zero(const NMLinearArgs& a, int64_t o, int64_t g) {
  return a.zeros ? a.zeros[o * a.groups + g] : symmetric_zero(a.qbits);
}

// Kept weight j of row o as fp32, whatever the storage (scalar: portable paths and tails).
inline float nm_weight(const NMLinearArgs& a, int64_t o, int64_t j) {
  const int64_t kept = a.k / a.m * a.n;
  if (a.qbits == 0) return load_f32(a.values, o * kept + j, a.dtype);
  const int64_t g = j / a.group_kept;
  return static_cast<float>(stored_int(a.values, a.qbits, o * kept + j) - nm_zero(a, o, g)) * nm_scale(a, o, g);
}

// Same for a BSR weight: crow [out/bm + 1], col [nnz], blocks [nnz, bm, bk].
struct BSRLinearArgs {
  const void* x;
  int64_t rows, k, ldx;
  const int32_t* crow;
  const int32_t* col;
  const void* blocks;
  int64_t block_rows, nnz;
  int bm, bk;
  const void* bias;
  void* out;
  int64_t ldo;
  DType dtype;
  int threads;
  // Quantized blocks (sparsekern/formats/bsr.py), qbits 8 or 4 (0: blocks are of dtype): blocks
  // int8 [nnz, bm, bk] or uint8 [nnz, bm, bk / 2] (int4: column 2j of a block row in the low
  // nibble, 2j+1 in the high one, unsigned). Column c of row i of block b is (q - zero) * scale
  // of group c / (bk / groups); scales [nnz, bm, groups] of dtype, zeros int8 of that shape or
  // nullptr (0 for int8, 8 for int4).
  int qbits = 0;
  const void* scales = nullptr;
  const int8_t* zeros = nullptr;
  int groups = 1;
};

// Column c of row i of stored block b as fp32, whatever the storage (scalar: portable paths).
inline float bsr_weight(const BSRLinearArgs& a, int64_t b, int i, int c) {
  const int64_t row = b * a.bm + i;  // the stored block row
  if (a.qbits == 0) return load_f32(a.blocks, row * a.bk + c, a.dtype);
  const int64_t g = row * a.groups + c / (a.bk / a.groups);
  const int zero = a.zeros ? a.zeros[g] : symmetric_zero(a.qbits);
  return static_cast<float>(stored_int(a.blocks, a.qbits, row * a.bk + c) - zero) * load_f32(a.scales, g, a.dtype);
}

}  // namespace sparsekern
