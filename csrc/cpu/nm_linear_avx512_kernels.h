// The AVX-512 N:M decode kernels' shared pieces (nm_linear_avx512.cpp): prefetch, the bf16 pick of
// x operands (Pattern, Picker), and the quantized kernel (rows_q and its dispatch, quantized_x),
// a template over what x and the scales are (XMode). Its fp32-x instances are compiled in
// nm_linear_avx512_f32.cpp, beside the rest, so the two halves build in parallel.
// NOTE: one file with every instance took ~135 s to compile (the largest of the extension).
#pragma once
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

#define SK_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16")))

// Where a step's x operands lie, for the bf16 kernels below: N:M with M = 4 or 8 (2:4, 1:4, 4:8,
// 2:8). A step is 32 kept slots, 32 / N groups, 32 * M / N columns of x as bf16: one 64-column
// window (2:4, 4:8) or two (1:4, 2:8), each one vpermt2w of two zmm. Lane i (16-bit) of the
// step's values holds slot slot(i): i, or sigma(i) (Sigma: int4 values of an M = 4 pattern, see
// the quantized kernel). One vpmultishiftqb brings each lane's index field to the low bits of
// its lane, from the step's meta in every qword:
// - M = 4 (2-bit fields, 16 a word): the step's fields are words 2s, 2s + 1, one qword.
// - M = 8 (3-bit fields, 10 a word, the top 2 bits unused): fields 32s .. 32s + 31 lie in the 4
//   words from 32s / 10, at an offset that repeats every 5 steps (the phase, s % 5). In slot
//   order the 4 lanes of a qword hold 4 consecutive fields, in at most 2 words: word pair (0, 1),
//   (1, 2) or (2, 3) of the 4, which a broadcast and two masked broadcasts (of the qwords at word
//   1 and 2) put in each qword; masks and offsets are per phase.
//   NOTE: 11008x4096, 1 row, bf16 x, 2 threads, Zen 5, separate processes alternating, best of
//   3: against one vpermd of the 4 words with the phase from s % 5, these broadcasts and a cursor
//   walking the phase (MetaCursor): 4:8 int4 g128 0.685 -> 0.617 ms, 2:8 int4 g128 0.431 ->
//   0.412; int8 (memory-bound) and bf16 the same.
// Index fields are masked to log2(M) bits and the group's column added, so a garbage meta word
// picks a wrong column inside its own window, never outside x (x is copied into a zero-padded
// buffer of whole steps).
template <int N_, int M_, bool Sigma_ = false>
struct Pattern {
  static constexpr int N = N_, M = M_, kCols = 32 * M / N, kWindows = kCols / 64, kPhases = M == 8 ? 5 : 1;
  static constexpr bool Sigma = Sigma_;
  static_assert((M == 4 || (M == 8 && !Sigma)) && (kWindows == 1 || kWindows == 2), "unsupported N:M");
  static constexpr int slot(int i) { return Sigma ? 4 * (i % 8) + i / 8 : i; }
  // The 32-column x block (within the step) of dword lane d of vdpbf16ps's sums: its two slots
  // lie in one block (slots 2d, 2d + 1 in slot order; sigma(2d) + 0 and 4 within 8 slots).
  static constexpr int xblock(int d) { return slot(2 * d) / N * M / 32; }
  // The 16-bit lanes, and the dword lanes of vdpbf16ps's sums, that hold slots 16 .. 31.
  static constexpr uint32_t kHalf1Words = Sigma ? 0xF0F0F0F0u : 0xFFFF0000u;
  static constexpr __mmask16 kHalf1 = Sigma ? 0xCCCC : 0xFF00;
};

