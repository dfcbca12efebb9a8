// sparsekern::_lean_head_cpu(x, weight): x [rows, k] @ weight.T for x and weight [n, k] both bf16
// or both fp32 (AVX2 at least; AVX-512 / AVX-512 BF16 where the CPU has it), no bias: the lean
// decode step's LM head and DenseHead's decode rows (sparsekern/nn/dense_head.py asks _cpu_isa
// first); anything the kernels do not take raises, naming the argument.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/gemv.h"
#include "cpu/linear_op_util.h"
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
  const DType t = to_dtype(x.scalar_type());
  TORCH_CHECK_VALUE(gemv_supported(t), "_lean_head_cpu: this CPU has no AVX2 for ", x.scalar_type(), " (see _cpu_isa)");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = new_output({x.size(0), weight.size(0)}, x.options());
  const int64_t n = weight.size(0), k = weight.size(1);
  gemv(xc.const_data_ptr(), xc.size(0), k, weight.const_data_ptr(), nullptr, n, k, y.data_ptr(), n, t,
       at::get_num_threads());
  return y;
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("_lean_head_cpu", &sparsekern::lean_head_cpu); }
