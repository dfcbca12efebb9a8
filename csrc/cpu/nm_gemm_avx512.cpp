// Sparse GEMM for many rows of x (prefill) on AVX-512 BF16 CPUs, for 2:4, 1:4, 2:8 and 4:8 with
// bf16 or fp32 x: no dense copy of W and no dense tile, n / m of the dense GEMM's multiply-adds.
// Values as stored, or int8 / int4 (W8A16, W4A16, scale groups of a multiple of 16 kept slots,
// or one per row) dequantized as they are packed (bf16 x: rounded to bf16, which is what the
// decompressed tiles held before).
//
// Vectorized over output features, 16 fp32 lanes per zmm; a row's kept slots go in pairs (slots
// 2i, 2i + 1), never across a window of x. bf16: a pair's two values are one bf16 pair, so
// vdpbf16ps of the 16 features' pair i with, lane by lane, the x pair (x[r, c0], x[r, c1]) of its
// two columns adds 16 features' pair i for row r. That x pair vector is one vpermw of x's
// 32-column window holding the pair (16 n / m pairs a window); a meta field indexes its own
// group's columns (garbage meta reads a wrong column of its own group, never outside x). fp32:
// one vpermps of a 16-column window and one FMA per kept slot. Per 16 features and K block, the
// values and the permute indices are packed (a 16 x 16 transpose of the values, the meta fields
// cut by immediate shifts, the pattern a template) once per pass of up to 288 rows and reused by
// each of them, the next block's values prefetched; the bf16 micro-kernel keeps 2 x 16 features
// of 12 rows in 24 accumulators (4 loads of the packed block and 12 of x per 24 pairs, all in
// L1), the fp32 one 16 features of 12 rows.
//
// Work: tasks of up to 128 features, claimed by the threads of OpenMP's team through the kernels'
// runtime (parallel.h says why that team here); each walks K in blocks of 128 columns (pack the
// block, then every 12-row block of x), with fp32 sums per task between blocks. Rows of x go 288
// at a time (a pass), copied to a buffer of whole windows.
//
// NOTE: 2:4, bf16, Zen 4 EPYC, 1 thread, kept multiply-adds per second (dense bf16 F.linear:
// 93-103 G): this kernel 60-65 G, so 1.05-1.2x dense at 2 threads (65-512 rows, five Llama
// shapes; the decompressed-tile path it replaces 0.70-0.92x). vpermw + vdpbf16ps issue tops out at
// ~2.6 G pairs/s per core (a register-only loop). Tried first: x stored as the six column pairs of
// each group for 64 rows (three times x), weights broadcast, one load per vdpbf16ps: 50-55 G
// (loads and L2 misses bound it). Packing is ~15% of the time. fp32, 2 threads: 1.35-2.8x dense
// fp32 F.linear at 13-512 rows (the tiles 0.42-0.98x past the decode rows). Numbers:
// bench/results/cpu-epyc-zen4-avx512-2core-2026-11-26-session8.md.
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <new>
#include <vector>

#include "cpu/aligned.h"
#include "cpu/isa.h"
#include "cpu/linear_common.h"
#include "cpu/nm_linear.h"
#include "cpu/parallel.h"

