// The N:M linear's two regimes on whole tensors (nm_linear_op.cpp), shared by the ops that run
// N:M weights: _nm_linear_cpu, the grouped (MoE) op, which runs them per expert, and the lean
// decode step.
#pragma once
#ifdef SPARSEKERN_TORCH
#include <ATen/ATen.h>

#include <optional>

#include "cpu/linear_common.h"

namespace sparsekern {

// Rows of x up to which the decode passes beat the many-rows path for a's weight and x type.
int64_t nm_decode_max_rows(const NMLinearArgs& a);

// The decode kernel on a.rows rows (x row stride a.ldx, out row stride a.ldo), 8 rows per pass
// over the weights. NaN/Inf in x are not given dense semantics here (the callers redo those rows).
void nm_linear_decode_passes(const NMLinearArgs& a);

// Many rows of x, used as it is (a.act_block 0): the sparse GEMM where it applies (rows of x
// holding NaN/Inf redone by nm_linear_gemm), else nm_linear_gemm. a.x / a.ldx and a.out / a.ldo
// must be x's and y's.
void nm_linear_many_rows(const NMLinearArgs& a, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                         at::Tensor& y);

// Rows of x holding NaN/Inf, recomputed into y by nm_linear_gemm (dense semantics: 0 * inf = nan
// where a weight was pruned). Reads only a's weights; x and y are the tensors of a's call.
void redo_nonfinite_on_tiles(const NMLinearArgs& a, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                             at::Tensor& y);

// x [rows, a.k] @ W.T (+ bias) into y [rows, a.out_features] (contiguous): tiles of W decompressed,
// dense GEMM on each, so NaN/Inf propagate as in the dense op. Reads only a's weights.
void nm_linear_gemm(const NMLinearArgs& a, const at::Tensor& x, const std::optional<at::Tensor>& bias, at::Tensor& y);

// x (a.x: a.rows x a.k, row stride a.ldx, type a.dtype) rounded to int8 per a.act_block columns
// as the decode kernels round it, back as fp32 [rows, k]: the int8-activation ops' GEMM paths run
// on it, so a row's result does not depend on how many rows came with it.
at::Tensor rounded_x_f32(const NMLinearArgs& a);

// The whole op after its checks (check_nm_linear_args): every tensor contiguous, scales / zeros
// undefined for float values, y [rows, out] contiguous. Both regimes; NaN/Inf rows of x as in the
// dense op. _nm_linear_cpu and the lean decode step (lean_step_op.cpp) run this.
void nm_linear_run(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta, int64_t n, int64_t m,
                   const std::optional<at::Tensor>& bias, const at::Tensor& scales, const at::Tensor& zeros,
                   int64_t act_block, at::Tensor& y);

}  // namespace sparsekern
#endif
