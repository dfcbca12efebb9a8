// Torch-side helpers shared by the linear op wrappers (nm_linear_op.cpp, bsr_linear_op.cpp).
#pragma once
#ifdef SPARSEKERN_TORCH
#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "cpu/linear_common.h"

namespace sparsekern {

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return DType::kBF16;
    case at::kHalf: return DType::kF16;
    case at::kFloat: return DType::kF32;
    default: TORCH_CHECK(false, "sparsekern CPU linear: unsupported dtype ", t, " (ops.py should have refused it)");
  }
}

// y [rows, out] of a linear with no input features (K = 0): the bias in every row, else zeros.
inline void bias_rows(at::Tensor& y, const std::optional<at::Tensor>& bias) {
  if (bias) {
    y.copy_(bias->unsqueeze(0).expand_as(y));
  } else {
    y.zero_();
  }
}

// Indices of the rows of x [rows, k] (contiguous) holding a NaN or Inf, or a value of magnitude
// >= 2^100 (fp32, bf16; fp16 has none). Sparse kernels skip pruned weights, where the dense op
// computes 0 * inf = nan; the integer-weight kernels sum q * x before the scale, which overflows
// where the dense op's (q * scale) * x does not (|q| * |x| * K < 2^128 below 2^100 for K < 2^20).
// Callers recompute these rows with dense semantics. An exponent test on the bits: no float
// compare, vectorises.
inline std::vector<int64_t> nonfinite_or_huge_rows(const at::Tensor& x) {
  constexpr uint32_t kHugeExp = 127 + 100;  // the biased exponent of 2^100
  std::vector<int64_t> bad;
  const int64_t rows = x.size(0), k = x.size(1);
  for (int64_t r = 0; r < rows; ++r) {
    bool any = false;
    if (x.scalar_type() == at::kFloat) {
      const uint32_t* p = reinterpret_cast<const uint32_t*>(x.data_ptr()) + r * k;
      uint32_t hit = 0;
      for (int64_t i = 0; i < k; ++i) hit |= ((p[i] & 0x7f800000u) >= (kHugeExp << 23));
      any = hit != 0;
    } else {
      const bool bf16 = x.scalar_type() == at::kBFloat16;
      const uint16_t mask = bf16 ? 0x7f80u : 0x7c00u, from = bf16 ? kHugeExp << 7 : 0x7c00u;
      const uint16_t* p = reinterpret_cast<const uint16_t*>(x.data_ptr()) + r * k;
      uint32_t hit = 0;
      for (int64_t i = 0; i < k; ++i) hit |= ((p[i] & mask) >= from);
      any = hit != 0;
    }
    if (any) bad.push_back(r);
  }
  return bad;
}

// Recomputes y's rows listed in `bad` with `dense_rows(x_bad) -> y_bad` (dense semantics).
template <typename DenseRows>
void redo_nonfinite_rows(const at::Tensor& x, at::Tensor& y, const std::vector<int64_t>& bad, DenseRows dense_rows) {
  if (bad.empty()) return;
  const at::Tensor idx = at::tensor(bad, at::TensorOptions().dtype(at::kLong));
  y.index_copy_(0, idx, dense_rows(x.index_select(0, idx).contiguous()));
}

}  // namespace sparsekern
#endif
