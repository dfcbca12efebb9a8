// N:M decode kernels for AVX-512, fp32 sums; x rows up to 4 at a time share the values, the
// indices and the row of W; output rows are split over the threads. 2:4 with fp32 values; 2:4,
// 1:4, 2:8 and 4:8 with bf16 values or int8 / int4 ones, and bf16 x (the bf16 kernels below).
//
// fp32 values: one meta word holds the 2-bit in-group indices of 16 kept values, which cover 32
// columns of x: a zmm of the 16 values, the word broadcast and shifted per lane (lane l: field l,
// plus the group's base column 4 * (l / 2)), one vpermt2ps picks their x operands out of the 32
// columns (two zmm of x as fp32), one FMA.
// bf16 values (AVX-512 BF16 + VBMI): 32 kept values a step (at 2:4 two meta words, 64 columns);
// two kept values are one pair of vdpbf16ps, so the x operands are one vpermt2w of x as bf16
// (two at 1:4 and 2:8: 128 columns), the index lanes cut from the meta by one vpmultishiftqb.
// fp16 values stay on the AVX2 quads kernel (16 fp16 values a step measured slower than it).
// int8 / int4 values with bf16 or fp32 x (W8A16, W4A16): the bf16 scheme on the integers
// (nm_linear_avx512_kernels.h; the fp32-x instances in nm_linear_avx512_f32.cpp).
//
// Index fields are masked to log2(M) bits, so a garbage meta word picks a wrong column inside its
// own window, never outside x (x is copied into a zero-padded buffer of whole windows).
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
// quads does) cost 30% here: 2 threads 3.56 vs 2.55 ms; once per page is what pays
// (prefetch_stream).
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
#include "cpu/nm_linear_avx512_kernels.h"
#include "cpu/parallel.h"

namespace sparsekern::detail {
namespace {

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

// bf16 values and x: 32 kept values a step; a pair of them is one lane of vdpbf16ps, so the step
// is the Picker's pick (nm_linear_avx512_kernels.h) and one vdpbf16ps (whichever groups the pair's slots belong to).
template <class P, int R>
SK_BF16 inline void step_bf16(__m512* acc, __m512i w, __m512i idx, const uint16_t* x, int64_t ldb, const Picker<P>& pk) {
  for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)w, (__m512bh)pk.gather(x + r * ldb, idx));
}

// Row o's end for x rows r0 .. r0 + R - 1 (x0: row r0 of x): the first values of one more step
// past the full ones, the bias, the stores.
template <class P, int R>
SK_BF16 SK_INLINE void last_bf16(const NMLinearArgs& a, __m512* acc, int64_t o, int64_t r0, const uint16_t* x0,
                                 int64_t ldb, const Picker<P>& pk) {
  const int64_t kept = a.k / P::M * P::N, full = kept / 32;
  if (const int64_t rest = kept - 32 * full; rest > 0) {
    const uint16_t* v = static_cast<const uint16_t*>(a.values) + o * kept;
    const __m512i w = _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t{1} << rest) - 1), v + 32 * full);
    const __m512i idx = pk.tail_index(a.meta + o * a.meta_words, full, a.meta_words);
    step_bf16<P, R>(acc, w, idx, x0 + P::kCols * full, ldb, pk);
  }
  const float b = a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f;
  for (int r = 0; r < R; ++r) store_f32(a.out, (r0 + r) * a.ldo + o, _mm512_reduce_add_ps(acc[r]) + b, a.dtype);
}

// Steps [s0, s1) of row o into acc, for x rows from x0 (row r0 of x).
template <class P, int R, bool Far = false>
SK_BF16 SK_INLINE void steps_bf16(const NMLinearArgs& a, __m512* acc, int64_t o, const uint16_t* x0, int64_t ldb,
                                  int64_t s0, int64_t s1, const Picker<P>& pk) {
  const uint16_t* v = static_cast<const uint16_t*>(a.values) + o * (a.k / P::M * P::N);
  const int32_t* mrow = a.meta + o * a.meta_words;
  MetaCursor<P> mc(mrow, s0);
  walk_steps<R>(acc, s0, s1, [&](__m512* sums, int64_t s) SK_BF16 {  // (s0, s0 + 1, ... in order)
    prefetch_stream<Far>(v + 32 * s);
    step_bf16<P, R>(sums, _mm512_loadu_si512(v + 32 * s), pk.index(mc), x0 + P::kCols * s, ldb, pk);
    mc.next();
  });
}

