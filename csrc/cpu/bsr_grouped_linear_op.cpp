// sparsekern::_bsr_grouped_linear_cpu: one block-sparse linear per expert over the rows routed to it
// (MoE). x [T, K] sorted by expert; crow int32 [E, out/bm + 1] of global indices into the shared
// col [nnz] and blocks [nnz, bm, bk] (sparsekern/formats/bsr.py stack_bsr); offsets int64 [E+1] on
// the CPU. Each expert runs the BSR linear's own kernels on pointers into the shared arrays (no
// copy of any block): few rows the decode kernel, many rows bsr_linear_run (batched kernel or
// dense GEMM). Experts with no rows cost nothing. The op checks its arguments itself
// (cpu/op_checks.h): it is callable without ops_moe.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/bsr_linear.h"
#include "cpu/bsr_linear_op.h"
#include "cpu/grouped_job.h"
#include "cpu/linear_op_util.h"
#include "cpu/op_checks.h"
#include "cpu/output.h"

namespace sparsekern {
namespace {

// Decode experts (few rows each) as one job on the pool (cpu/grouped_job.h): chunks of block rows.
void decode_experts(const std::vector<BSRLinearArgs>& args, Isa isa) {
  const BSRLinearArgs& a0 = args.front();
  if (a0.threads <= 1 || args.size() == 1) {
    for (const BSRLinearArgs& a : args) bsr_linear_decode(a, isa);
    return;
  }
  const int64_t es = dtype_size(a0.dtype);
  const int64_t experts = static_cast<int64_t>(args.size());
  expert_chunks(experts, a0.block_rows, a0.bm, a0.threads, [&](int64_t i, int64_t rb0, int64_t n) {
    BSRLinearArgs sub = args[i];
    sub.block_rows = n;
    sub.crow += rb0;  // global indices: col, blocks and nnz stay those of the whole stack
    sub.out = static_cast<char*>(sub.out) + rb0 * sub.bm * es;
    sub.threads = 1;  // this chunk is one thread's share already
    bsr_linear_decode(sub, isa);
  });
}

at::Tensor bsr_grouped_linear_cpu(const at::Tensor& x_in, const at::Tensor& crow_in, const at::Tensor& col_in,
                                  const at::Tensor& blocks_in, const at::Tensor& offsets_in) {
  check_bsr_grouped_linear_args(x_in, crow_in, col_in, blocks_in, offsets_in);
  const at::Tensor x = x_in.contiguous(), crow = crow_in.contiguous(), col = col_in.contiguous();
  const at::Tensor blocks = blocks_in.contiguous(), offsets = offsets_in.contiguous();
  const int64_t tokens = x.size(0), k = x.size(1), n_experts = crow.size(0), block_rows = crow.size(1) - 1;
  const int64_t bm = blocks.size(1), bk = blocks.size(2), out = block_rows * bm;
  at::Tensor y = new_output({tokens, out}, x.options());
  if (tokens == 0 || out == 0) return y;
  if (k == 0) return y.zero_();

  const int32_t* crow_p = crow.data_ptr<int32_t>();
  const int64_t es = x.element_size();
  auto expert_args = [&](const ExpertRows& ex) {
    BSRLinearArgs a{};
    a.x = static_cast<const char*>(x.data_ptr()) + ex.r0 * k * es;
    a.rows = ex.rows;
    a.k = k;
    a.ldx = k;
    a.crow = crow_p + ex.e * (block_rows + 1);
    a.col = col.data_ptr<int32_t>();
    a.blocks = blocks.data_ptr();
    a.block_rows = block_rows;
    a.nnz = blocks.size(0);
    a.bm = static_cast<int>(bm);
    a.bk = static_cast<int>(bk);
    a.bias = nullptr;
    a.out = static_cast<char*>(y.data_ptr()) + ex.r0 * out * es;
    a.ldo = out;
    a.dtype = to_dtype(x.scalar_type());
    a.threads = at::get_num_threads();
    return a;
  };
  // Expert e alone as the single-weight op takes it: its crow rebased to 0 (block_rows + 1 ints),
  // its col and blocks as views into the shared arrays.
  auto expert_run = [&](const ExpertRows& ex, const at::Tensor& xs, at::Tensor& ys) {
    const int64_t lo = crow_p[ex.e * (block_rows + 1)], hi = crow_p[ex.e * (block_rows + 1) + block_rows];
    const at::Tensor crow_e = crow[ex.e] - lo;
    bsr_linear_run(xs, crow_e, col.narrow(0, lo, hi - lo), blocks.narrow(0, lo, hi - lo), std::nullopt, ys);
  };

  const int64_t* off = offsets.data_ptr<int64_t>();
  std::vector<ExpertRows> decode;
  std::vector<BSRLinearArgs> decode_args;
  for (int64_t e = 0; e < n_experts; ++e) {
    const ExpertRows ex{e, off[e], off[e + 1] - off[e]};
    if (ex.rows == 0) continue;
    if (ex.rows > kBsrDecodeMaxRows) {
      at::Tensor ys = y.narrow(0, ex.r0, ex.rows);
      expert_run(ex, x.narrow(0, ex.r0, ex.rows), ys);
    } else {
      decode.push_back(ex);
      decode_args.push_back(expert_args(ex));
    }
  }
  if (decode.empty()) return y;
  decode_experts(decode_args, active_isa());
  // The decode kernel skips absent blocks: rows holding NaN/Inf are redone by the single-weight op,
  // which gives them dense semantics (0 * inf = nan).
  for (const ExpertRows& ex : decode) {
    const at::Tensor xs = x.narrow(0, ex.r0, ex.rows);
    at::Tensor ys = y.narrow(0, ex.r0, ex.rows);
    redo_nonfinite_rows(xs, ys, nonfinite_or_huge_rows(xs), [&](const at::Tensor& xb) {
      at::Tensor yb = at::empty({xb.size(0), out}, y.options());
      expert_run(ex, xb, yb);
      return yb;
    });
  }
  return y;
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("_bsr_grouped_linear_cpu", &sparsekern::bsr_grouped_linear_cpu); }
