// 2:4 decode kernels for AVX-512, fp32 sums; x rows up to 4 at a time share the values, the
// indices and the row of W; output rows are split over the threads.
//
// fp32 values: one meta word holds the 2-bit in-group indices of 16 kept values, which cover 32
// columns of x: a zmm of the 16 values, the word broadcast and shifted per lane (lane l: field l,
// plus the group's base column 4 * (l / 2)), one vpermt2ps picks their x operands out of the 32
// columns (two zmm of x as fp32), one FMA.
// bf16 values (AVX-512 BF16 + VBMI): 32 kept values a step (two meta words, 64 columns); a
// group's two kept values are one pair of vdpbf16ps, so the x operands are one vpermt2w of x as
// bf16, the index lanes cut from the meta qword by one vpmultishiftqb.
// fp16 values stay on the AVX2 quads kernel (16 fp16 values a step measured slower than it).
// int8 / int4 values with bf16 x (W8A16, W4A16): the bf16 scheme on the integers (below).
//
// Index fields are masked to 2 bits, so a garbage meta word picks a wrong column inside its own
// window, never outside x (x is copied into a zero-padded buffer of whole windows).
//
// NOTE (quantized, 11008x4096, 1 row, bf16 x, 2 threads, Zen 4, one process, interleaved; ms,
// quads kernel -> this one): int8 1.42 -> 0.80, int8 g128 1.60 -> 0.90, int4 g128 1.82 -> 0.64,
// int4 g32 2.40 -> 0.70 (the bf16 2:4 kernel: 1.35-1.6). Tried and dropped: int4 as bf16(128 + q)
// by an OR (no vpermw) and a second vdpbf16ps for the offset, 0.65 -> 0.77 ms; int8 widened by
// shifts and an fp32 magic number (no vpmovsxbd), 1 thread 1.75 -> 1.94 ms.
// NOTE: against the AVX2 quads kernel these replace on AVX-512 machines (2-core Zen 4, huge
// pages): TinyLlama-1.1B shapes 2:4 lean decode, interleaved rounds, median tokens/s 1.16x in bf16
// and in fp32 (fp16 with this file's fp32 scheme: 0.87x, so it stays on quads); 2:4 fp32
// 11008x4096, 1 row, 1 thread 5.8 -> 4.1 ms. Software prefetch 2 KB ahead on every step (as
// quads does) cost 30% here: 2 threads 3.56 vs 2.55 ms; once per page is what pays (below).
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/isa.h"
#include "cpu/linear_common.h"
#include "cpu/nm_linear.h"
#include "cpu/parallel.h"

namespace sparsekern::detail {
namespace {

#define SK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define SK_INLINE __attribute__((always_inline)) inline

// Once per 4 KiB of the values stream (each step reads 64 bytes), the first lines 2 KiB ahead:
// on 4 KiB pages the hardware prefetcher stops at every page boundary.
// NOTE: 2:4 fp32 11008x4096, 1 row, 2 threads, Zen 4, standalone (no torch), medians of 40 calls
// in alternation: 4 KiB pages 3.5-4.2 ms with it, 4.2-5.1 without, 4.4-5.7 with a prefetch every
// step (what the AVX2 kernels do); huge pages 3.0-3.7 with it, 2.8-3.8 without, 4.6-4.8 every step.
// StepBytes: bytes of the stream each step reads (one step in a page meets the condition).
template <int StepBytes = 64>
inline void prefetch_next_page(const void* p) {
  const char* ahead = static_cast<const char*>(p) + 2048;
  if ((reinterpret_cast<uintptr_t>(ahead) & 4095) < StepBytes) {
    for (int l = 0; l < 4; ++l) _mm_prefetch(ahead + 64 * l, _MM_HINT_T0);
  }
}

// Weights on 2 MiB pages (sparsekern.hugepages places each tensor at a 2 MiB boundary; so does
// torch's allocator under THP_MEM_ALLOC_ENABLE=1; any other allocation of this size starts
// elsewhere): the row kernels then prefetch every line 4 KiB ahead of the stream. A guess the
// other way costs speed only.
inline bool on_huge_pages(const void* p) { return (reinterpret_cast<uintptr_t>(p) & ((2u << 20) - 1)) == 0; }

// The prefetch for a stream read StepBytes (<= 256) a step (p: this step's bytes). Far (2 MiB
// pages): four lines 4 KiB ahead every 256 bytes; one core alone does not keep enough lines in
// flight to read at the memory's rate otherwise (past the tensor's end a prefetch is a hint that
// never faults). On 4 KiB pages each of those prefetches walks a page table, and
// prefetch_next_page (above) is what pays.
// NOTE: 2:4, 1 row, weights streamed (>= 400 MB in rotation), Zen 5, one process, 7-9
// interleaved rounds, median ratio prefetch_next_page -> far, 1 / 2 threads. 2 MiB pages, fp32:
// 11008x4096 1.11-1.13x / 1.05-1.10x (4 KiB ahead; 8 KiB 1.12x, 12 KiB 1.07x, 16 KiB 1.04x at 1
// thread), 2048x5632 1.25x / 1.22x, 5632x2048 1.07x / 1.03x, 2048x2048 1.07x / 1.01x; bf16:
// 11008x4096 1.10x / 1.05x, 2048x5632 1.01x / 1.02x, 5632x2048 1.09x / 1.03x, 2048x2048 1.13x
// / 1.06x; int8 / int4 values with bf16 x, 11008x4096: int8 1.16x / 1.12x, int8 g128 1.19x /
// 1.06x, int4 g128 1.19x / 1.14x. 4 KiB pages, fp32 11008x4096: 0.93x / 0.95x. Prefetching 2 KB
// ahead: no gain at 1 thread. Not measured on Zen 4.
template <bool Far, int StepBytes = 64>
SK_INLINE void prefetch_stream(const void* p) {
  if constexpr (Far) {
    const char* c = static_cast<const char*>(p);
    if ((reinterpret_cast<uintptr_t>(c) & 255) < StepBytes)
      for (int l = 0; l < 4; ++l) _mm_prefetch(c + 4096 + 64 * l, _MM_HINT_T0);
  } else {
    prefetch_next_page<StepBytes>(p);
  }
}

// acc[r] += v * (the 16 x operands of v's meta word in the 32 columns at x + r * ldf).
template <int R>
SK_AVX512 inline void step(__m512* acc, __m512 v, int32_t word, const float* x, int64_t ldf, __m512i shifts,
                           __m512i base, __m512i three) {
  const __m512i idx = _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(word), shifts), three), base);
  for (int r = 0; r < R; ++r) {
    const float* xr = x + r * ldf;
    acc[r] = _mm512_fmadd_ps(v, _mm512_permutex2var_ps(_mm512_loadu_ps(xr), idx, _mm512_loadu_ps(xr + 16)), acc[r]);
  }
}