template <class P>
struct PickTables {
  alignas(64) uint8_t ctrl[P::kPhases][64];   // byte 2i: bit offset of lane i's field in its qword
  __mmask8 pair1[P::kPhases], pair2[P::kPhases];  // M = 8: the qwords that hold word pair (1, 2), (2, 3)
  alignas(64) uint16_t base[32];              // column of lane i's group in its window
  alignas(64) uint16_t nib[32];               // int4: the right shift that brings lane i's nibble to bit 0
  alignas(64) uint8_t spread[64];             // int4 in slot order: byte 2i, 2i + 1 take value byte i / 2
  alignas(64) uint16_t quarter[32];           // word 2d + 1: the quarter (8 slots) of dword lane d's slots
  PickTables() : ctrl(), pair1(), pair2(), base(), nib(), spread(), quarter() {
    for (int i = 0; i < 32; ++i) {
      const int slot = P::slot(i);
      base[i] = static_cast<uint16_t>(slot / P::N * P::M % 64);
      nib[i] = static_cast<uint16_t>(P::Sigma ? 4 * (i / 8) : 4 * (i % 2));
      spread[2 * i] = spread[2 * i + 1] = static_cast<uint8_t>(i / 2);
      if (i % 2) quarter[i] = static_cast<uint16_t>(slot / 8);  // (both slots of the dword: one quarter)
      for (int ph = 0; ph < P::kPhases; ++ph) {
        if (P::M == 4) {
          ctrl[ph][2 * i] = static_cast<uint8_t>(2 * slot);
          continue;
        }
        // The pair of the qword's lanes: from the word of its first field, at most word 2.
        const int off = 32 * ph % 10, f = off + slot, q = i / 4, pair = std::min(2, (off + P::slot(4 * q)) / 10);
        if (pair == 1) pair1[ph] |= static_cast<__mmask8>(1u << q);
        if (pair == 2) pair2[ph] |= static_cast<__mmask8>(1u << q);
        ctrl[ph][2 * i] = static_cast<uint8_t>(32 * (f / 10 - pair) + 3 * (f % 10));
      }
    }
  }
};
template <class P>
const PickTables<P> kPick;

// A row's meta, step by step from step s: the step's first word (p) and phase.
template <class P>
struct MetaCursor {
  const int32_t* p;
  int ph;
  MetaCursor(const int32_t* mrow, int64_t s)
      : p(mrow + (P::M == 4 ? 2 * s : 32 * s / 10)), ph(P::M == 4 ? 0 : static_cast<int>(s % 5)) {}
  void next() {  // M = 8: 32 fields are 3.2 words, so first words 3, 3, 3, 3 and 4 apart
    if constexpr (P::M == 4) {
      p += 2;
    } else {
      p += ph == 4 ? 4 : 3;
      ph = ph == 4 ? 0 : ph + 1;
    }
  }
};

template <class P>
struct Picker {
  __m512i ctrl, base, mask;  // ctrl: phase 0's (M = 8 loads the step's phase)
  SK_BF16 SK_INLINE Picker()
      : ctrl(_mm512_load_si512(kPick<P>.ctrl[0])),
        base(_mm512_load_si512(kPick<P>.base)),
        mask(_mm512_set1_epi16(P::M - 1)) {}

  // Lane i: (field & (M - 1)) | base, base's low bits clear, for the step whose meta words start
  // at p (2 of them at M = 4, 4 at M = 8) in phase ph.
  SK_BF16 SK_INLINE __m512i index(const int32_t* p, int ph) const {
    auto qword = [p](int w) SK_BF16 { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + w)); };
    __m512i m = _mm512_broadcastq_epi64(qword(0)), c = ctrl;
    if constexpr (P::M == 8) {
      m = _mm512_mask_broadcastq_epi64(m, kPick<P>.pair1[ph], qword(1));
      m = _mm512_mask_broadcastq_epi64(m, kPick<P>.pair2[ph], qword(2));
      c = _mm512_load_si512(kPick<P>.ctrl[ph]);
    }
    return _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(c, m), mask, base, 0xEA);
  }
  SK_BF16 SK_INLINE __m512i index(const MetaCursor<P>& c) const { return index(c.p, c.ph); }

  // Step s of a row's meta, which may end before the step's words do (the row's last step): the
  // words past the row's `words` read as zero.
  SK_BF16 SK_INLINE __m512i tail_index(const int32_t* mrow, int64_t s, int64_t words) const {
    alignas(16) int32_t w[4] = {};
    const MetaCursor<P> c(mrow, s);
    std::copy(c.p, std::min(c.p + (P::M == 4 ? 2 : 4), mrow + words), w);
    return index(w, c.ph);
  }

  // The x operands of the lanes from the step's columns x.
  SK_BF16 SK_INLINE __m512i gather(const uint16_t* x, __m512i idx) const {
    const __m512i lo = _mm512_permutex2var_epi16(_mm512_loadu_si512(x), idx, _mm512_loadu_si512(x + 32));
    if constexpr (P::kWindows == 1) {
      return lo;
    } else {
      const __m512i hi = _mm512_permutex2var_epi16(_mm512_loadu_si512(x + 64), idx, _mm512_loadu_si512(x + 96));
      return _mm512_mask_blend_epi16(P::kHalf1Words, lo, hi);
    }
  }
};

