// sparsekern::_lean_head_cpu(x, weight): x [rows, k] @ weight.T for bf16 x and weight [n, k] (no
// bias), the lean decode step's LM head where gemv_bf16_supported() (sparsekern/lean/native.py
// asks _cpu_isa first); anything the kernel does not take raises, naming the argument.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/gemv_bf16.h"
#include "cpu/op_checks.h"
#include "cpu/output.h"

namespace sparsekern {
namespace {

at::Tensor lean_head_cpu(const at::Tensor& x, const at::Tensor& weight) {
  check_tensor("x", x, {at::kBFloat16});
  check_tensor("weight", weight, {at::kBFloat16});
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(), "x / weight: expected device cpu, got ",
                    x.device(), " / ", weight.device());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.is_contiguous(),
                    "weight: expected a contiguous 2-D [out, in] tensor, got shape ", py_shape(weight.sizes()));
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == weight.size(1), "x: expected shape (rows, ", weight.size(1),
                    ") (in_features), got ", py_shape(x.sizes()));
  TORCH_CHECK_VALUE(gemv_bf16_supported(), "_lean_head_cpu: this CPU has no AVX-512 BF16 (see _cpu_isa)");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = new_output({x.size(0), weight.size(0)}, x.options());
  gemv_bf16(static_cast<const uint16_t*>(xc.const_data_ptr()), xc.size(0), xc.size(1),
            static_cast<const uint16_t*>(weight.const_data_ptr()), nullptr, weight.size(0), weight.size(1),
            static_cast<uint16_t*>(y.data_ptr()), y.size(1), at::get_num_threads());
  return y;
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("_lean_head_cpu", &sparsekern::lean_head_cpu); }