// Row o's end for x rows r0 .. r0 + R - 1 (x0: row r0 of x): the last word's first values past
// the full steps, the bias, the stores.
template <int R>
SK_AVX512 SK_INLINE void last24(const NMLinearArgs& a, __m512* acc, int64_t o, int64_t r0, const float* x0,
                                int64_t ldf, __m512i shifts, __m512i base, __m512i three) {
  const int64_t kept = a.k / 2, full = kept / 16;
  if (const int64_t rest = kept - 16 * full; rest > 0) {
    const float* v = static_cast<const float*>(a.values) + o * kept;
    const __m512 last = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << rest) - 1), v + 16 * full);
    step<R>(acc, last, a.meta[o * a.meta_words + full], x0 + 32 * full, ldf, shifts, base, three);
  }
  const float b = a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f;
  for (int r = 0; r < R; ++r) store_f32(a.out, (r0 + r) * a.ldo + o, _mm512_reduce_add_ps(acc[r]) + b, a.dtype);
}

// Steps [s0, s1) through one(sums, w), which adds step w into sums (one per x row). R == 1: whole
// groups of four steps go into four sums, added into acc[0] at the end, the steps left into acc[0]
// itself. With one sum a step waits for the previous step's FMA (or dot product), and one row of
// x gives no other chain.
// NOTE: 2 threads, Zen 4, 1 row, weights streamed from memory (>= 400 MB in rotation), 5
// interleaved rounds, one sum -> four: fp32 2048x2048 181 -> 172 us, 5632x2048 454 -> 418,
// 2048x5632 708 -> 535, 11008x4096 1870 -> 1682; bf16 5632x2048 340 -> 270, 2048x5632 297 -> 270,
// 11008x4096 1063 -> 903; 256x2048 the same in both. HF generate, TinyLlama shapes 2:4 fp32,
// 4 interleaved rounds: 13.37 -> 14.26 tok/s.
template <int R, class One>
SK_AVX512 SK_INLINE void walk_steps(__m512* acc, int64_t s0, int64_t s1, One one) {
  int64_t w = s0;
  if constexpr (R == 1) {
    __m512 sums[4];
    for (int i = 0; i < 4; ++i) sums[i] = _mm512_setzero_ps();
    for (; w + 4 <= s1; w += 4)
      for (int i = 0; i < 4; ++i) one(&sums[i], w + i);
    acc[0] = _mm512_add_ps(acc[0], _mm512_add_ps(_mm512_add_ps(sums[0], sums[1]), _mm512_add_ps(sums[2], sums[3])));
  }
  for (; w < s1; ++w) one(acc, w);
}

// Steps [s0, s1) of row o into acc, for x rows from x0 (row r0 of x); Far: see prefetch_stream.
template <int R, bool Far = false>
SK_AVX512 SK_INLINE void steps24(const NMLinearArgs& a, __m512* acc, int64_t o, const float* x0, int64_t ldf,
                                 int64_t s0, int64_t s1, __m512i shifts, __m512i base, __m512i three) {
  const float* v = static_cast<const float*>(a.values) + o * (a.k / 2);
  const int32_t* mrow = a.meta + o * a.meta_words;
  walk_steps<R>(acc, s0, s1, [&](__m512* sums, int64_t w) SK_AVX512 {
    prefetch_stream<Far>(v + 16 * w);
    step<R>(sums, _mm512_loadu_ps(v + 16 * w), mrow[w], x0 + 32 * w, ldf, shifts, base, three);
  });
}

// Output row o for x rows r0 .. r0 + R - 1 (xf: fp32, row stride ldf, zero past K).
template <int R, bool Far>
SK_AVX512 void rows24(const NMLinearArgs& a, const float* xf, int64_t ldf, int64_t r0, int64_t o) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  steps24<R, Far>(a, acc, o, xf + r0 * ldf, ldf, 0, a.k / 32, shifts, base, three);
  last24<R>(a, acc, o, r0, xf + r0 * ldf, ldf, shifts, base, three);
}

// Output rows o0 .. o1 - 1 (at most kBlockRows) for x rows r0 .. r0 + R - 1, R >= 2, the columns in
// chunks: all the block's rows take one chunk of x before the next, so the R rows' chunk stays in
// L1 (rows24 walks each output row over all of K, and R rows of x past 32 KB came from L2 on
// every step).
// NOTE: 2:4, 2 threads, Zen 4, one process, dense F.linear / rows24 / this in a random order each
// of 10 rounds, x dense (an order fixed as dense, rows24, this favoured this one: right after a
// torch GEMM, whose OpenMP threads still spin, our pool's helper is often preempted): fp32, 8
// rows: 5632x2048 1.76 -> 2.72, 2048x5632 1.11 -> 1.30, 4096x4096 1.64 -> 1.78, 11008x4096 2.70
// -> 3.12; 4 rows 2.52 -> 2.35, 2.28 -> 1.93, 2.86 -> 3.45, 4.28 -> 5.26. bf16 (block24_bf16),
// 8 rows: 2048x5632 0.68 -> 0.92, 4096x4096 0.77 -> 0.78, 11008x4096 0.96 -> 1.19; 4 rows 0.84 ->
// 1.07, 1.35 -> 0.91, 1.27 -> 1.61. Identical code measured up to 38% apart in those runs.
// Where R rows of x fit in 16 KB (2 fp32 rows at K = 2048) rows24 stays: this one measured 2.2x
// slower there (the row-after-row weight stream, which the hardware prefetcher follows, is cut
// into 2 KB pieces of 8 streams). A software prefetch a chunk ahead on every step: 1.2-2x slower.
// One row of x (decode at batch 1) always takes the row kernels, whatever K: its x is read once a
// step and stays in L1/L2, and the unbroken weight stream wins. NOTE: 2 threads, Zen 4, 1 row,
// weights streamed from memory (>= 400 MB in rotation), 5 interleaved rounds, block -> row
// kernel: fp32 2048x5632 917 -> 644 us (TinyLlama's down_proj), 4096x11008 3434 -> 2902, 256x5632
// 122 -> 91; bf16 4096x11008 1937 -> 1314, 4096x14336 2413 -> 1794 (K <= 4096 fp32 / 8192 bf16
// took the row kernel already).
constexpr int64_t kBlockRows = 8, kChunkSteps = 32;  // 32 steps: 1024 columns, 4 KB of x per row
constexpr int64_t kBlockOverBytes = 16 << 10;