// Quantized values (int8, or int4 two per byte) with bf16 x: the bf16 scheme above on the
// integers. q - zero is widened to bf16, exactly (|q - zero| <= 255 fits bf16's 8 significant
// bits), the step's products are summed by vdpbf16ps and the sums scaled per group:
// - int8: 16 + 16 bytes sign-extended to fp32 (zero subtracted there), packed by one
//   vcvtne2ps2bf16; lanes in slot order.
// - int4, M = 4 (sigma): the step's 16 bytes broadcast to the four 128-bit lanes; one vpsrlvw
//   by 4 * lane puts nibble sigma(i) in the low bits of word i, and one vpermw looks up bf16(q -
//   zero) in a 32-word table (16 entries, twice: vpermw reads index bit 4, the next nibble's bit
//   0). Word i = 8 * lane + j holds bytes 2j, 2j + 1, nibbles 4j .. 4j + 3, so it takes slot
//   sigma(i) = 4 * (i % 8) + i / 8, and the pick tables follow sigma.
// - int4, M = 8 (slot order, which the 3-bit meta needs): one vpermb puts byte i / 2 in word i,
//   a vpsrlvw by 0 or 4 brings nibble i down, and the same lookup.
// Scale groups: group_kept a multiple of 32 (or one group per row): whole steps per group, the
// sums gathered per group and scaled when it ends (G = 0). Else every step's sums are scaled at
// once: G = 1, group_kept 32 (a group per step); G = 2, a multiple of 16 only: each 16-slot half
// of a step lies in one group, scaled half by half (a lane mask: which dword lanes of vdpbf16ps
// hold half 1); G = 4, 8 (1:4, 2:8 at group size 32; no zero points): the same by quarters
// (vdpbf16ps pairs never straddle a quarter).
// NOTE: 11008x4096, bf16 x, 2 threads, Zen 5, one process, 7 interleaved rounds, G = 0 -> G = 1
// (ratio of times): group_kept 32 (2:4 g64, 4:8 g64, 1:4 and 2:8 g128), 1 row 0.95-1.10x, 4 rows
// 1.24-1.38x; group_kept 64 and 128, 1 row 0.89-0.98x, 2 rows 0.97-1.04x, 4 rows 1.08-1.23x; one
// group per row, 2 rows 0.88-0.89x, 4 rows 0.91-1.12x. At G = 0 four rows keep twice the sums
// live. Hence G = 1 at group_kept 32, and for 3 and 4 rows wherever a row has several groups.

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
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 f = _mm512_sub_ps(iota, _mm512_set1_ps(static_cast<float>(zero)));
  return (__m512i)_mm512_cvtne2ps_pbh(f, f);
}

// One row's walk over its scale groups (G = 1: g the group of the current step, end the first slot
// past it), and the current groups' scales (by lane), int8 zeros (by half), int4 lookup tables
// (by half). Every helper is inlined, so all of it lives in registers.
// NOTE: written first with lambdas capturing by reference, GCC kept the sums on the stack:
// int4 g128 11008x4096 2.1 ms, against 1.2 ms for the bf16 kernel it should beat.
template <class S>
struct QGroups {
  const S* scales;         // the row's: bf16 (uint16_t) or fp32
  const int8_t* zeros;     // the row's, or nullptr
  int64_t last, gk, g = 0, end = 0;
  int gshift;  // log2(gk) where gk is a power of two, else -1
  __m512 scale, zlo, zhi;
  __m512i table_lo, table_hi;
};

inline float scale_f32(uint16_t s) { return bf16_to_f32(s); }
inline float scale_f32(float s) { return s; }

template <class P, int Q, int G, bool Z, class S>
SK_BF16 SK_INLINE void set_groups(QGroups<S>& st, int64_t g0, int64_t g1) {
  g0 = std::min(g0, st.last);  // (a tail half past the row keeps the last group)
  g1 = std::min(g1, st.last);
  st.scale = _mm512_mask_blend_ps(P::kHalf1, _mm512_set1_ps(scale_f32(st.scales[g0])),
                                  _mm512_set1_ps(scale_f32(st.scales[g1])));
  if constexpr (Z && Q == 8) {
    st.zlo = _mm512_set1_ps(static_cast<float>(st.zeros[g0]));
    st.zhi = _mm512_set1_ps(static_cast<float>(st.zeros[g1]));
  } else if constexpr (Z) {
    st.table_lo = int4_table(st.zeros[g0]);
    st.table_hi = G == 2 ? int4_table(st.zeros[g1]) : st.table_lo;
  }
}

