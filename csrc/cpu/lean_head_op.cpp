// sparsekern::_lean_head_cpu(x, weight): x [rows, k] @ weight.T for x and weight [n, k] both bf16
// (needs AVX-512 BF16) or both fp32 (AVX-512), no bias: the lean decode step's LM head
// (sparsekern/lean/native.py head_weight asks _cpu_isa first); anything the kernels do not take
// raises, naming the argument.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/gemv.h"
#include "cpu/op_checks.h"
#include "cpu/output.h"

namespace sparsekern {
namespace {

at::Tensor lean_head_cpu(const at::Tensor& x, const at::Tensor& weight) {
  check_tensor("x", x, {at::kBFloat16, at::kFloat});
  check_same("weight", weight, x, "x");
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x: expected device cpu, got ", x.device());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.is_contiguous(),
                    "weight: expected a contiguous 2-D [out, in] tensor, got shape ", py_shape(weight.sizes()));
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == weight.size(1), "x: expected shape (rows, ", weight.size(1),
                    ") (in_features), got ", py_shape(x.sizes()));
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK_VALUE(bf16 ? gemv_bf16_supported() : gemv_f32_supported(), "_lean_head_cpu: this CPU has no ",
                    bf16 ? "AVX-512 BF16" : "AVX-512", " for ", x.scalar_type(), " (see _cpu_isa)");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = new_output({x.size(0), weight.size(0)}, x.options());
  const int64_t rows = xc.size(0), n = weight.size(0), k = weight.size(1);
  if (bf16) {
    gemv_bf16(static_cast<const uint16_t*>(xc.const_data_ptr()), rows, k,
              static_cast<const uint16_t*>(weight.const_data_ptr()), nullptr, n, k, static_cast<uint16_t*>(y.data_ptr()),
              n, at::get_num_threads());
  } else {
    gemv_f32(xc.const_data_ptr<float>(), rows, k, weight.const_data_ptr<float>(), nullptr, n, k, y.data_ptr<float>(), n,
             at::get_num_threads());
  }
  return y;
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("_lean_head_cpu", &sparsekern::lean_head_cpu); }
