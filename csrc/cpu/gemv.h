// Dense GEMV for decode: y [rows, n] = x [rows, k] @ W.T + bias, W [n, k] row-major, bf16 (AVX-512
// BF16 dot products) or fp32 (AVX-512 FMA), fp32 sums, y rounded to the dtype once. Torch-free.
// The lean decode step's LM head and dense linears (csrc/cpu/lean_step_op.cpp, lean_head_op.cpp):
// on SmolLM2's head (49152 x 576) torch's F.linear reads ~17 GB/s in bf16 and ~11 in fp32 of this
// machine's ~29.5.
#pragma once

#include <cstdint>

namespace sparsekern {

// True where this CPU (and SPARSEKERN_CPU_ISA) allows the kernel: AVX-512 with BF16.
bool gemv_bf16_supported();

// x rows at stride ldx, y rows at stride ldy; bias [n] bf16 or null, added to the fp32 sum;
// split over `threads` by output rows.
void gemv_bf16(const uint16_t* x, int64_t rows, int64_t ldx, const uint16_t* w, const uint16_t* bias, int64_t n,
               int64_t k, uint16_t* y, int64_t ldy, int threads);

// The same for fp32, where the CPU (and SPARSEKERN_CPU_ISA) has AVX-512.
bool gemv_f32_supported();
void gemv_f32(const float* x, int64_t rows, int64_t ldx, const float* w, const float* bias, int64_t n, int64_t k,
              float* y, int64_t ldy, int threads);

}  // namespace sparsekern