namespace sparsekern::detail {
namespace {

#define SK_GEMM_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define SK_GEMM_INLINE __attribute__((always_inline)) inline

constexpr int kRows = 12;                   // rows of x per micro-kernel
constexpr int64_t kBlockCols = 128;         // columns of x per K block
constexpr int kMaxPairs = 32;               // kept slot pairs per K block, at most (2:4, 4:8)
constexpr int64_t kTileBytes = 128;         // per 16 features and bf16 pair: pairs, then vpermw indices
constexpr int64_t kPackedTile = kMaxPairs * kTileBytes;  // one bf16 tile's K block
constexpr int kMaxTiles = 8;               // 16-feature tiles per task
constexpr int64_t kSuperRows = 24 * kRows;  // rows of x per pass


// In-place transpose of 16 x 16 dwords (r[i] lane j <- r[j] lane i).
SK_GEMM_BF16 inline void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4a + b], 128-bit lane q: rows 4a .. 4a + 3 of column 4q + b. Two rounds of 128-bit lane
  // shuffles move lane q of r[4a + b] to lane a of column 4q + b.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// Kept slots [j, j + n) (n <= 16, j a multiple of 16) of feature o as fp32: (q - zero) * scale,
// one scale group for all of them (group_kept a multiple of 16); zero past n (not -zero * scale:
// a pair's slot past K is multiplied by a real column of x).
SK_GEMM_BF16 inline __m512 dequant16(const NMLinearArgs& a, int64_t kept, int64_t o, int64_t j, int n) {
  __m512i q;
  if (a.qbits == 8) {
    q = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << n) - 1),
                                                  static_cast<const int8_t*>(a.values) + o * kept + j));
  } else {  // slot 2i in the low nibble of byte i, 2i + 1 in the high one
    const __m128i b = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << ((n + 1) / 2)) - 1),
                                           static_cast<const uint8_t*>(a.values) + (o * kept + j) / 2);
    const __m128i lo = _mm_and_si128(b, _mm_set1_epi8(15)), hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15));
    q = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
  }
  const int64_t g = a.groups == 1 ? 0 : j / a.group_kept;
  const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_set1_epi32(nm_zero(a, o, g))));
  return _mm512_maskz_mul_ps(static_cast<__mmask16>((1u << n) - 1), v, _mm512_set1_ps(nm_scale(a, o, g)));
}