template <class P, int R, bool Far>
SK_BF16 void rows_bf16(const NMLinearArgs& a, const uint16_t* xb, int64_t ldb, int64_t r0, int64_t o) {
  const Picker<P> pk;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const uint16_t* x0 = xb + r0 * ldb;
  steps_bf16<P, R, Far>(a, acc, o, x0, ldb, 0, a.k / P::M * P::N / 32, pk);
  last_bf16<P, R>(a, acc, o, r0, x0, ldb, pk);
}

// rows_bf16 for output rows o0 .. o1 - 1 and x rows r0 .. r0 + R - 1 in column chunks, as
// block24 does for fp32 (32 steps: 2048 columns at 2:4, 4 KB of x per row).
template <class P, int R>
SK_BF16 void block_bf16(const NMLinearArgs& a, const uint16_t* xb, int64_t ldb, int64_t r0, int64_t o0, int64_t o1) {
  const int64_t full = a.k / P::M * P::N / 32;
  const Picker<P> pk;
  const uint16_t* x0 = xb + r0 * ldb;
  auto run = [&](int64_t o, __m512* acc, int64_t s0, int64_t s1) SK_BF16 {
    steps_bf16<P, R>(a, acc, o, x0, ldb, s0, s1, pk);
  };
  auto finish = [&](int64_t o, __m512* acc) SK_BF16 { last_bf16<P, R>(a, acc, o, r0, x0, ldb, pk); };
  over_chunks<R>(o0, o1, full, run, finish);
}

// Quantized values, x as bf16 in xb (whole steps, zero past K): sx, int8 activations (xb then
// holds their integers, row stride ldb), the blocks' scales; else nullptr, and xb holds bf16 x
// (row stride ldb) or, for fp32 x, each row's 3 or 2 parts (a.x_parts; split_x_f32, row stride
// ldb, the parts ldb / 3 or ldb / 2 apart). Scales of a.dtype.
void quantized(const NMLinearArgs& a, const uint16_t* xb, int64_t ldb, const float* sx) {
  if (a.dtype == DType::kF32) return nm_quantized_f32x_avx512(a, xb, ldb, sx);
  return sx ? quantized_x<XMode<uint16_t, true, 1>>(a, xb, ldb, sx) : quantized_x<XBf16>(a, xb, ldb, sx);
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

// fp32 x for the quantized kernels: row r as `parts` bf16 rows at xs + parts r ldh, ldh apart
// (zero past K): hi = bf16(x), mid = bf16(x - hi), lo = bf16(x - hi - mid), each rounded to
// nearest (2 parts: hi and mid). Three sum to x exactly: x - hi holds x's 16 bits below hi's last
// one, mid takes 8 of them, and x - hi - mid (both differences exact in fp32) fits lo's 8 (lo
// below 2^-126 flushes to zero in vdpbf16ps: x under 2^-103); two keep x within 2^-17 |x|. The
// kernels multiply the integer weights by each part, exactly, into fp32 sums. Rows holding NaN,
// Inf or |x| >= 2^100 (where hi may round to Inf, or q * x overflow) are redone by the op
// (nonfinite_or_huge_rows).
// NOTE: 11008x4096, fp32 x, 2 threads, Zen 5, separate processes alternating (ms; AVX2 quads
// kernel / 3 parts / 2 parts): 1 row 2:4 int8 1.01-1.04 / 0.93-0.94 / 0.61-0.62, 2:4 int4 g128
// 1.31-1.33 / 0.81-0.83 / 0.45-0.46, 4:8 int8 1.75-1.84 / 1.23-1.24 / 0.71-0.74; 2 rows 2:4 int8
// 1.53-1.55 / 2.09-2.13 / 1.57-1.65, 4:8 int8 2.25-2.31 / 2.40-2.42 / 1.85-1.88; 16 rows 2:4 int8
// 10.7 / 18.4 / 11.2. Three parts lose from 2 rows on, and two parts are not fp32: a tiny LM's
// fp32 logits (test_lean_step_cpp) drifted 2e-4 from the dense layers'.
SK_BF16 void split_x_f32(const NMLinearArgs& a, uint16_t* xs, int64_t ldh, int parts) {
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* x = static_cast<const float*>(a.x) + r * a.ldx;
    uint16_t* row = xs + parts * r * ldh;
    for (int64_t c = 0; c < a.k; c += 16) {
      const __mmask16 m = a.k - c >= 16 ? 0xffff : static_cast<__mmask16>((1u << (a.k - c)) - 1);
      __m512 rest = _mm512_maskz_loadu_ps(m, x + c);
      for (int p = 0; p < parts; ++p) {
        const __m256i part = (__m256i)_mm512_cvtneps_pbh(rest);
        _mm256_mask_storeu_epi16(row + p * ldh + c, m, part);
        rest = _mm512_sub_ps(rest, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(part), 16)));
      }
    }
  }
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