// Output rows o0 .. o1 - 1 (at most kBlockRows) over chunks of kChunkSteps steps: run(o, acc,
// s0, s1) adds steps [s0, s1) of row o to its R sums, finish(o, acc) completes row o.
template <int R, class Run, class Finish>
SK_AVX512 SK_INLINE void over_chunks(int64_t o0, int64_t o1, int64_t full, Run run, Finish finish) {
  __m512 sums[kBlockRows][R];
  for (int64_t i = 0; i < o1 - o0; ++i)
    for (int r = 0; r < R; ++r) sums[i][r] = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < full; c0 += kChunkSteps) {
    const int64_t c1 = std::min(full, c0 + kChunkSteps);
    for (int64_t o = o0; o < o1; ++o) {
      __m512 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = sums[o - o0][r];
      run(o, acc, c0, c1);
      for (int r = 0; r < R; ++r) sums[o - o0][r] = acc[r];
    }
  }
  for (int64_t o = o0; o < o1; ++o) finish(o, sums[o - o0]);
}

template <int R>
SK_AVX512 void block24(const NMLinearArgs& a, const float* xf, int64_t ldf, int64_t r0, int64_t o0, int64_t o1) {
  const int64_t kept = a.k / 2, full = kept / 16;
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  const float* x0 = xf + r0 * ldf;
  auto run = [&](int64_t o, __m512* acc, int64_t s0, int64_t s1) SK_AVX512 {
    steps24<R>(a, acc, o, x0, ldf, s0, s1, shifts, base, three);
  };
  auto finish = [&](int64_t o, __m512* acc) SK_AVX512 { last24<R>(a, acc, o, r0, x0, ldf, shifts, base, three); };
  over_chunks<R>(o0, o1, full, run, finish);
}

#define SK_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16")))

// bf16 values and x: 32 kept values (16 groups, 64 columns of x, two meta words) a step. A group's
// two kept values are one pair of vdpbf16ps, so the step is one vpermt2w of x (bf16, two zmm)
// and one vdpbf16ps: lane j of the index is field j of the two words (vpmultishiftqb) plus
// 4 * (j / 2), the group's base column.
struct Bf16Tables {
  alignas(64) uint8_t ctrl[64];  // byte 2j: bit offset 2 * (j % 32) of field j in the meta qword
  alignas(64) uint16_t base[32];
  Bf16Tables() : ctrl(), base() {
    for (int j = 0; j < 32; ++j) {
      ctrl[2 * j] = static_cast<uint8_t>(2 * j);
      base[j] = static_cast<uint16_t>(4 * (j / 2));
    }
  }
};
const Bf16Tables kBf16;

// acc[r] += the pairs of w (16 groups) . their x operands in the 64 columns at x + r * ldb;
// m: the step's two meta words in every qword.
template <int R>
SK_BF16 inline void step_bf16(__m512* acc, __m512i w, __m512i m, const uint16_t* x, int64_t ldb, __m512i ctrl,
                              __m512i base, __m512i three) {
  const __m512i idx = _mm512_add_epi16(_mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, m), three), base);
  for (int r = 0; r < R; ++r) {
    const uint16_t* xr = x + r * ldb;
    const __m512i xs = _mm512_permutex2var_epi16(_mm512_loadu_si512(xr), idx, _mm512_loadu_si512(xr + 32));
    acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)w, (__m512bh)xs);
  }
}

// Row o's end for x rows r0 .. r0 + R - 1 (x0: row r0 of x): the first values of one more step
// past the full ones, the bias, the stores.
template <int R>
SK_BF16 SK_INLINE void last24_bf16(const NMLinearArgs& a, __m512* acc, int64_t o, int64_t r0, const uint16_t* x0,
                                   int64_t ldb, __m512i ctrl, __m512i base, __m512i three) {
  const int64_t kept = a.k / 2, full = kept / 32;
  if (const int64_t rest = kept - 32 * full; rest > 0) {
    const uint16_t* v = static_cast<const uint16_t*>(a.values) + o * kept;
    const int32_t* mrow = a.meta + o * a.meta_words;
    const int64_t words = std::min<int64_t>(2, a.meta_words - 2 * full);
    const __m128i m = _mm_maskz_loadu_epi32(static_cast<__mmask8>((1u << words) - 1), mrow + 2 * full);
    const __m512i w = _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t{1} << rest) - 1), v + 32 * full);
    step_bf16<R>(acc, w, _mm512_broadcastq_epi64(m), x0 + 64 * full, ldb, ctrl, base, three);
  }
  const float b = a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f;
  for (int r = 0; r < R; ++r) store_f32(a.out, (r0 + r) * a.ldo + o, _mm512_reduce_add_ps(acc[r]) + b, a.dtype);
}