// Pairs [p, p + n) (n <= 16, p a multiple of 8) of feature o's kept slots (pair i: slots 2i and
// 2i + 1, of `kept` in the row): as stored (bf16) or dequantized and rounded to bf16 (int8 / int4,
// as the decompressed tiles hold them); zero past n pairs or past the row's last slot.
SK_GEMM_BF16 inline __m512i pairs16(const NMLinearArgs& a, int64_t kept, int64_t o, int64_t p, int n) {
  const int slots = static_cast<int>(std::min<int64_t>(2 * n, kept - 2 * p));
  if (!a.qbits) {
    const __mmask32 words = slots == 32 ? ~__mmask32{0} : (__mmask32{1} << slots) - 1;
    return _mm512_maskz_loadu_epi16(words, static_cast<const uint16_t*>(a.values) + o * kept + 2 * p);
  }
  const __m512 lo = dequant16(a, kept, o, 2 * p, std::min(16, slots));
  const __m512 hi = slots > 16 ? dequant16(a, kept, o, 2 * p + 16, slots - 16) : _mm512_setzero_ps();
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// c[r * ldc + 16 t + lane] (+)= features of tiles t < T, rows r < R, pairs [0, ng) of the block,
// 2^kShift pairs a window: packed tiles at pk (tile t at pk + t * kPackedTile), x rows at x (row
// stride ldx elements, the block's first column).
template <int R, int T, int kShift>
SK_GEMM_BF16 void micro(const char* pk, const uint16_t* x, int64_t ldx, int ng, float* c, int64_t ldc, bool first) {
  __m512 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = first ? _mm512_setzero_ps() : _mm512_load_ps(c + r * ldc + 16 * t);
  for (int g = 0; g < ng; ++g) {
    __m512bh w[T];
    __m512i idx[T];
    for (int t = 0; t < T; ++t) {
      w[t] = (__m512bh)_mm512_load_si512(pk + t * kPackedTile + g * kTileBytes);
      idx[t] = _mm512_load_si512(pk + t * kPackedTile + g * kTileBytes + 64);
    }
    const uint16_t* xw = x + 32 * (g >> kShift);
    for (int r = 0; r < R; ++r) {
      __m512i xv = _mm512_loadu_si512(xw + r * ldx);
      __asm__("" : "+v"(xv));  // one load for both tiles (GCC folds it into each vpermw)
      for (int t = 0; t < T; ++t) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], (__m512bh)_mm512_permutexvar_epi16(idx[t], xv), w[t]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) _mm512_store_ps(c + r * ldc + 16 * t, acc[t][r]);
}

using MicroFn = void (*)(const char*, const uint16_t*, int64_t, int, float*, int64_t, bool);

template <int T, int kShift, int... R>
constexpr MicroFn micro_for(int rows, std::integer_sequence<int, R...>) {
  MicroFn fn = nullptr;
  ((fn = rows == R + 1 ? micro<R + 1, T, kShift> : fn), ...);
  return fn;
}

// pairs per window: 2^shift (8 at 2:4 and 4:8, 4 at 1:4 and 2:8)
MicroFn micro_fn(int rows, int tiles, int shift) {
  constexpr auto kAll = std::make_integer_sequence<int, kRows>{};
  if (shift == 3) return tiles == 2 ? micro_for<2, 3>(rows, kAll) : micro_for<1, 3>(rows, kAll);
  return tiles == 2 ? micro_for<2, 2>(rows, kAll) : micro_for<1, 2>(rows, kAll);
}

// fp32: a kept value per FMA. x goes in 16-column windows, each holding S = 16 n / m kept slots
// of a row; per 16 features, slots go in pairs: the values of the pair's first slot, their
// vpermps indices (the slot's column within its window), the second slot's values and indices.
// A K block (128 columns) holds 8 windows, 4 S pairs.
constexpr int64_t kTileBytesF32 = 256;

// Per 16 features and slot pair: bytes, and where the (first slot's) indices start.
template <bool F32>
constexpr int64_t kPairBytes = F32 ? kTileBytesF32 : kTileBytes;
constexpr int64_t kIndexOffset = 64;

// The permute indices of slots [j0, j1) of features [o0, o0 + live) of an N:M weight, into the
// packed pairs at dst: fp32, each slot's column in its 16-column window; bf16, word 2l / 2l + 1 =
// the columns of the pair's two slots in its 32-column window. A pair's slot past j1: column 0.
template <bool F32, int N, int M>
SK_GEMM_BF16 void pack_indices(const NMLinearArgs& a, int64_t o0, int live, int64_t j0, int64_t j1, char* dst) {
  constexpr int kBits = M == 4 ? 2 : 3, kPerWord = 32 / kBits, kWindow = F32 ? 16 : 32;
  const __mmask16 lanes = static_cast<__mmask16>((1u << live) - 1);
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int32_t>(a.meta_words)));
  const int32_t* meta = a.meta + o0 * a.meta_words;
  const __m512i field_mask = _mm512_set1_epi32((1 << kBits) - 1);
  // A pair never straddles two meta words (j0 and the words' field counts, 16 or 10, are even).
  for (int64_t j = j0; j < j1;) {
    const int64_t word = j / kPerWord;
    __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, rows, meta + word, 4);
    w = _mm512_srl_epi32(w, _mm_cvtsi32_si128(static_cast<int>(j - word * kPerWord) * kBits));
    for (const int64_t end = std::min(j1, (word + 1) * kPerWord); j < end; j += 2) {
      const __m512i c0 = _mm512_add_epi32(_mm512_and_si512(w, field_mask), _mm512_set1_epi32(j / N * M % kWindow));
      const __m512i c1 = j + 1 < end ? _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(w, kBits), field_mask),
                                                        _mm512_set1_epi32((j + 1) / N * M % kWindow))
                                     : _mm512_setzero_si512();  // past j1
      w = _mm512_srli_epi32(w, 2 * kBits);
      char* d = dst + (j - j0) / 2 * kPairBytes<F32> + kIndexOffset;
      if constexpr (F32) {
        _mm512_store_si512(d, c0);
        _mm512_store_si512(d + 128, c1);
      } else {
        _mm512_store_si512(d, _mm512_or_si512(c0, _mm512_slli_epi32(c1, 16)));
      }
    }
  }
}

