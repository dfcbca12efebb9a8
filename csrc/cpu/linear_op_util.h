// Torch-side helpers shared by the linear op wrappers (nm_linear_op.cpp, bsr_linear_op.cpp).
#pragma once
#ifdef SPARSEKERN_TORCH
#include <ATen/ATen.h>

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

}  // namespace sparsekern
#endif
