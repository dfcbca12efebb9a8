// Block-sparse (BSR) linear on the CPU, torch-free: decode kernel (few rows: each block streamed
// once, dot products along its rows), batched kernel (a register-blocked micro-kernel over the
// stored blocks of one block row), and block-row decompression (dense GEMM fallback, fp32 only).
//
// Format (sparsekern/formats/bsr.py): crow int32 [out/bm + 1], col int32 [nnz], blocks
// [nnz, bm, bk]. Garbage indices never read out of bounds: crow entries are clamped into
// [0, nnz] (and made non-decreasing), blocks whose column is outside [0, K/bk) are skipped.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/linear_common.h"
#include "cpu/parallel.h"

namespace sparsekern {

// out[r, :] = x[r, :] @ W.T + bias, fp32 accumulation. Any rows; meant for few.
void bsr_linear_decode(const BSRLinearArgs& a, Isa isa);

// The same, for many rows: x is repacked column-block-major (fp32), each block row's blocks are
// packed transposed (fp32) once, and a 6x16 register micro-kernel accumulates over all of the
// row's blocks per output tile (bsr_linear_batched_avx2.cpp).
void bsr_linear_batched(const BSRLinearArgs& a, Isa isa);

// Dense rows of block rows [rb0, rb0 + nrb) into dense ([nrb * bm, K], row stride ld, element
// type of the weight: dtype, quantized blocks dequantized). OpenMP over block rows.
void bsr_decompress_rows(const BSRLinearArgs& a, int64_t rb0, int64_t nrb, void* dense, int64_t ld);

// Clamped [begin, end) of block row rb (see the header comment).
inline void bsr_row_range(const BSRLinearArgs& a, int64_t rb, int64_t* begin, int64_t* end) {
  auto clamp = [&](int64_t v) { return v < 0 ? int64_t{0} : v > a.nnz ? a.nnz : v; };
  *begin = clamp(a.crow[rb]);
  *end = clamp(a.crow[rb + 1]);
  if (*end < *begin) *end = *begin;
}

// fn(rb, slot) for every block row rb, over the pool in runs of consecutive block rows (about 8
// runs per thread, parallel_range), each thread streaming its run's blocks in order.
// NOTE: one block row per chunk (the kernels' first form) was slower: two threads took turns
// claiming from one ticket 100-350 times per call and each streamed every other block row.
// AMD EPYC family 26 model 2 (Zen 5), 2 cores, block 32x32 at 90%, 1 row, weights streamed
// (>= 200 MB in rotation), 9-11 interleaved rounds, one block row -> runs, median ratio:
// fp32 1.00-1.16x, bf16 1.15-1.36x, int8 1.05-1.45x, int4 with bf16 x 0.84-1.19x (noisy; two
// runs of 11 and 15 rounds disagreed on its sign); TinyLlama-1.1B shapes, all 154 linears of
// a decode step in order, fp32 12.5 -> 11.4 ms, bf16 9.0 -> 7.3 ms.
template <class F>
void parallel_block_rows(const BSRLinearArgs& a, F&& fn) {
  parallel_range(a.block_rows, a.threads, 1, [&](int64_t lo, int64_t hi, int slot) {
    for (int64_t rb = lo; rb < hi; ++rb) fn(rb, slot);
  });
}

// out[r, o] = sum + bias[o]: every decode kernel's last step for output row o of x row r.
inline void bsr_store(const BSRLinearArgs& a, int64_t r, int64_t o, float sum) {
  store_f32(a.out, r * a.ldo + o, sum + (a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f), a.dtype);
}

namespace detail {
void bsr_linear_portable(const BSRLinearArgs& a);
#if defined(__x86_64__)
// AVX2+FMA+F16C; AVX-512 machines run these too, except one row of bf16 x on AVX-512 BF16.
// Quantized blocks: batched here (the pack dequantizes); decode below.
void bsr_linear_decode_avx2(const BSRLinearArgs& a);
void bsr_linear_batched_avx2(const BSRLinearArgs& a);
// Quantized blocks (int8 / int4), any x dtype, AVX2+FMA+F16C (bsr_linear_quant_avx2.cpp): below
// AVX-512, and where the AVX-512 kernel does not apply; false where it does not apply (nothing
// written).
bool bsr_linear_decode_quant_avx2(const BSRLinearArgs& a);
// One row of bf16 x, blocks 32/64/96/128 wide, AVX-512 BF16 (bsr_linear_avx512.cpp); false where
// it does not apply (nothing written).
bool bsr_linear_decode_bf16_avx512(const BSRLinearArgs& a);
// Quantized blocks (int8 / int4), any x dtype, blocks up to 128 wide, AVX-512F/BW/VL/DQ
// (bsr_linear_quant_avx512.cpp); false where it does not apply (nothing written), and for one row
// outside the bf16 kernel below (the AVX2 kernel is faster there).
bool bsr_linear_decode_quant_avx512(const BSRLinearArgs& a);
// The same for bf16 x on AVX-512 BF16, blocks 32 / 64 / 96 / 128 wide with groups of whole
// 32-column chunks (bsr_linear_quant_bf16_avx512.cpp, vdpbf16ps); false where it does not apply.
bool bsr_linear_decode_quant_bf16_avx512(const BSRLinearArgs& a);
#endif

// The frame of the quantized decode kernels (bsr_linear_quant_*.cpp): `per` floats of scratch per
// thread (zeroed, each thread's at a 64-byte aligned base plus per * slot), block rows shared over
// the pool, and for each block row the x rows in fours, then the rest:
// rows(mine, rb, r0, n) with n = 4, or rows % 4 for the last call; mine is the thread's scratch.
template <class Rows>
void bsr_decode_rows_in_fours(const BSRLinearArgs& a, size_t per, Rows&& rows) {
  std::vector<float> store(per * a.threads + 16);
  float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(store.data()) + 63) & ~uintptr_t{63});
  parallel_block_rows(a, [&](int64_t rb, int slot) {
    float* mine = base + per * slot;
    int64_t r0 = 0;
    for (; r0 + 4 <= a.rows; r0 += 4) rows(mine, rb, r0, 4);
    if (a.rows > r0) rows(mine, rb, r0, static_cast<int>(a.rows - r0));
  });
}
}  // namespace detail

}  // namespace sparsekern
