// Dense GEMV for decode: y [rows, n] = x [rows, k] @ W.T + bias, W [n, k] row-major, bf16 (AVX-512
// BF16 dot products, else AVX2 FMA on widened values) or fp32 (AVX-512 FMA, else AVX2 FMA), fp32
// sums, y rounded to the dtype once. Torch-free.
// The lean decode step's LM head and dense linears (csrc/cpu/lean_step_op.cpp, lean_head_op.cpp):
// on SmolLM2's head (49152 x 576) torch's F.linear reads ~17 GB/s in bf16 and ~11 in fp32 of this
// machine's ~29.5.
#pragma once

#include <cstdint>

#include "cpu/dtype.h"

namespace sparsekern {

// True where this CPU (and SPARSEKERN_CPU_ISA) runs gemv for element type t: bf16 and fp32 with
// AVX2 + FMA at least; nothing else.
bool gemv_supported(DType t);

// x rows at stride ldx, y rows at stride ldy, all of type t (where gemv_supported(t)); bias [n]
// or null, added to the fp32 sum; split over `threads` by output rows.
void gemv(const void* x, int64_t rows, int64_t ldx, const void* w, const void* bias, int64_t n, int64_t k, void* y,
          int64_t ldy, DType t, int threads);

}  // namespace sparsekern
