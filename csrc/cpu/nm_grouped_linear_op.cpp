// sparsekern::_nm_grouped_linear_cpu: one N:M linear per expert over the rows routed to it (MoE).
// x [T, K] sorted by expert, values [E, out, kept] / meta [E, out, words] stacked experts, offsets
// int64 [E+1] on the CPU. Each expert's slice runs the N:M linear's own kernels (nm_linear_op.h):
// few rows the decode passes, many rows decompress + GEMM. Experts with no rows cost nothing.
// The op checks its arguments itself (cpu/op_checks.h): it is callable without ops_moe.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/grouped_job.h"
#include "cpu/linear_op_util.h"
#include "cpu/nm_linear.h"
#include "cpu/nm_linear_op.h"
#include "cpu/op_checks.h"
#include "cpu/output.h"

namespace sparsekern {
namespace {

// Decode experts (few rows each) as one job on the pool (cpu/grouped_job.h): chunks of output rows.
void decode_experts(const std::vector<NMLinearArgs>& args) {
  const NMLinearArgs& a0 = args.front();
  if (a0.threads <= 1 || args.size() == 1) {
    for (const NMLinearArgs& a : args) nm_linear_decode_passes(a);
    return;
  }
  const int64_t kept = a0.k / a0.m * a0.n, es = dtype_size(a0.dtype);
  const int64_t experts = static_cast<int64_t>(args.size());
  expert_chunks(experts, a0.out_features, 1, a0.threads, [&](int64_t i, int64_t o0, int64_t n) {
    NMLinearArgs sub = args[i];
    sub.out_features = n;
    sub.values = static_cast<const char*>(sub.values) + o0 * kept * es;
    sub.meta += o0 * sub.meta_words;
    sub.out = static_cast<char*>(sub.out) + o0 * es;
    sub.threads = 1;  // this chunk is one thread's share already
    nm_linear_decode_passes(sub);
  });
}

at::Tensor nm_grouped_linear_cpu(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& meta_in,
                                 const at::Tensor& offsets_in, int64_t n, int64_t m) {
  check_nm_grouped_linear_args(x_in, values_in, meta_in, offsets_in, n, m);
  const at::Tensor x = x_in.contiguous(), values = values_in.contiguous(), meta = meta_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t tokens = x.size(0), k = x.size(1), n_experts = values.size(0), out = values.size(1);
  const int64_t kept = values.size(2), words = meta.size(2);
  at::Tensor y = new_output({tokens, out}, x.options());
  if (tokens == 0 || out == 0) return y;
  if (k == 0) return y.zero_();

  NMLinearArgs base{};
  base.k = k;
  base.ldx = k;
  base.out_features = out;
  base.meta_words = words;
  base.n = static_cast<int>(n);
  base.m = static_cast<int>(m);
  base.bias = nullptr;
  base.ldo = out;
  base.dtype = to_dtype(x.scalar_type());
  base.threads = at::get_num_threads();
  const int64_t es = x.element_size();
  auto expert_args = [&](const ExpertRows& ex) {
    NMLinearArgs a = base;
    a.x = static_cast<const char*>(x.data_ptr()) + ex.r0 * k * es;
    a.rows = ex.rows;
    a.values = static_cast<const char*>(values.data_ptr()) + ex.e * out * kept * es;
    a.meta = meta.data_ptr<int32_t>() + ex.e * out * words;
    a.out = static_cast<char*>(y.data_ptr()) + ex.r0 * out * es;
    return a;
  };

  const int64_t* off = offsets.data_ptr<int64_t>();
  std::vector<ExpertRows> decode;
  std::vector<NMLinearArgs> decode_args;
  for (int64_t e = 0; e < n_experts; ++e) {
    const ExpertRows ex{e, off[e], off[e + 1] - off[e]};
    if (ex.rows == 0) continue;
    if (const NMLinearArgs a = expert_args(ex); ex.rows > nm_decode_max_rows(a)) {
      at::Tensor ys = y.narrow(0, ex.r0, ex.rows);
      nm_linear_many_rows(a, x.narrow(0, ex.r0, ex.rows), std::nullopt, ys);
    } else {
      decode.push_back(ex);
      decode_args.push_back(expert_args(ex));
    }
  }
  if (decode.empty()) return y;
  decode_experts(decode_args);
  // Rows holding NaN/Inf again through the GEMM path: dense semantics (0 * inf = nan).
  for (size_t i = 0; i < decode.size(); ++i) {
    const at::Tensor xs = x.narrow(0, decode[i].r0, decode[i].rows);
    at::Tensor ys = y.narrow(0, decode[i].r0, decode[i].rows);
    redo_nonfinite_on_tiles(decode_args[i], xs, std::nullopt, ys);
  }
  return y;
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("_nm_grouped_linear_cpu", &sparsekern::nm_grouped_linear_cpu); }