// Steps [s0, s1) of row o into acc, for x rows from x0 (row r0 of x).
template <int R, bool Far = false>
SK_BF16 SK_INLINE void steps24_bf16(const NMLinearArgs& a, __m512* acc, int64_t o, const uint16_t* x0, int64_t ldb,
                                    int64_t s0, int64_t s1, __m512i ctrl, __m512i base, __m512i three) {
  const uint16_t* v = static_cast<const uint16_t*>(a.values) + o * (a.k / 2);
  const int32_t* mrow = a.meta + o * a.meta_words;
  walk_steps<R>(acc, s0, s1, [&](__m512* sums, int64_t s) SK_BF16 {
    int64_t q;
    std::memcpy(&q, mrow + 2 * s, sizeof q);
    prefetch_stream<Far>(v + 32 * s);
    step_bf16<R>(sums, _mm512_loadu_si512(v + 32 * s), _mm512_set1_epi64(q), x0 + 64 * s, ldb, ctrl, base, three);
  });
}

template <int R, bool Far>
SK_BF16 void rows24_bf16(const NMLinearArgs& a, const uint16_t* xb, int64_t ldb, int64_t r0, int64_t o) {
  const __m512i ctrl = _mm512_load_si512(kBf16.ctrl), base = _mm512_load_si512(kBf16.base);
  const __m512i three = _mm512_set1_epi16(3);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const uint16_t* x0 = xb + r0 * ldb;
  steps24_bf16<R, Far>(a, acc, o, x0, ldb, 0, a.k / 64, ctrl, base, three);
  last24_bf16<R>(a, acc, o, r0, x0, ldb, ctrl, base, three);
}

// rows24_bf16 for output rows o0 .. o1 - 1 and x rows r0 .. r0 + R - 1 in column chunks, as
// block24 does for fp32 (32 steps: 2048 columns, 4 KB of x per row).
template <int R>
SK_BF16 void block24_bf16(const NMLinearArgs& a, const uint16_t* xb, int64_t ldb, int64_t r0, int64_t o0, int64_t o1) {
  const int64_t kept = a.k / 2, full = kept / 32;
  const __m512i ctrl = _mm512_load_si512(kBf16.ctrl), base = _mm512_load_si512(kBf16.base);
  const __m512i three = _mm512_set1_epi16(3);
  const uint16_t* x0 = xb + r0 * ldb;
  auto run = [&](int64_t o, __m512* acc, int64_t s0, int64_t s1) SK_BF16 {
    steps24_bf16<R>(a, acc, o, x0, ldb, s0, s1, ctrl, base, three);
  };
  auto finish = [&](int64_t o, __m512* acc) SK_BF16 { last24_bf16<R>(a, acc, o, r0, x0, ldb, ctrl, base, three); };
  over_chunks<R>(o0, o1, full, run, finish);
}

// Quantized values (int8, or int4 two per byte) with bf16 x: the bf16 scheme above on the
// integers. q - zero is widened to bf16, exactly (|q - zero| <= 255 fits bf16's 8 significant
// bits), the step's products are summed by vdpbf16ps and the sums scaled per group:
// - int8: 16 + 16 bytes sign-extended to fp32 (zero subtracted there), packed by one
//   vcvtne2ps2bf16; lanes in slot order, so the index tables are the bf16 kernel's.
// - int4: the step's 16 bytes broadcast to the four 128-bit lanes; one vpsrlvw by 4 * lane puts
//   nibble sigma(i) in the low bits of word i, and one vpermw looks up bf16(q - zero) in a
//   32-word table (16 entries, twice: vpermw reads index bit 4, the next nibble's bit 0). Word
//   i = 8 * lane + j holds bytes 2j, 2j + 1, nibbles 4j .. 4j + 3, so it takes slot
//   sigma(i) = 4 * (i % 8) + i / 8, and the x index tables follow sigma.
// Scale groups: group_kept a multiple of 32 (or one group per row): whole steps per group, the
// sums gathered per group and scaled when it ends. A multiple of 16 only (H): each 16-slot half
// of a step lies in one group, and every step's sums are scaled at once, half by half (a lane
// mask: which dword lanes of vdpbf16ps hold half 1).
struct QTables {
  alignas(64) uint16_t shift[32];  // int4: 4 * (i / 8), the shift that brings nibble sigma(i) to bit 0
  alignas(64) uint8_t ctrl[64];   // int4: byte 2i: bit offset 2 * sigma(i) of its meta field
  alignas(64) uint16_t base[32];  // int4: 4 * (sigma(i) / 2), its group's base column
  alignas(64) uint16_t half[32];  // int4: 32 where word i lies in half 1 (vpermt2w's table bit)
  alignas(64) float iota[16];
  QTables() : shift(), ctrl(), base(), half(), iota() {
    for (int i = 0; i < 32; ++i) {
      const int slot = 4 * (i % 8) + i / 8;
      shift[i] = static_cast<uint16_t>(4 * (i / 8));
      ctrl[2 * i] = static_cast<uint8_t>(2 * slot);
      base[i] = static_cast<uint16_t>(4 * (slot / 2));
      half[i] = slot >= 16 ? 32 : 0;
    }
    for (int i = 0; i < 16; ++i) iota[i] = static_cast<float>(i);
  }
};
const QTables kQ;

// bf16(q - zero) for nibbles q = 0..15, twice over; zeros 0..15 (what validation admits) from
// a table. NOTE: computing every group's table cost 2:4 int4 g128 zp 26% (0.83 vs 0.66 ms).
struct Int4Tables {
  alignas(64) uint16_t t[16][32];
  Int4Tables() : t() {
    for (int z = 0; z < 16; ++z)
      for (int i = 0; i < 32; ++i) {
        const float f = static_cast<float>(i % 16 - z);
        uint32_t u;
        std::memcpy(&u, &f, sizeof u);
        t[z][i] = static_cast<uint16_t>(u >> 16);  // exact: small integers
      }
  }
};
const Int4Tables kInt4;

SK_BF16 inline __m512i int4_table(int zero) {
  if (static_cast<unsigned>(zero) < 16) return _mm512_load_si512(kInt4.t[zero]);
  const __m512 f = _mm512_sub_ps(_mm512_load_ps(kQ.iota), _mm512_set1_ps(static_cast<float>(zero)));
  return (__m512i)_mm512_cvtne2ps_pbh(f, f);
}

