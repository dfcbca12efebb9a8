// The BSR linear on whole tensors (bsr_linear_op.cpp), shared by _bsr_linear_cpu and the lean
// decode step (lean_step_op.cpp).
#pragma once
#ifdef SPARSEKERN_TORCH
#include <ATen/ATen.h>

#include <optional>

namespace sparsekern {

// Rows of x up to which the decode kernel runs (more: the batched kernel or the dense GEMM).
// NOTE: crossover measured on the 2-core EPYC (bench/bench_linear_cpu.py).
constexpr int64_t kBsrDecodeMaxRows = 4;

// The whole op after its checks (check_bsr_linear_args): every tensor contiguous, y [rows, out]
// contiguous. Every regime (decode, batched, dense GEMM); NaN/Inf rows of x as in the dense op.
// Quantized (int8 / uint8) blocks come with their scales and zeros (sparsekern/formats/bsr.py).
void bsr_linear_run(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& blocks,
                    const std::optional<at::Tensor>& bias, at::Tensor& y,
                    const std::optional<at::Tensor>& scales = std::nullopt,
                    const std::optional<at::Tensor>& zeros = std::nullopt);

}  // namespace sparsekern
#endif