bool nm_avx512_pattern(int n, int m) { return (m == 4 && (n == 1 || n == 2)) || (m == 8 && (n == 2 || n == 4)); }

bool nm_avx512_supported(const NMLinearArgs& a) {
  if ((a.act_block && a.act_block != 32) || !nm_avx512_pattern(a.n, a.m)) return false;
  if (a.qbits) {  // fp32 x (split_x_f32): 1 row for exact products (x_parts 3)
    const bool f32_ok = a.dtype == DType::kF32 && (a.act_block || a.x_parts < 3 || a.rows == 1);
    return (a.dtype == DType::kBF16 || f32_ok) && bf16_kernel_here() &&
           (a.groups == 1 || a.group_kept % 16 == 0 || (a.group_kept == 8 && !a.zeros));
  }
  if (a.dtype == DType::kBF16) return bf16_kernel_here();
  return a.dtype == DType::kF32 && a.n == 2 && a.m == 4;
}

void nm_linear_decode_avx512(const NMLinearArgs& a) {
  if (a.dtype == DType::kBF16 || a.qbits) {
    const int64_t cols = 32 * a.m / a.n, ldb = (a.k + cols - 1) / cols * cols;  // whole steps, zero past K
    if (a.dtype == DType::kF32 && !a.act_block) {  // quantized values, fp32 x: bf16 rows that sum to it
      const int parts = a.x_parts >= 3 ? 3 : 2;
      std::vector<uint16_t> xs(a.rows * parts * ldb, 0);
      split_x_f32(a, xs.data(), ldb, parts);
      return quantized(a, xs.data(), parts * ldb, nullptr);
    }
    std::vector<uint16_t> xb(a.rows * ldb, 0);
    if (a.act_block) {  // x rounded to int8 per 32 columns: the integers as bf16 (exact), the scales
      std::vector<int8_t> q(a.rows * ldb);
      std::vector<float> sx(a.rows * (ldb / 32));
      quantize_x_a8(a, q.data(), ldb, sx.data(), ldb / 32);
      for (size_t i = 0; i < q.size(); ++i) xb[i] = f32_to_bf16(static_cast<float>(q[i]));
      return quantized(a, xb.data(), ldb, sx.data());
    }
    for (int64_t r = 0; r < a.rows; ++r)
      std::memcpy(xb.data() + r * ldb, static_cast<const uint16_t*>(a.x) + r * a.ldx, a.k * sizeof(uint16_t));
    if (a.qbits) return quantized(a, xb.data(), ldb, nullptr);
    return with_pattern<0>(a, [&](auto p) {
      using P = decltype(p);
      if (a.rows > 1 && std::min<int64_t>(a.rows, 4) * ldb * sizeof(uint16_t) > kBlockOverBytes) {
        return each_block(a, [&](int64_t o0, int64_t o1, int64_t r0, auto rows) {
          block_bf16<P, decltype(rows)::value>(a, xb.data(), ldb, r0, o0, o1);
        });
      }
      each_row_far(a, [&](int64_t o, int64_t r0, auto rows, auto far) {
        rows_bf16<P, decltype(rows)::value, decltype(far)::value>(a, xb.data(), ldb, r0, o);
      });
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