// One row's walk over its scale groups (!H: g the group of the current step, end the first slot
// past it), and the current groups' scales (by lane), int8 zeros (by half), int4 lookup tables
// (by half). Every helper is inlined, so all of it lives in registers.
// NOTE: written first with lambdas capturing by reference, GCC kept the sums on the stack:
// int4 g128 11008x4096 2.1 ms, against 1.2 ms for the bf16 kernel it should beat.
struct QGroups {
  const uint16_t* scales;  // the row's, bf16
  const int8_t* zeros;     // the row's, or nullptr
  int64_t last, gk, g = 0, end = 0;
  __m512 scale, zlo, zhi;
  __m512i table_lo, table_hi;
};

template <int Q>
constexpr __mmask16 kHalf1 = Q == 8 ? 0xFF00 : 0xCCCC;  // dword lanes of vdpbf16ps that hold half 1

template <int Q, bool H, bool Z>
SK_BF16 SK_INLINE void set_groups(QGroups& st, int64_t g0, int64_t g1) {
  g0 = std::min(g0, st.last);  // (a tail half past the row keeps the last group)
  g1 = std::min(g1, st.last);
  st.scale = _mm512_mask_blend_ps(kHalf1<Q>, _mm512_set1_ps(bf16_to_f32(st.scales[g0])),
                                  _mm512_set1_ps(bf16_to_f32(st.scales[g1])));
  if constexpr (Z && Q == 8) {
    st.zlo = _mm512_set1_ps(static_cast<float>(st.zeros[g0]));
    st.zhi = _mm512_set1_ps(static_cast<float>(st.zeros[g1]));
  } else if constexpr (Z) {
    st.table_lo = int4_table(st.zeros[g0]);
    st.table_hi = H ? int4_table(st.zeros[g1]) : st.table_lo;
  }
}

// H: the groups of step s's halves. Group size 32 columns (16 slots, the common case), no zeros
// and a whole step: groups 2s and 2s + 1, their two bf16 scales one 32-bit broadcast, each half's
// moved to the top by a shift or a mask. Else a division (other sizes: rare).
// NOTE: 2:4 int4 g32, 11008x4096, 1 row, 2 threads, Zen 4: 0.83 -> 0.70 ms (was two scalar
// loads and broadcasts per step).
template <int Q, bool Z>
SK_BF16 SK_INLINE void half_groups(QGroups& st, int64_t s, bool whole) {
  if (!Z && st.gk == 16 && whole) {
    int32_t two;  // the two bf16 scales (memcpy: no aliasing or alignment assumption)
    std::memcpy(&two, st.scales + 2 * s, sizeof two);
    const __m512i pair = _mm512_set1_epi32(two);
    const __m512i top = _mm512_and_si512(pair, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
    st.scale = _mm512_castsi512_ps(_mm512_mask_slli_epi32(top, static_cast<__mmask16>(~kHalf1<Q>), pair, 16));
  } else {
    set_groups<Q, true, Z>(st, 32 * s / st.gk, (32 * s + 16) / st.gk);
  }
}

// The step's 32 weights as bf16 from its value bytes p.
template <int Q, bool H, bool Z>
SK_BF16 SK_INLINE __m512i widen(const uint8_t* p, const QGroups& st, __m512i nib) {
  if constexpr (Q == 8) {
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
    if constexpr (Z) {
      lo = _mm512_sub_ps(lo, st.zlo);
      hi = _mm512_sub_ps(hi, st.zhi);
    }
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  } else {
    const __m512i q =
        _mm512_srlv_epi16(_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), nib);
    if constexpr (Z && H) {  // half 1 reads the second table: index bit 5, bit 4 cleared
      const __m512i idx = _mm512_ternarylogic_epi32(q, _mm512_set1_epi16(15), _mm512_load_si512(kQ.half), 0xEA);
      return _mm512_permutex2var_epi16(st.table_lo, idx, st.table_hi);
    } else {
      return _mm512_permutexvar_epi16(q, st.table_lo);
    }
  }
}

// Step s of x rows x .. x + (R - 1) * ldb: sums into chain C (s % 2; two chains, or one chain of
// vdpbf16ps waits for its latency), then (!H) the group bookkeeping.
template <int Q, bool H, bool Z, int R, int C>
SK_BF16 SK_INLINE void q_step(__m512 (&acc)[2][R], __m512 (&part)[2][R], QGroups& st, __m512i w, __m512i m,
                              const uint16_t* x, int64_t ldb, int64_t s, int64_t kept, __m512i ctrl,
                              __m512i base) {
  // (field & 3) | base: base has its low two bits clear
  const __m512i idx = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(ctrl, m), _mm512_set1_epi16(3), base, 0xEA);
  for (int r = 0; r < R; ++r) {
    const uint16_t* xr = x + r * ldb + 64 * s;
    const __m512i xs = _mm512_permutex2var_epi16(_mm512_loadu_si512(xr), idx, _mm512_loadu_si512(xr + 32));
    if constexpr (H) {
      acc[C][r] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w, (__m512bh)xs), st.scale, acc[C][r]);
    } else {
      part[C][r] = _mm512_dpbf16_ps(part[C][r], (__m512bh)w, (__m512bh)xs);
    }
  }
  if constexpr (!H) {
    if (32 * (s + 1) >= st.end && 32 * (s + 1) < kept) {  // the group ends: scale its sums
      for (int r = 0; r < R; ++r) {
        acc[0][r] = _mm512_fmadd_ps(_mm512_add_ps(part[0][r], part[1][r]), st.scale, acc[0][r]);
        part[0][r] = part[1][r] = _mm512_setzero_ps();
      }
      st.end += st.gk;
      ++st.g;
      set_groups<Q, H, Z>(st, st.g, st.g);
    }
  }
}

