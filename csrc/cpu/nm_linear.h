// N:M sparse linear on the CPU, torch-free: decode kernel (few rows of x, weights streamed once and
// expanded in registers) and row-tile decompression (for the batched path: dense GEMM on tiles).
//
// Format (sparsekern/formats/nm.py): values [out, K*n/m]; meta int32 [out, words], log2(m) bits
// per in-group index, 32/log2(m) indices per word, least significant first. Index bits are masked,
// so garbage meta never reads outside x (a garbage index selects a wrong, in-bounds column).
#pragma once

#include "cpu/linear_common.h"

namespace sparsekern {

// out[r, o] = sum_j values[o, j] * x[r, col(o, j)] + bias[o], fp32 accumulation, any rows
// (best for 1-8). OpenMP over output rows.
void nm_linear_decode(const NMLinearArgs& a, Isa isa);

// Dense rows [row0, row0 + nrows) of W into dense (row stride ld), in element type dense_t.
// OpenMP over rows.
void nm_decompress_rows(const NMLinearArgs& a, int64_t row0, int64_t nrows, void* dense, int64_t ld,
                        DType dense_t);

// Packed in-group indices j .. j+7 of one row as 8 fields of `bits` bits in one word, where index
// j is field r of word w (the straddling 3-bit case included). Words past the row read as zero.
inline uint32_t nm_meta_chunk8(const int32_t* meta_row, int64_t words, int64_t w, int r, int bits) {
  uint64_t lo = w < words ? static_cast<uint32_t>(meta_row[w]) : 0u;
  if (bits == 3) {
    uint64_t hi = w + 1 < words ? static_cast<uint32_t>(meta_row[w + 1]) : 0u;
    uint64_t both = (lo & 0x3fffffffu) | (hi << 30);  // 10 indices per word, 2 unused top bits
    return static_cast<uint32_t>(both >> (3 * r)) & 0xffffffu;
  }
  return static_cast<uint32_t>(lo >> (bits * r)) & (bits == 4 ? 0xffffffffu : (1u << (8 * bits)) - 1u);
}

// Walks one row's packed indices in order (no index straddles a word).
struct MetaReader {
  const int32_t* row;
  int64_t words, w = 0;
  int bits, per, left;
  uint32_t cur, mask;
  MetaReader(const int32_t* r, int64_t nwords, int b)
      : row(r), words(nwords), bits(b), per(32 / b), left(32 / b), mask((1u << b) - 1u) {
    cur = words > 0 ? static_cast<uint32_t>(row[0]) : 0u;
  }
  int next() {
    if (left == 0) {
      ++w;
      cur = w < words ? static_cast<uint32_t>(row[w]) : 0u;
      left = per;
    }
    int idx = static_cast<int>(cur & mask);
    cur >>= bits;
    --left;
    return idx;
  }
};

// Bits per packed in-group index for group size m.
inline int log2i(int m) { return m == 2 ? 1 : m == 4 ? 2 : m == 8 ? 3 : 4; }

// x rows as int8 per block of a.act_block columns: xq [rows, ldq] (zero past K), scales sx
// [rows, lds] (zero past the last block); max |x| / 127 per block, round to nearest even.
void nm_quantize_x_a8(const NMLinearArgs& a, int8_t* xq, int64_t ldq, float* sx, int64_t lds);
// The same, 16 lanes at a time where the CPU has what the AVX-512 int8 kernels need (act_block
// 32, AVX-512 VBMI + VNNI and the active ISA at least AVX-512); the same integers and scales.
void quantize_x_a8(const NMLinearArgs& a, int8_t* xq, int64_t ldq, float* sx, int64_t lds);
// Whether this CPU and the active ISA run the AVX-512 VBMI + VNNI int8 kernels.
bool has_avx512_vnni_vbmi();
// For kernels that scale a step's 16 dword lanes at once with the x block each lane reads: the
// block scales sx (blocks_per_step a step, steps after steps, rows after rows) spread to
// lanes[16 * i + l] = sx[blocks_per_step * i + block(l)], for each of the `steps` steps i.
template <class Block>
void spread_block_scales(const float* sx, int64_t steps, int blocks_per_step, Block block, float* lanes) {
  for (int64_t i = 0; i < steps; ++i)
    for (int l = 0; l < 16; ++l) lanes[16 * i + l] = sx[blocks_per_step * i + block(l)];
}

namespace detail {
void nm_linear_decode_portable(const NMLinearArgs& a);
// int8 activations (a.act_block > 0): any N:M, and AVX-512 VBMI+VNNI for 2:4 where supported.
void nm_linear_decode_a8_portable(const NMLinearArgs& a);
#if defined(__x86_64__)
// 2:4 with fp32 values (AVX-512F); 2:4, 1:4, 2:8, 4:8 (nm_avx512_pattern) with bf16 values and
// x, or int8 / int4 values with bf16 x, or fp32 x at one row (any rows at x_parts 2) (AVX-512
// BF16 and VBMI; group_kept a multiple of 16, or 8 without zero points), int8 activations in
// blocks of 32 included (nm_linear_avx512.cpp).
bool nm_avx512_pattern(int n, int m);
bool nm_avx512_supported(const NMLinearArgs& a);
// Rows of a 2:4 weight (bf16 values, or int8 / int4 with group_kept a multiple of 16) as bf16,
// on AVX-512 BF16 + VBMI; false (nothing written) where it does not apply.
bool nm_24_decompress_bf16_avx512(const NMLinearArgs& a, int64_t row0, int64_t nrows, void* dense, int64_t ld);
void nm_linear_decode_avx512(const NMLinearArgs& a);
bool nm_a8_avx512_supported(const NMLinearArgs& a);
void nm_linear_decode_a8_avx512(const NMLinearArgs& a);
// On AVX-512 BF16, any rows of x used as it is: 2:4, 1:4, 2:8 and 4:8 with bf16 or fp32 x; float
// values, or int8 / int4 with group_kept a multiple of 16 or one group per row. The GEMM without a
// dense W (nm_gemm_avx512.cpp). x rows holding NaN/Inf are not the dense op's there (pruned columns
// are skipped): the caller redoes them.
bool nm_gemm_avx512_supported(const NMLinearArgs& a);
void nm_gemm_avx512(const NMLinearArgs& a);
// The same on AVX2+FMA (nm_gemm_avx2.cpp): n of 1, 2 or 4 and m of 2, 4 or 8; fp32, bf16 or fp16
// x; float values, or int8 / int4 with group_kept a multiple of 8 or one group per row.
bool nm_gemm_avx2_supported(const NMLinearArgs& a);
void nm_gemm_avx2(const NMLinearArgs& a);
#endif
#if defined(__x86_64__)
// AVX2+FMA+F16C. Also what AVX-512 machines run for every float pattern but 2:4 fp32 / bf16
// (nm_linear_avx512.cpp).
void nm_linear_decode_avx2(const NMLinearArgs& a);
// M = 2, 4, 8 (nm_planes_supported): x operands blended from per-call planes of x; the avx2
// entry point above routes these patterns here and keeps the permute kernel for M = 16.
bool nm_planes_supported(int n, int m);
void nm_linear_decode_planes_avx2(const NMLinearArgs& a);
// 1:4, 2:4, 1:8, 2:8, 4:8 (nm_quads_supported): x operands picked with in-lane vpermilps from
// a per-call reordering of x (no blend tree for M = 4); tried before the planes kernel.
bool nm_quads_supported(int n, int m);
void nm_linear_decode_quads_avx2(const NMLinearArgs& a);
#endif
}  // namespace detail

}  // namespace sparsekern
