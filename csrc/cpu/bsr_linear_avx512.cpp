// Block-sparse decode for one row of bf16 x on AVX-512 BF16 CPUs, blocks of width 32, 64, 96 or
// 128: a block row's 32 columns and the x segment under them are one vdpbf16ps (16 lanes, two
// products each, fp32 sums), the x segment loaded once per block for all its rows. The AVX2
// kernel (bsr_linear_avx2.cpp) widens bf16 blocks to fp32 first: 8 values per FMA.
// NOTE: 2 threads, Zen 4, 1 row, block 32x32 at 90%, bf16, weights streamed from memory (>= 100
// MB in rotation), 5 interleaved rounds, AVX2 kernel -> this: 2048x2048 45 -> 33 us, 5632x2048
// 121 -> 98, 2048x5632 90 -> 78, 4096x4096 141 -> 120, 32000x2048 623 -> 517 (1.16-1.37x). Still
// 23-30 GB/s of blocks, below the 2:4 kernels' 45-58. Part of it was the split over threads
// (one block row per chunk; see parallel_block_rows): 33-44 GB/s on Zen 5 with runs.
#if defined(__x86_64__)
#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "cpu/bsr_linear.h"
#include "cpu/parallel.h"

namespace sparsekern::detail {
namespace {

#define SK_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

template <int NV>
SK_BF16 void block_row_bf16(const BSRLinearArgs& a, const uint16_t* x, int64_t rb, __m512* acc) {
  const int bm = a.bm, bk = 32 * NV;
  const int64_t kb = a.k / bk, bsz = static_cast<int64_t>(bm) * bk;
  const uint16_t* blocks = static_cast<const uint16_t*>(a.blocks);
  for (int i = 0; i < bm; ++i) acc[i] = _mm512_setzero_ps();
  int64_t begin, end;
  bsr_row_range(a, rb, &begin, &end);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t c = a.col[b];
    if (c < 0 || c >= kb) continue;
    __m512i xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = _mm512_loadu_si512(x + c * bk + 32 * v);
    const uint16_t* blk = blocks + b * bsz;
    for (int i = 0; i < bm; ++i) {
      const uint16_t* wr = blk + static_cast<int64_t>(i) * bk;
      __m512 s = acc[i];
      for (int v = 0; v < NV; ++v) s = _mm512_dpbf16_ps(s, (__m512bh)_mm512_loadu_si512(wr + 32 * v), (__m512bh)xv[v]);
      acc[i] = s;
    }
  }
  for (int i = 0; i < bm; ++i) bsr_store(a, 0, rb * bm + i, _mm512_reduce_add_ps(acc[i]));
}

template <int NV>
void run_bf16(const BSRLinearArgs& a) {
  // bm partial sums per thread, 64-byte aligned by hand (vector<__m512> is not).
  const size_t per = static_cast<size_t>(a.bm) * 16;
  std::vector<float> store(per * a.threads + 16);
  float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(store.data()) + 63) & ~uintptr_t{63});
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  parallel_block_rows(a, [&](int64_t rb, int slot) {
    block_row_bf16<NV>(a, x, rb, reinterpret_cast<__m512*>(base + per * slot));
  });
}

}  // namespace

bool bsr_linear_decode_bf16_avx512(const BSRLinearArgs& a) {
  if (a.rows != 1 || a.dtype != DType::kBF16) return false;
  switch (a.bk) {
    case 32: run_bf16<1>(a); return true;
    case 64: run_bf16<2>(a); return true;
    case 96: run_bf16<3>(a); return true;
    case 128: run_bf16<4>(a); return true;
    default: return false;
  }
}

}  // namespace sparsekern::detail
#endif