// Output row o for x rows r0 .. r0 + R - 1. Q: 8 or 4 bits; H: halves of a step may lie in
// different groups; Z: zero points stored (else 0 for int8, 8 for int4).
template <int Q, bool H, bool Z, int R, bool Far>
SK_BF16 void rows24_q(const NMLinearArgs& a, const uint16_t* xb, int64_t ldb, int64_t r0, int64_t o) {
  constexpr int B = Q == 8 ? 32 : 16;  // value bytes per step of 32 slots
  const int64_t kept = a.k / 2, full = kept / 32;
  const uint8_t* v = static_cast<const uint8_t*>(a.values) + o * (kept * Q / 8);
  const int32_t* mrow = a.meta + o * a.meta_words;
  const __m512i ctrl = _mm512_load_si512(Q == 8 ? kBf16.ctrl : kQ.ctrl);
  const __m512i base = _mm512_load_si512(Q == 8 ? kBf16.base : kQ.base);
  const __m512i nib = _mm512_load_si512(kQ.shift);
  QGroups st;
  st.scales = static_cast<const uint16_t*>(a.scales) + o * a.groups;
  st.zeros = a.zeros ? a.zeros + o * a.groups : nullptr;
  st.last = a.groups - 1;
  st.gk = a.groups == 1 ? INT64_MAX : a.group_kept;
  st.end = st.gk;
  st.scale = st.zlo = st.zhi = _mm512_setzero_ps();
  st.table_lo = st.table_hi = int4_table(8);
  if constexpr (!H) set_groups<Q, H, Z>(st, 0, 0);
  __m512 acc[2][R], part[2][R];
  for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = part[0][r] = part[1][r] = _mm512_setzero_ps();
  const uint16_t* x0 = xb + r0 * ldb;
  int64_t s = 0;
  // The step's two meta words in every qword (a broadcast from memory, not through a GPR).
  auto meta = [mrow](int64_t s) SK_BF16 {
    return _mm512_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mrow + 2 * s)));
  };
  for (; s + 2 <= full; s += 2) {
    if constexpr (H) half_groups<Q, Z>(st, s, true);
    prefetch_stream<Far, B>(v + B * s);
    q_step<Q, H, Z, R, 0>(acc, part, st, widen<Q, H, Z>(v + B * s, st, nib), meta(s), x0, ldb, s, kept, ctrl, base);
    if constexpr (H) half_groups<Q, Z>(st, s + 1, true);
    prefetch_stream<Far, B>(v + B * (s + 1));
    q_step<Q, H, Z, R, 1>(acc, part, st, widen<Q, H, Z>(v + B * (s + 1), st, nib), meta(s + 1), x0, ldb, s + 1, kept,
                          ctrl, base);
  }
  if (s < full) {
    if constexpr (H) half_groups<Q, Z>(st, s, true);
    q_step<Q, H, Z, R, 0>(acc, part, st, widen<Q, H, Z>(v + B * s, st, nib), meta(s), x0, ldb, s, kept, ctrl, base);
  }
  if (const int64_t rest = kept - 32 * full; rest > 0) {  // the first `rest` slots of one more step
    const int64_t words = std::min<int64_t>(2, a.meta_words - 2 * full);
    const __m128i m = _mm_maskz_loadu_epi32(static_cast<__mmask8>((1u << words) - 1), mrow + 2 * full);
    alignas(32) uint8_t tail[32] = {};  // zero bytes past the row: zero weights, or weights on x's zero padding
    std::memcpy(tail, v + B * full, rest * Q / 8);
    if constexpr (H) half_groups<Q, Z>(st, full, false);
    q_step<Q, H, Z, R, 1>(acc, part, st, widen<Q, H, Z>(tail, st, nib), _mm512_broadcastq_epi64(m), x0, ldb, full,
                          kept, ctrl, base);
  }
  const float b = a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f;
  for (int r = 0; r < R; ++r) {
    __m512 sum = _mm512_add_ps(acc[0][r], acc[1][r]);
    if constexpr (!H) sum = _mm512_fmadd_ps(_mm512_add_ps(part[0][r], part[1][r]), st.scale, sum);
    store_f32(a.out, (r0 + r) * a.ldo + o, _mm512_reduce_add_ps(sum) + b, a.dtype);
  }
}

// f(o, r0, rows) for every output row o of the thread's range and x rows 4 at a time.
template <class F>
void each_row(const NMLinearArgs& a, F f) {
  parallel_range(a.out_features, a.threads, 16, [&](int64_t lo, int64_t hi, int) {
    for (int64_t o = lo; o < hi; ++o) {
      int64_t r0 = 0;
      for (; r0 + 4 <= a.rows; r0 += 4) f(o, r0, std::integral_constant<int, 4>());
      switch (a.rows - r0) {
        case 3: f(o, r0, std::integral_constant<int, 3>()); break;
        case 2: f(o, r0, std::integral_constant<int, 2>()); break;
        case 1: f(o, r0, std::integral_constant<int, 1>()); break;
        default: break;
      }
    }
  });
}

// Values shorter than this take the Far prefetch on any pages: a short stream ends before the
// hardware prefetcher has ramped up, and its few page walks cost little.
// NOTE: 2:4, 1 row, 4 KiB pages, weights streamed (>= 400 copies or 512 MB in rotation), Zen 5,
// one process, 9 interleaved rounds, median ratio near -> far, 2 / 1 threads. bf16: 576x576
// (0.37 MB) 1.15x / 1.13x, 960x576 1.18x / 1.07x, 576x1536 1.06x / 1.05x, 3072x576 (2.0 MB) 1.13x /
// 1.15x, 2048x2048 (4.7 MB) 1.00x / 1.05x, 11008x4096 1.02x / 1.06x; fp32: 576x576 1.19x / 1.11x,
// 3072x576 (3.8 MB) 1.18x / 1.15x, 2048x2048 (8.9 MB) 1.01x / 1.03x, 5632x2048 (24.5 MB) 1.03x /
// 0.96x, 11008x4096 (96 MB) 0.97x / 1.05x; int8 (per row) and int4 (g64) values, bf16 x, 2
// threads, 576x576 to 2048x2048 (0.13-2.6 MB): 1.06-1.18x (int4 576x576: 1.00x), int4 at 1 thread
// 1.02-1.05x. SmolLM2-135M 2:4 bf16 lean decode (every linear under 2 MiB): 146-162 -> 167-183
// tok/s (separate processes, alternating).
constexpr int64_t kFarShortBytes = int64_t{4} << 20;