// Features [o0, o0 + 16) (those past out_features: zero), columns [c0, c0 + 128) (c0 a multiple
// of 128) of an N:M weight: pair p of the block's kept slots at dst + p * kPairBytes (a pair's
// slot past K: zero). bf16 x: pairs of bf16 values (dequantized and rounded to bf16: int8 / int4);
// fp32 x: fp32 values (dequantized: int8 / int4).
template <bool F32, int N, int M>
SK_GEMM_BF16 void pack_tile(const NMLinearArgs& a, int64_t o0, int64_t c0, char* dst) {
  const int64_t kept = a.k / M * N, j0 = c0 / M * N;
  const int64_t j1 = std::min(kept, (c0 + kBlockCols) / M * N);  // the block's slots [j0, j1)
  const int live = static_cast<int>(std::min<int64_t>(16, a.out_features - o0));
  if constexpr (F32) {
    const float* v = static_cast<const float*>(a.values) + o0 * kept;
    for (int64_t h = j0; h < j1; h += 16) {  // 16 slots at a time: transpose [feature][slot]
      const int n = static_cast<int>(std::min<int64_t>(16, j1 - h));
      const __mmask16 slots = static_cast<__mmask16>((1u << n) - 1);
      __m512i r[16];
      for (int f = 0; f < 16; ++f) {
        if (f >= live) {
          r[f] = _mm512_setzero_si512();
        } else if (a.qbits) {  // int8 / int4: (q - zero) * scale in fp32, as the decompressed tiles held it
          r[f] = _mm512_castps_si512(dequant16(a, kept, o0 + f, h, n));
        } else {
          r[f] = _mm512_maskz_loadu_epi32(slots, v + f * kept + h);
        }
      }
      transpose16(r);
      for (int j = 0; j < 16; ++j) _mm512_store_si512(dst + (h - j0 + j) / 2 * kTileBytesF32 + (j % 2) * 128, r[j]);
    }
  } else {
    const int64_t pairs = (j1 - j0 + 1) / 2;
    for (int64_t h = 0; h < pairs; h += 16) {  // 16 pairs at a time: transpose [feature][pair]
      const int n = static_cast<int>(std::min<int64_t>(16, pairs - h));
      __m512i r[16];
      for (int f = 0; f < 16; ++f) r[f] = f < live ? pairs16(a, kept, o0 + f, j0 / 2 + h, n) : _mm512_setzero_si512();
      transpose16(r);
      for (int g = 0; g < n; ++g) _mm512_store_si512(dst + (h + g) * kTileBytes, r[g]);
    }
  }
  // The next block's values and meta, fetched while this block runs (as many rows as features:
  // too many streams for the hardware prefetcher).
  if (j1 < kept) {
    constexpr int kPerWord = M == 4 ? 16 : 10;
    const int64_t bits_per_slot = a.qbits ? a.qbits : F32 ? 32 : 16, row_bytes = kept * bits_per_slot / 8;
    const int64_t from = j1 * bits_per_slot / 8, bytes = kBlockCols / M * N * bits_per_slot / 8;
    for (int f = 0; f < live; ++f) {
      const char* vf = static_cast<const char*>(a.values) + (o0 + f) * row_bytes + from;
      for (int64_t l = 0; l < bytes; l += 64) _mm_prefetch(vf + l, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(a.meta + (o0 + f) * a.meta_words + j1 / kPerWord), _MM_HINT_T0);
    }
  }
  pack_indices<F32, N, M>(a, o0, live, j0, j1, dst);
}

