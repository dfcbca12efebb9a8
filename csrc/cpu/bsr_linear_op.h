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
// Quantized blocks on AVX-512: the decode kernel (it re-reads the weight per 4 rows, but a half / a quarter
// of the bytes, and dequantizes in registers) up to these rows: bf16 x / other dtypes; more: the
// batched kernel, whose pack dequantizes to fp32. NOTE: Zen 4, 2 threads, 11008x4096 block 32x32
// at 90%, group 32, 6 weights in rotation, medians of 5 interleaved rounds, us, decode vs batched:
// bf16 x int4 8 rows 322 vs 1582, 16 574 vs 1832, 32 1273 vs 2696, 64 2544 vs 3959, 128 5472 vs
// 6497; int8 16 894 vs 1785, 32 2013 vs 2641, 64 3903 vs 3820. fp32 x int4 8 882 vs 1586, 32
// 2681 vs 2593, 64 4092 vs 3575 (int8 alike).
constexpr int64_t kBsrQuantDecodeMaxRowsBf16 = 32, kBsrQuantDecodeMaxRows = 16;

// The whole op after its checks (check_bsr_linear_args): every tensor contiguous, y [rows, out]
// contiguous. Every regime (decode, batched, dense GEMM); NaN/Inf rows of x as in the dense op.
// Quantized (int8 / uint8) blocks come with their scales and zeros (sparsekern/formats/bsr.py).
void bsr_linear_run(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& blocks,
                    const std::optional<at::Tensor>& bias, at::Tensor& y,
                    const std::optional<at::Tensor>& scales = std::nullopt,
                    const std::optional<at::Tensor>& zeros = std::nullopt);

}  // namespace sparsekern
#endif
