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
};

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
};

}  // namespace sparsekern