// c[r * ldc + lane] (+)= one tile's 16 features, rows r < R, slot pairs [0, np) of the block,
// 2^kShift pairs a window: x rows at x (fp32).
template <int R, int kShift>
SK_GEMM_BF16 void micro_f32(const char* pk, const float* x, int64_t ldx, int np, float* c, int64_t ldc, bool first) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = first ? _mm512_setzero_ps() : _mm512_load_ps(c + r * ldc);
  for (int g = 0; g < np; ++g) {
    const char* p = pk + g * kTileBytesF32;
    const __m512 w0 = _mm512_load_ps(p), w1 = _mm512_load_ps(p + 128);
    const __m512i i0 = _mm512_load_si512(p + 64), i1 = _mm512_load_si512(p + 192);
    const float* xw = x + 16 * (g >> kShift);
    for (int r = 0; r < R; ++r) {
      __m512 xv = _mm512_loadu_ps(xw + r * ldx);
      __asm__("" : "+v"(xv));  // one load for both slots
      acc[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(i0, xv), w0, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(i1, xv), w1, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_store_ps(c + r * ldc, acc[r]);
}

using MicroF32 = void (*)(const char*, const float*, int64_t, int, float*, int64_t, bool);

template <int kShift, int... R>
constexpr MicroF32 micro_f32_for(int rows, std::integer_sequence<int, R...>) {
  MicroF32 fn = nullptr;
  ((fn = rows == R + 1 ? micro_f32<R + 1, kShift> : fn), ...);
  return fn;
}

// The packing, micro-kernels and element types of one of the two kernels. A K block is 128
// columns of x for both: 32 groups of bf16 2:4 pairs, or 8 windows of fp32 slots.
template <bool F32>
struct Kind {
  using X = std::conditional_t<F32, float, uint16_t>;
  static constexpr int64_t kWindow = F32 ? 16 : 32;  // x columns one permute indexes
  static constexpr int64_t kTile = kMaxPairs * kPairBytes<F32>;
  static constexpr int kTilesPerMicro = F32 ? 1 : 2;
  SK_GEMM_BF16 static void pack(const NMLinearArgs& a, int64_t o0, int64_t c0, char* dst) {
    switch (a.m * 8 + a.n) {  // the pattern as constants: shifts by an immediate, no division
      case 4 * 8 + 2: return pack_tile<F32, 2, 4>(a, o0, c0, dst);
      case 4 * 8 + 1: return pack_tile<F32, 1, 4>(a, o0, c0, dst);
      case 8 * 8 + 2: return pack_tile<F32, 2, 8>(a, o0, c0, dst);
      default: return pack_tile<F32, 4, 8>(a, o0, c0, dst);
    }
  }
  // The micro-kernel's steps in the block at column c0: slot pairs.
  static int64_t units(const NMLinearArgs& a, int64_t c0) {
    return (std::min(kBlockCols, a.k - c0) / a.m * a.n + 1) / 2;
  }
  static void micro(const NMLinearArgs& a, int rows, int tiles, const char* pk, const X* x, int64_t ldx, int steps,
                    float* c, int64_t ldc, bool first) {
    const bool half = 2 * a.n == a.m;  // 2:4, 4:8: 4 pairs per fp32 window (8 per bf16 one), else 2 (4)
    if constexpr (F32) {
      constexpr auto kAll = std::make_integer_sequence<int, kRows>{};
      (half ? micro_f32_for<2>(rows, kAll) : micro_f32_for<1>(rows, kAll))(pk, x, ldx, steps, c, ldc, first);
    } else {
      micro_fn(rows, tiles, half ? 3 : 2)(pk, x, ldx, steps, c, ldc, first);
    }
  }
  // 16 sums (+ the bias) into out at o, lanes masked.
  SK_GEMM_BF16 static void store(const NMLinearArgs& a, __m512 sums, int64_t o, int64_t row, __mmask16 lanes) {
    __m512 b = _mm512_setzero_ps();
    if (a.bias) {
      if constexpr (F32) {
        b = _mm512_maskz_loadu_ps(lanes, static_cast<const float*>(a.bias) + o);
      } else {
        const __m256i bb = _mm256_maskz_loadu_epi16(lanes, static_cast<const uint16_t*>(a.bias) + o);
        b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bb), 16));
      }
    }
    if constexpr (F32) {
      _mm512_mask_storeu_ps(static_cast<float*>(a.out) + row * a.ldo + o, lanes, _mm512_add_ps(sums, b));
    } else {
      const __m256bh y = _mm512_cvtneps_pbh(_mm512_add_ps(sums, b));
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.out) + row * a.ldo + o, lanes, (__m256i)y);
    }
  }
};