// G >= 1: the group of step s (G = 1: loaded when it changes), of its halves (G = 2) or of its
// quarters (G = 4: group_kept 8, no zeros).
// Halves: group size 32 columns at 2:4 (16 slots, the common case), no zeros and a whole step:
// groups 2s and 2s + 1, their two bf16 scales one 32-bit broadcast, each half's moved to the top
// by a shift or a mask. Quarters: groups 4s .. 4s + 3, their four scales one 64-bit broadcast,
// and one vpermw puts each dword lane's scale in its top half (zeroing the rest). Else a
// division (other sizes: rare), and the tail step clamps its groups to the row's. fp32 scales:
// the four by one vpermps, the two by a blend.
// NOTE: 2:4 int4 g32, 11008x4096, 1 row, 2 threads, Zen 4: 0.83 -> 0.70 ms (was two scalar
// loads and broadcasts per step).
template <class P, int Q, int G, bool Z, class S>
SK_BF16 SK_INLINE void step_groups(QGroups<S>& st, int64_t s, bool whole) {
  if constexpr (G == 4 && std::is_same_v<S, float>) {
    static_assert(!Z, "quarters carry no zero points");
    __m128 four;
    if (whole) {
      four = _mm_loadu_ps(st.scales + 4 * s);
    } else {
      alignas(16) float g[4];
      for (int j = 0; j < 4; ++j) g[j] = st.scales[std::min((32 * s + 8 * j) / st.gk, st.last)];
      four = _mm_load_ps(g);
    }
    // (word 2d + 1 of the quarter table: dword lane d's quarter, so the dword holds it << 16)
    const __m512i quarter = _mm512_srli_epi32(_mm512_load_si512(kPick<P>.quarter), 16);
    st.scale = _mm512_permutexvar_ps(quarter, _mm512_castps128_ps512(four));
  } else if constexpr (G == 4) {
    static_assert(!Z, "quarters carry no zero points");
    uint64_t four;  // the four bf16 scales (memcpy: no aliasing or alignment assumption)
    if (whole) {
      std::memcpy(&four, st.scales + 4 * s, sizeof four);
    } else {
      uint16_t g[4];
      for (int j = 0; j < 4; ++j) g[j] = st.scales[std::min((32 * s + 8 * j) / st.gk, st.last)];
      std::memcpy(&four, g, sizeof four);
    }
    st.scale = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(
        0xAAAAAAAAu, _mm512_load_si512(kPick<P>.quarter), _mm512_set1_epi64(static_cast<int64_t>(four))));
  } else if constexpr (G == 1) {
    if (st.last == 0) return;  // one group per row
    const int64_t g = std::min(st.gshift >= 0 ? (32 * s) >> st.gshift : 32 * s / st.gk, st.last);
    if (g != st.g) {
      st.g = g;
      set_groups<P, Q, 1, Z>(st, g, g);
    }
  } else if constexpr (G == 2) {
    if (!Z && st.gk == 16 && whole) {
      if constexpr (std::is_same_v<S, float>) {
        st.scale = _mm512_mask_blend_ps(P::kHalf1, _mm512_set1_ps(st.scales[2 * s]), _mm512_set1_ps(st.scales[2 * s + 1]));
      } else {
        int32_t two;
        std::memcpy(&two, st.scales + 2 * s, sizeof two);
        const __m512i pair = _mm512_set1_epi32(two);
        const __m512i top = _mm512_and_si512(pair, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
        st.scale = _mm512_castsi512_ps(_mm512_mask_slli_epi32(top, static_cast<__mmask16>(~P::kHalf1), pair, 16));
      }
    } else {
      set_groups<P, Q, 2, Z>(st, 32 * s / st.gk, (32 * s + 16) / st.gk);
    }
  }
}