int64_t values_bytes(const NMLinearArgs& a) {
  const int64_t kept = a.k / a.m * a.n;
  return a.out_features * kept * (a.qbits ? a.qbits : 8 * dtype_size(a.dtype)) / 8;
}

// each_row with f(o, r0, rows, far): far a std::bool_constant, true where the values lie on
// 2 MiB pages (on_huge_pages) or are short (kFarShortBytes), for the row kernels' Far prefetch.
template <class F>
void each_row_far(const NMLinearArgs& a, F f) {
  if (on_huge_pages(a.values) || values_bytes(a) < kFarShortBytes) {
    return each_row(a, [&](int64_t o, int64_t r0, auto rows) { f(o, r0, rows, std::true_type()); });
  }
  each_row(a, [&](int64_t o, int64_t r0, auto rows) { f(o, r0, rows, std::false_type()); });
}

template <int Q, bool H, bool Z>
void quantized24_as(const NMLinearArgs& a, const uint16_t* xb, int64_t ldb) {
  each_row_far(a, [&](int64_t o, int64_t r0, auto rows, auto far) {
    rows24_q<Q, H, Z, decltype(rows)::value, decltype(far)::value>(a, xb, ldb, r0, o);
  });
}

template <int Q>
void quantized24_q(const NMLinearArgs& a, const uint16_t* xb, int64_t ldb) {
  const bool h = a.groups > 1 && a.group_kept % 32 != 0;
  if (a.zeros) return h ? quantized24_as<Q, true, true>(a, xb, ldb) : quantized24_as<Q, false, true>(a, xb, ldb);
  return h ? quantized24_as<Q, true, false>(a, xb, ldb) : quantized24_as<Q, false, false>(a, xb, ldb);
}

void quantized24(const NMLinearArgs& a, const uint16_t* xb, int64_t ldb) {
  return a.qbits == 8 ? quantized24_q<8>(a, xb, ldb) : quantized24_q<4>(a, xb, ldb);
}

// f(o0, o1, r0, rows) for blocks [o0, o1) of at most kBlockRows output rows of the thread's
// range and x rows 4 at a time.
template <class F>
void each_block(const NMLinearArgs& a, F f) {
  parallel_range(a.out_features, a.threads, 16, [&](int64_t lo, int64_t hi, int) {
    for (int64_t o0 = lo; o0 < hi; o0 += kBlockRows) {
      const int64_t o1 = std::min(hi, o0 + kBlockRows);
      int64_t r0 = 0;
      for (; r0 + 4 <= a.rows; r0 += 4) f(o0, o1, r0, std::integral_constant<int, 4>());
      switch (a.rows - r0) {
        case 3: f(o0, o1, r0, std::integral_constant<int, 3>()); break;
        case 2: f(o0, o1, r0, std::integral_constant<int, 2>()); break;
        case 1: f(o0, o1, r0, std::integral_constant<int, 1>()); break;
        default: break;
      }
    }
  });
}

bool bf16_kernel_here() { return active_isa() >= Isa::kAvx512Bf16 && has_avx512_vnni_vbmi(); }

// Decompression to bf16 rows (the batched path's W tiles): 32 kept slots (16 groups, 64 columns)
// at a time. The slots as bf16 words in slot order; for output word c of a 32-column half h,
// group g = 16h/2 + c/4 and column t = c % 4 within it: one vpmultishiftqb brings the group's two
// index fields (bits 4g .. 4g + 3 of the meta qword) to the low bits of the word, two compares
// with t give the words that take slot 2g and slot 2g + 1, and two masked vpermw place them
// (every other word zero).
// NOTE: 512 x 4096 -> 11008, bf16 x, 2 threads, Zen 4, interleaved with dense F.linear: 2:4 bf16
// 1.31x -> 1.11x the dense layer's time (scalar scatter before; 1024-row tiles 0.3-0.9 ms each
// now, the tile GEMMs ~10 ms each); 128 rows 1.27x, 65 rows 1.35x (the decompression is per call).
struct ExpandTables {
  alignas(64) uint8_t ctrl[2][64];    // half h, byte 2c: bit offset 4g of the group's two fields
  alignas(64) uint16_t t[32];         // c % 4
  alignas(64) uint16_t slot0[2][32];  // 2g - 16h: the group's first slot in the half's 16
  ExpandTables() : ctrl(), t(), slot0() {
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < 32; ++c) {
        const int g = 8 * h + c / 4;
        ctrl[h][2 * c] = static_cast<uint8_t>(4 * g);
        slot0[h][c] = static_cast<uint16_t>(2 * g);
        t[c] = static_cast<uint16_t>(c % 4);
      }
  }
};
const ExpandTables kExpand;

// 64 columns from the 32 slot words w (slot order) and the chunk's meta qword m (broadcast).
SK_BF16 SK_INLINE void expand64(__m512i w, __m512i m, uint16_t* out) {
  const __m512i three = _mm512_set1_epi16(3), t = _mm512_load_si512(kExpand.t), one = _mm512_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    const __m512i f = _mm512_multishift_epi64_epi8(_mm512_load_si512(kExpand.ctrl[h]), m);
    const __mmask32 first = _mm512_cmpeq_epi16_mask(_mm512_and_si512(f, three), t);
    const __mmask32 second = _mm512_cmpeq_epi16_mask(_mm512_and_si512(_mm512_srli_epi16(f, 2), three), t);
    const __m512i s0 = _mm512_load_si512(kExpand.slot0[h]);
    __m512i o = _mm512_maskz_permutexvar_epi16(first, s0, w);
    o = _mm512_mask_permutexvar_epi16(o, second, _mm512_add_epi16(s0, one), w);
    _mm512_storeu_si512(out + 32 * h, o);
  }
}