template <bool F32>
SK_GEMM_BF16 void gemm(const NMLinearArgs& a) {
  using K = Kind<F32>;
  using X = typename K::X;
  const int64_t n_tiles = (a.out_features + 15) / 16;
  const int threads = std::max(a.threads, 1);
  // Tiles per task: about four tasks per thread, whole tile pairs, at most kMaxTiles.
  const int64_t per_task = std::clamp<int64_t>((n_tiles + 4 * threads - 1) / (4 * threads) + 1 & ~int64_t{1}, 2, kMaxTiles);
  const int64_t tasks = (n_tiles + per_task - 1) / per_task, ldc = per_task * 16;
  const int64_t ldx = (a.k + K::kWindow - 1) / K::kWindow * K::kWindow + K::kWindow;  // whole windows, rows not 4 KiB apart
  const int64_t pass_rows = std::min(kSuperRows, a.rows);
  AlignedArray<X> xb = aligned_array<X>(pass_rows * ldx);
  std::vector<AlignedArray<char>> sums, packed;
  for (int t = 0; t < threads; ++t) {
    sums.push_back(aligned_array<char>(sizeof(float) * pass_rows * ldc));
    packed.push_back(aligned_array<char>(kMaxTiles * K::kTile));
  }
  const X* x = static_cast<const X*>(a.x);
  X* xr = reinterpret_cast<X*>(xb.get());
  for (int64_t r0 = 0; r0 < a.rows; r0 += kSuperRows) {
    const int64_t nrows = std::min(kSuperRows, a.rows - r0);
    auto task_fn = [&](int64_t task, int slot) SK_GEMM_BF16 {
      float* c = reinterpret_cast<float*>(sums[slot].get());
      char* pk = packed[slot].get();
      const int64_t t0 = task * per_task, nt = std::min(per_task, n_tiles - t0);
      for (int64_t c0 = 0; c0 < a.k; c0 += kBlockCols) {
        const int steps = static_cast<int>(K::units(a, c0));
        for (int64_t t = 0; t < nt; ++t) K::pack(a, 16 * (t0 + t), c0, pk + t * K::kTile);
        for (int64_t rb = 0; rb < nrows; rb += kRows) {
          const int rr = static_cast<int>(std::min<int64_t>(kRows, nrows - rb));
          for (int64_t t = 0; t < nt; t += K::kTilesPerMicro) {
            const int tt = static_cast<int>(std::min<int64_t>(K::kTilesPerMicro, nt - t));
            K::micro(a, rr, tt, pk + t * K::kTile, xr + rb * ldx + c0, ldx, steps, c + rb * ldc + 16 * t, ldc, c0 == 0);
          }
        }
      }
      for (int64_t t = 0; t < nt; ++t) {  // the sums, plus the bias, into out
        const int64_t o = 16 * (t0 + t);
        const __mmask16 lanes = static_cast<__mmask16>((1u << std::min<int64_t>(16, a.out_features - o)) - 1);
        for (int64_t r = 0; r < nrows; ++r) K::store(a, _mm512_load_ps(c + r * ldc + 16 * t), o, r0 + r, lanes);
      }
    };
    // On OpenMP's team, hot or not (parallel.h): a call of many milliseconds pays little for a late
    // team thread, and inside a model torch's spinning OpenMP threads would take a pool helper's core.
    constexpr auto kOpenMP = ThreadPool::Team::kOpenMP;
    parallel_for(nrows, threads, [&](int64_t i, int) {
      std::memcpy(xr + i * ldx, x + (r0 + i) * a.ldx, a.k * sizeof(X));
      std::memset(xr + i * ldx + a.k, 0, (ldx - a.k) * sizeof(X));
    }, kOpenMP);
    parallel_for(tasks, threads, task_fn, kOpenMP);
  }
}

}  // namespace

bool nm_gemm_avx512_supported(const NMLinearArgs& a) {
  if (a.act_block || a.k % a.m != 0 || active_isa() < Isa::kAvx512Bf16) return false;
  const bool pattern = (a.n == 2 && a.m == 4) || (a.n == 1 && a.m == 4) || (a.n == 2 && a.m == 8) || (a.n == 4 && a.m == 8);
  if (!pattern || (a.dtype != DType::kF32 && a.dtype != DType::kBF16)) return false;
  // Quantized values: each 16-slot step of a pack lies in one scale group.
  return !a.qbits || a.groups == 1 || a.group_kept % 16 == 0;
}

void nm_gemm_avx512(const NMLinearArgs& a) {
  if (a.dtype == DType::kF32) return gemm<true>(a);
  gemm<false>(a);
}

}  // namespace sparsekern::detail
#endif