// The step's 32 weights as bf16 from its value bytes p, in the lane order of P.
template <class P, int Q, int G, bool Z, class S>
SK_BF16 SK_INLINE __m512i widen(const uint8_t* p, const QGroups<S>& st, __m512i nib) {
  if constexpr (Q == 8) {
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
    if constexpr (Z) {
      lo = _mm512_sub_ps(lo, st.zlo);
      hi = _mm512_sub_ps(hi, st.zhi);
    }
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  } else {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m512i words = P::Sigma ? _mm512_broadcast_i32x4(bytes)
                                   : _mm512_permutexvar_epi8(_mm512_load_si512(kPick<P>.spread),
                                                             _mm512_castsi128_si512(bytes));
    const __m512i q = _mm512_srlv_epi16(words, nib);
    if constexpr (Z && G == 2) {  // half 1 reads the second table: index bit 5, bit 4 cleared
      const __m512i half = _mm512_maskz_mov_epi16(P::kHalf1Words, _mm512_set1_epi16(32));
      const __m512i idx = _mm512_ternarylogic_epi32(q, _mm512_set1_epi16(15), half, 0xEA);
      return _mm512_permutex2var_epi16(st.table_lo, idx, st.table_hi);
    } else {
      return _mm512_permutexvar_epi16(q, st.table_lo);
    }
  }
}

// Step s of x rows x .. x + (R - 1) * ldb (x: row r0's first column): sums into chain C (s % 2;
// two chains, or one chain of vdpbf16ps waits for its latency), then (G = 1) the group bookkeeping.
// What x is and the scales are (the model's dtype): S the scales' element (uint16_t: bf16, or
// float); A8: x holds int8 activations (as bf16, exact); Parts: bf16 rows per row of x (fp32 x as
// hi, mid and lo, or hi and mid: split_x_f32), every product taken with each into the same sums.
template <class S_, bool A8_, int Parts_>
struct XMode {
  using S = S_;
  static constexpr bool A8 = A8_;
  static constexpr int Parts = Parts_;
};
using XBf16 = XMode<uint16_t, false, 1>;

// A8: sx holds the scale of each dword lane's x block for every step (16 floats a step, row stride
// lds): the sums are scaled by both every step. Parts > 1: row r's parts at x + r * ldb + p * ldb
// / Parts.
template <class P, int Q, int G, bool Z, int R, int C, class X = XBf16>
SK_BF16 SK_INLINE void q_step(__m512 (&acc)[2][R], __m512 (&part)[2][R], QGroups<typename X::S>& st, __m512i w,
                              __m512i idx, const uint16_t* x, int64_t ldb, int64_t s, int64_t kept,
                              const Picker<P>& pk, const float* sx = nullptr, int64_t lds = 0) {
  static_assert(!X::A8 || G >= 1, "int8 activations change scale every step");
  static_assert(!X::A8 || X::Parts == 1, "int8 activations are exact in one bf16 row");
  for (int r = 0; r < R; ++r) {
    const uint16_t* xr = x + r * ldb + P::kCols * s;
    __m512 d = G >= 1 ? _mm512_setzero_ps() : part[C][r];
    d = _mm512_dpbf16_ps(d, (__m512bh)w, (__m512bh)pk.gather(xr, idx));
    for (int p = 1; p < X::Parts; ++p)
      d = _mm512_dpbf16_ps(d, (__m512bh)w, (__m512bh)pk.gather(xr + p * (ldb / X::Parts), idx));
    if constexpr (G >= 1) {
      __m512 scale = st.scale;
      if constexpr (X::A8) scale = _mm512_mul_ps(scale, _mm512_loadu_ps(sx + r * lds + 16 * s));
      acc[C][r] = _mm512_fmadd_ps(d, scale, acc[C][r]);
    } else {
      part[C][r] = d;
    }
  }
  if constexpr (G == 0) {
    if (32 * (s + 1) >= st.end && 32 * (s + 1) < kept) {  // the group ends: scale its sums
      for (int r = 0; r < R; ++r) {
        acc[0][r] = _mm512_fmadd_ps(_mm512_add_ps(part[0][r], part[1][r]), st.scale, acc[0][r]);
        part[0][r] = part[1][r] = _mm512_setzero_ps();
      }
      st.end += st.gk;
      ++st.g;
      set_groups<P, Q, G, Z>(st, st.g, st.g);
    }
  }
}