// The chunk's 32 kept weights as bf16, slot order: bf16 values as stored; int8 / int4 as
// (q - zero) * scale in fp32 rounded once (what the scalar path stores), lo = slots 0..15 in
// group g0, hi = 16..31 in g1.
template <int Q>
SK_BF16 SK_INLINE __m512i chunk_bf16(const NMLinearArgs& a, int64_t o, const void* values, int64_t c, int64_t g0,
                                    int64_t g1) {
  if constexpr (Q == 0) {
    return _mm512_loadu_si512(static_cast<const uint16_t*>(values) + 32 * c);
  } else {
    __m512 lo, hi;
    if constexpr (Q == 8) {
      const int8_t* p = static_cast<const int8_t*>(values) + 32 * c;
      lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
      hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
    } else {  // 16 bytes: slot 2j low nibble, 2j + 1 high
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(values) + 16 * c));
      const __m128i low = _mm_set1_epi8(15);
      const __m128i a0 = _mm_and_si128(raw, low), a1 = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
      lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(a0, a1)));
      hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(a0, a1)));
    }
    lo = _mm512_mul_ps(_mm512_sub_ps(lo, _mm512_set1_ps(static_cast<float>(nm_zero(a, o, g0)))),
                       _mm512_set1_ps(nm_scale(a, o, g0)));
    hi = _mm512_mul_ps(_mm512_sub_ps(hi, _mm512_set1_ps(static_cast<float>(nm_zero(a, o, g1)))),
                       _mm512_set1_ps(nm_scale(a, o, g1)));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  }
}

template <int Q>
SK_BF16 void expand_rows(const NMLinearArgs& a, int64_t row0, int64_t nrows, uint16_t* dense, int64_t ld) {
  const int64_t kept = a.k / 2, full = kept / 32;
  const int64_t gk = a.groups == 1 ? INT64_MAX : a.group_kept;
  parallel_range(nrows, a.threads, 16, [&](int64_t i0, int64_t i1, int) SK_BF16 {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t o = row0 + i;
      uint16_t* d = dense + i * ld;
      const int32_t* mrow = a.meta + o * a.meta_words;
      const void* values = static_cast<const char*>(a.values) + o * (Q == 0 ? kept * 2 : kept * Q / 8);
      for (int64_t c = 0; c < full; ++c) {
        const __m512i m = _mm512_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mrow + 2 * c)));
        const int64_t g0 = Q ? 32 * c / gk : 0, g1 = Q ? (32 * c + 16) / gk : 0;
        expand64(chunk_bf16<Q>(a, o, values, c, g0, g1), m, d + 64 * c);
      }
      // The last, partial chunk: slot by slot.
      std::fill(d + 64 * full, d + a.k, uint16_t{0});
      for (int64_t j = 32 * full; j < kept; ++j) {
        const int field = (static_cast<uint32_t>(mrow[j / 16]) >> (2 * (j % 16))) & 3;
        store_f32(d, (j / 2) * 4 + field, nm_weight(a, o, j), DType::kBF16);
      }
    }
  });
}

}  // namespace

bool nm_24_decompress_bf16_avx512(const NMLinearArgs& a, int64_t row0, int64_t nrows, void* dense, int64_t ld) {
  if (a.n != 2 || a.m != 4 || !bf16_kernel_here()) return false;
  uint16_t* d = static_cast<uint16_t*>(dense);
  if (!a.qbits) {
    if (a.dtype != DType::kBF16) return false;
    expand_rows<0>(a, row0, nrows, d, ld);
  } else {
    if (a.groups > 1 && a.group_kept % 16 != 0) return false;
    a.qbits == 8 ? expand_rows<8>(a, row0, nrows, d, ld) : expand_rows<4>(a, row0, nrows, d, ld);
  }
  return true;
}

bool nm_24_avx512_supported(const NMLinearArgs& a) {
  if (a.n != 2 || a.m != 4 || a.act_block) return false;
  if (a.qbits) return a.dtype == DType::kBF16 && bf16_kernel_here() && (a.groups == 1 || a.group_kept % 16 == 0);
  return a.dtype == DType::kF32 || (a.dtype == DType::kBF16 && bf16_kernel_here());
}

void nm_linear_decode_24_avx512(const NMLinearArgs& a) {
  if (a.dtype == DType::kBF16) {
    const int64_t ldb = (a.k + 63) / 64 * 64;  // whole 64-column windows, zero past K
    std::vector<uint16_t> xb(a.rows * ldb, 0);
    for (int64_t r = 0; r < a.rows; ++r)
      std::memcpy(xb.data() + r * ldb, static_cast<const uint16_t*>(a.x) + r * a.ldx, a.k * sizeof(uint16_t));
    if (a.qbits) return quantized24(a, xb.data(), ldb);
    if (a.rows > 1 && std::min<int64_t>(a.rows, 4) * ldb * sizeof(uint16_t) > kBlockOverBytes) {
      return each_block(a, [&](int64_t o0, int64_t o1, int64_t r0, auto rows) {
        block24_bf16<decltype(rows)::value>(a, xb.data(), ldb, r0, o0, o1);
      });
    }
    return each_row_far(a, [&](int64_t o, int64_t r0, auto rows, auto far) {
      rows24_bf16<decltype(rows)::value, decltype(far)::value>(a, xb.data(), ldb, r0, o);
    });
  }
  const int64_t ldf = (a.k + 31) / 32 * 32;  // whole 32-column windows, zero past K
  std::vector<float> xf(a.rows * ldf);
  convert_rows_f32(a.x, a.rows, a.k, a.ldx, a.dtype, xf.data(), ldf, a.threads);
  if (a.rows == 1 || std::min<int64_t>(a.rows, 4) * ldf * sizeof(float) <= kBlockOverBytes) {
    return each_row_far(a, [&](int64_t o, int64_t r0, auto rows, auto far) {
      rows24<decltype(rows)::value, decltype(far)::value>(a, xf.data(), ldf, r0, o);
    });
  }
  // Up to 4 rows of x past kBlockOverBytes: blocks of output rows over chunks of the columns.
  each_block(a, [&](int64_t o0, int64_t o1, int64_t r0, auto rows) {
    block24<decltype(rows)::value>(a, xf.data(), ldf, r0, o0, o1);
  });
}

}  // namespace sparsekern::detail
#endif
