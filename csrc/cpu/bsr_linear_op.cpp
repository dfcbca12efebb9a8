// sparsekern::_bsr_linear_cpu: x [rows, K] @ W.T + bias for a BSR weight (crow, col, blocks), on
// the CPU. The op checks its arguments itself (cpu/op_checks.h): it is callable without ops.py. Few rows: the decode kernel; many rows:
// the packed micro-kernel, or (dense-ish weights) block-row decompression + dense GEMM.
// Rows of x holding NaN/Inf (or values of magnitude >= 2^100) come out exactly as from the dense op.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/bsr_linear.h"
#include "cpu/bsr_linear_op.h"
#include "cpu/linear_op_util.h"
#include "cpu/op_checks.h"
#include "cpu/output.h"

namespace sparsekern {
namespace {

// NOTE: crossover density measured on the 2-core EPYC (bench/bench_linear_cpu.py); rows: bsr_linear_op.h.
// Above this fraction of stored blocks (fp32 only), decompressed tiles + dense GEMM.
// NOTE: the sparse kernel sustains ~145-150 GFLOP/s at any density (4096x4096 @ 512 rows:
// 11.7 ms at density 0.1, 57.6 ms at 0.5, 84.6 ms at 0.7) against ~101 ms for the dense fp32
// GEMM (~170 GFLOP/s). bf16/fp16 GEMMs run ~20 GFLOP/s here (4096x4096 @ 512 rows bf16:
// 780 ms), so those dtypes always take the sparse kernel.
constexpr double kGemmDensity = 0.6;
constexpr int64_t kTileOut = 1024;  // output rows decompressed per GEMM (see nm_linear_op.cpp)

// Decompressed tiles of W + dense GEMM: exact dense semantics (0 * inf = nan). Half types go
// through the fp32 GEMM (only rows of x holding NaN/Inf take this path for them).
void bsr_linear_gemm(const BSRLinearArgs& a, const at::Tensor& x, const at::Tensor& blocks,
                     const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t k = x.size(1), bm = a.bm, block_rows = a.block_rows;
  const bool f32 = x.scalar_type() == at::kFloat;
  const at::Tensor x32 = f32 ? x : x.to(at::kFloat);
  const int64_t tile_rb = std::max<int64_t>(1, kTileOut / bm);
  at::Tensor tile = at::empty({std::min(block_rows, tile_rb) * bm, k}, x.options());  // dequantized if need be
  for (int64_t rb0 = 0; rb0 < block_rows; rb0 += tile_rb) {
    const int64_t nrb = std::min(tile_rb, block_rows - rb0);
    at::Tensor t = tile.narrow(0, 0, nrb * bm);
    bsr_decompress_rows(a, rb0, nrb, t.data_ptr(), k);
    at::Tensor ys = y.narrow(1, rb0 * bm, nrb * bm);
    if (f32) {
      if (bias) {
        at::addmm_out(ys, bias->narrow(0, rb0 * bm, nrb * bm), x, t.t());
      } else {
        at::mm_out(ys, x, t.t());
      }
    } else {
      const at::Tensor t32 = t.to(at::kFloat);
      ys.copy_(bias ? at::addmm(bias->narrow(0, rb0 * bm, nrb * bm).to(at::kFloat), x32, t32.t())
                    : at::mm(x32, t32.t()));
    }
  }
}

}  // namespace

void bsr_linear_run(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& blocks,
                    const std::optional<at::Tensor>& bias, at::Tensor& y, const std::optional<at::Tensor>& scales,
                    const std::optional<at::Tensor>& zeros) {
  const int qbits = blocks.scalar_type() == at::kChar ? 8 : blocks.scalar_type() == at::kByte ? 4 : 0;
  const int64_t rows = x.size(0), k = x.size(1), bm = blocks.size(1), bk = blocks.size(2) * (qbits == 4 ? 2 : 1);
  const int64_t block_rows = crow.numel() - 1, out_features = block_rows * bm;
  if (rows == 0 || out_features == 0) return;
  if (k == 0) return bias_rows(y, bias);

  BSRLinearArgs a{};
  a.x = x.data_ptr();
  a.rows = rows;
  a.k = k;
  a.ldx = k;
  a.crow = crow.data_ptr<int32_t>();
  a.col = col.data_ptr<int32_t>();
  a.blocks = blocks.data_ptr();
  a.block_rows = block_rows;
  a.nnz = blocks.size(0);
  a.bm = static_cast<int>(bm);
  a.bk = static_cast<int>(bk);
  a.bias = bias ? bias->data_ptr() : nullptr;
  a.out = y.data_ptr();
  a.ldo = out_features;
  a.dtype = to_dtype(x.scalar_type());
  a.threads = at::get_num_threads();
  if (qbits) {
    a.qbits = qbits;
    a.scales = scales->data_ptr();
    a.zeros = zeros ? zeros->data_ptr<int8_t>() : nullptr;
    a.groups = static_cast<int>(scales->size(2));
  }
  const Isa isa = active_isa();
  const double density = static_cast<double>(a.nnz) * bm * bk / (static_cast<double>(out_features) * k);
  // Quantized blocks below AVX-512: the AVX2 decode kernel up to 4 rows (its crossover with the
  // batched kernel not measured), the batched kernel from 5.
  const int64_t decode_rows = !qbits || isa < Isa::kAvx512 ? kBsrDecodeMaxRows
                              : a.dtype == DType::kBF16    ? kBsrQuantDecodeMaxRowsBf16
                                                           : kBsrQuantDecodeMaxRows;
  if (rows > decode_rows && density > kGemmDensity && a.dtype == DType::kF32 && isa != Isa::kPortable) {
    bsr_linear_gemm(a, x, blocks, bias, y);
    return;
  }
  if (rows <= decode_rows) {
    bsr_linear_decode(a, isa);
  } else {
    bsr_linear_batched(a, isa);
  }
  // The sparse kernels skip absent blocks: rows of x holding NaN/Inf are redone densely.
  redo_nonfinite_rows(x, y, nonfinite_or_huge_rows(x), [&](const at::Tensor& xb) {
    at::Tensor yb = at::empty({xb.size(0), out_features}, y.options());
    bsr_linear_gemm(a, xb, blocks, bias, yb);  // uses a's weights only
    return yb;
  });
}

namespace {

at::Tensor bsr_linear_cpu(const at::Tensor& x_in, const at::Tensor& crow_in, const at::Tensor& col_in,
                          const at::Tensor& blocks_in, const std::optional<at::Tensor>& bias_in,
                          const std::optional<at::Tensor>& scales_in, const std::optional<at::Tensor>& zeros_in) {
  check_bsr_linear_args(x_in, crow_in, col_in, blocks_in, bias_in, scales_in, zeros_in);
  const at::Tensor x = x_in.contiguous(), crow = crow_in.contiguous(), col = col_in.contiguous(),
                   blocks = blocks_in.contiguous();
  auto contig = [](const std::optional<at::Tensor>& t) {
    return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
  };
  at::Tensor y = new_output({x.size(0), (crow.numel() - 1) * blocks.size(1)}, x.options());
  bsr_linear_run(x, crow, col, blocks, contig(bias_in), y, contig(scales_in), contig(zeros_in));
  return y;
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("_bsr_linear_cpu", &sparsekern::bsr_linear_cpu); }