// Output row o for x rows r0 .. r0 + R - 1. Q: 8 or 4 bits; G: scale groups per step (above);
// Z: zero points stored (else 0 for int8, 8 for int4); X: x and scales (q_step; sx: row 0's).
// Far: prefetch_stream's; with 2-4 rows of x it is the run-time far instead (a branch a step
// beside twice the work, and half the instances of this template: its file took 2 minutes).
template <class P, int Q, int G, bool Z, int R, bool Far, class X = XBf16>
SK_BF16 void rows_q(const NMLinearArgs& a, const uint16_t* xb, int64_t ldb, int64_t r0, int64_t o, bool far,
                    const float* sx = nullptr, int64_t lds = 0) {
  static_assert(R == 1 || !Far, "2-4 rows take far at run time");
  constexpr int B = Q == 8 ? 32 : 16;  // value bytes per step of 32 slots
  auto prefetch = [far](const uint8_t* p) SK_BF16 {
    if constexpr (R == 1) {
      prefetch_stream<Far, B>(p);
    } else if (far) {
      prefetch_stream<true, B>(p);
    } else {
      prefetch_stream<false, B>(p);
    }
  };
  const int64_t kept = a.k / P::M * P::N, full = kept / 32;
  const uint8_t* v = static_cast<const uint8_t*>(a.values) + o * (kept * Q / 8);
  const int32_t* mrow = a.meta + o * a.meta_words;
  const Picker<P> pk;
  const __m512i nib = _mm512_load_si512(kPick<P>.nib);
  QGroups<typename X::S> st;
  st.scales = static_cast<const typename X::S*>(a.scales) + o * a.groups;
  st.zeros = a.zeros ? a.zeros + o * a.groups : nullptr;
  st.last = a.groups - 1;
  st.gk = a.groups == 1 ? INT64_MAX : a.group_kept;
  st.end = st.gk;
  st.gshift = st.gk > 0 && (st.gk & (st.gk - 1)) == 0 ? __builtin_ctzll(static_cast<uint64_t>(st.gk)) : -1;
  st.scale = st.zlo = st.zhi = _mm512_setzero_ps();
  st.table_lo = st.table_hi = int4_table(8);
  if constexpr (G <= 1) set_groups<P, Q, G, Z>(st, 0, 0);
  __m512 acc[2][R], part[2][R];
  for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = part[0][r] = part[1][r] = _mm512_setzero_ps();
  const uint16_t* x0 = xb + r0 * ldb;
  const float* sxr = X::A8 ? sx + r0 * lds : nullptr;
  int64_t s = 0;
  MetaCursor<P> mc(mrow, 0);
  for (; s + 2 <= full; s += 2) {
    step_groups<P, Q, G, Z>(st, s, true);
    prefetch(v + B * s);
    q_step<P, Q, G, Z, R, 0, X>(acc, part, st, widen<P, Q, G, Z>(v + B * s, st, nib), pk.index(mc), x0, ldb, s, kept, pk, sxr, lds);
    mc.next();
    step_groups<P, Q, G, Z>(st, s + 1, true);
    prefetch(v + B * (s + 1));
    q_step<P, Q, G, Z, R, 1, X>(acc, part, st, widen<P, Q, G, Z>(v + B * (s + 1), st, nib), pk.index(mc), x0, ldb,
                             s + 1, kept, pk, sxr, lds);
    mc.next();
  }
  if (s < full) {
    step_groups<P, Q, G, Z>(st, s, true);
    q_step<P, Q, G, Z, R, 0, X>(acc, part, st, widen<P, Q, G, Z>(v + B * s, st, nib), pk.index(mc), x0, ldb, s, kept, pk, sxr, lds);
  }
  if (const int64_t rest = kept - 32 * full; rest > 0) {  // the first `rest` slots of one more step
    alignas(32) uint8_t tail[32] = {};  // zero bytes past the row: zero weights, or weights on x's zero padding
    std::memcpy(tail, v + B * full, rest * Q / 8);
    step_groups<P, Q, G, Z>(st, full, false);
    q_step<P, Q, G, Z, R, 1, X>(acc, part, st, widen<P, Q, G, Z>(tail, st, nib),
                             pk.tail_index(mrow, full, a.meta_words), x0, ldb, full, kept, pk, sxr, lds);
  }
  const float b = a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f;
  for (int r = 0; r < R; ++r) {
    __m512 sum = _mm512_add_ps(acc[0][r], acc[1][r]);
    if constexpr (G == 0) sum = _mm512_fmadd_ps(_mm512_add_ps(part[0][r], part[1][r]), st.scale, sum);
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

inline int64_t values_bytes(const NMLinearArgs& a) {
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

// f(pattern) with the Pattern of a's N:M (nm_avx512_pattern); Q: the values' bits (int4 with
// M = 4 takes the sigma order).
template <int Q, class F>
void with_pattern(const NMLinearArgs& a, F f) {
  switch (a.m * 16 + a.n) {
    case 4 * 16 + 2: return f(Pattern<2, 4, Q == 4>());
    case 4 * 16 + 1: return f(Pattern<1, 4, Q == 4>());
    case 8 * 16 + 2: return f(Pattern<2, 8>());
    default: return f(Pattern<4, 8>());
  }
}

// X::A8 (int8 activations): sx the scale of each 32-column block of x [rows, ldb / 32], spread
// here to the lanes of every step (q_step).
template <int Q, int G, bool Z, class X>
void quantized_as(const NMLinearArgs& a, const uint16_t* xb, int64_t ldb, const float* sx) {
  with_pattern<Q>(a, [&](auto p) {
    using P = decltype(p);
    std::vector<float> lanes;
    int64_t lds = 0;
    if constexpr (X::A8) {  // sx: ldb / 32 blocks a row, kCols / 32 a step
      const int64_t steps = ldb / P::kCols;
      lds = 16 * steps;
      lanes.resize(a.rows * lds);
      spread_block_scales(sx, a.rows * steps, P::kCols / 32, P::xblock, lanes.data());
    }
    each_row_far(a, [&](int64_t o, int64_t r0, auto rows, auto far) {
      constexpr int R = decltype(rows)::value;
      constexpr bool F = R == 1 && decltype(far)::value;  // (2-4 rows: far passed at run time)
      if constexpr (X::A8) {
        rows_q<P, Q, G, Z, R, F, X>(a, xb, ldb, r0, o, far, lanes.data(), lds);
      } else if constexpr (X::Parts == 3) {  // (only one row takes it: nm_avx512_supported)
        for (int r = 0; r < R; ++r) rows_q<P, Q, G, Z, 1, decltype(far)::value, X>(a, xb, ldb, r0 + r, o, far);
      } else if (G == 0 && R >= 3 && a.groups > 1) {
        rows_q<P, Q, 1, Z, R, F, X>(a, xb, ldb, r0, o, far);
      } else {
        rows_q<P, Q, G, Z, R, F, X>(a, xb, ldb, r0, o, far);
      }
    });
  });
}

// G (above): 0 for one group per row or a group over several steps, 1 for a group per step
// (group_kept 32), 2 for a multiple of 16, 4 for 8 (no zeros: nm_avx512_supported admits nothing
// else). quantized_as runs 3 and 4 rows of x at G = 1 where G would be 0 with several groups, and
// int8 activations (their scale changes every step) at G = 1 for G = 0.
template <int Q, class X>
void quantized_q(const NMLinearArgs& a, const uint16_t* xb, int64_t ldb, const float* sx) {
  constexpr int G0 = X::A8 ? 1 : 0;
  const int g = a.groups == 1 || (a.group_kept % 32 == 0 && a.group_kept != 32) ? G0
                : a.group_kept == 32                                             ? 1
                : a.group_kept % 16 == 0                                         ? 2
                                                                                 : 4;
  if (a.zeros) {
    return g == 0   ? quantized_as<Q, G0, true, X>(a, xb, ldb, sx)
           : g == 1 ? quantized_as<Q, 1, true, X>(a, xb, ldb, sx)
                    : quantized_as<Q, 2, true, X>(a, xb, ldb, sx);
  }
  return g == 0   ? quantized_as<Q, G0, false, X>(a, xb, ldb, sx)
         : g == 1 ? quantized_as<Q, 1, false, X>(a, xb, ldb, sx)
         : g == 2 ? quantized_as<Q, 2, false, X>(a, xb, ldb, sx)
                  : quantized_as<Q, 4, false, X>(a, xb, ldb, sx);
}

template <class X>
void quantized_x(const NMLinearArgs& a, const uint16_t* xb, int64_t ldb, const float* sx) {
  return a.qbits == 8 ? quantized_q<8, X>(a, xb, ldb, sx) : quantized_q<4, X>(a, xb, ldb, sx);
}

}  // namespace

// Quantized values with fp32 x (nm_linear_avx512_f32.cpp): int8 activations (sx the blocks'
// scales) or x as a.x_parts bf16 parts (split_x_f32), fp32 scales.
void nm_quantized_f32x_avx512(const NMLinearArgs& a, const uint16_t* xb, int64_t ldb, const float* sx);

}  // namespace sparsekern::detail
#endif
