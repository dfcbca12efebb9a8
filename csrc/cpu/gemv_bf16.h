// Dense bf16 GEMV for decode: y [rows, n] = x [rows, k] @ W.T + bias, W [n, k] bf16 row-major, fp32 sums
// (AVX-512 BF16 dot products), y rounded to bf16 once. Torch-free. The lean decode step's LM head
// (sparsekern/lean/native.py): on SmolLM2 (49152 x 576, 57 MB) torch's bf16 F.linear reads ~17
// GB/s of this machine's ~29.5.
#pragma once

#include <cstdint>

namespace sparsekern {

// True where this CPU (and SPARSEKERN_CPU_ISA) allows the kernel: AVX-512 with BF16.
bool gemv_bf16_supported();

// x rows at stride ldx, y rows at stride ldy; bias [n] bf16 or null, added to the fp32 sum;
// split over `threads` by output rows.
void gemv_bf16(const uint16_t* x, int64_t rows, int64_t ldx, const uint16_t* w, const uint16_t* bias, int64_t n,
               int64_t k, uint16_t* y, int64_t ldy, int threads);

}  // namespace sparsekern
