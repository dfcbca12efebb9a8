// Quantized block-sparse decode (up to 32 rows, bsr_linear_op.h) for bf16 x on AVX-512 BF16: vdpbf16ps on exact bf16
// images of int4 / int8 values, blocks 32 / 64 / 96 / 128 wide, groups of whole 32-column chunks
// (or one per block row). Everything else: bsr_linear_quant_avx512.cpp (fp32 products).
//
// NOTE: AMD EPYC Zen 4, 2 threads, 1 row, block 32x32 at 90%, group 32, bf16 x, weights streamed
// (>= 400 MB in rotation), 7 rounds in one process, every variant in each round, medians; GB/s of
// blocks + scales + zeros + indices; "fp32 path": bsr_linear_quant_avx512.cpp's kernels, same rounds:
//   4096x4096:   bf16 blocks (bsr_linear_avx512.cpp) 114 us, 29 GB/s
//                int8 70 us (25 GB/s; fp32 path 130), zeros 75 (159); int4 40 us (24 GB/s;
//                fp32 path 104), zeros 44 (123): int8 1.6x, int4 2.9x the bf16 block kernel.
//   11008x4096:  bf16 blocks 291 us, 31 GB/s; int8 161 us (30 GB/s; fp32 path 308), zeros 195
//                (417); int4 94 us (27 GB/s; fp32 path 271), zeros 109 (318): int8 1.8x, int4 3.1x.
// Most of the streamed gain is the software prefetch (kPrefetch; the bf16 block kernel has none).
// Hot (L2), 2 threads, 4096x4096, the op's fixed cost included (~10 us at 1 thread): int4 27 us
// vs fp32 path 39, int8 36 vs 39, bf16 blocks 29: vdpbf16ps itself pays off for int4 only.
// Before this file (portable loop): 4096x4096 5370 us.
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/bsr_linear.h"
#include "cpu/parallel.h"

namespace sparsekern::detail {
namespace {

// Per-thread scratch: the accumulators, then the block's scales and zoff + zero points as fp32.
struct Sums {
  __m512* acc;
  float* s;
  float* z;
};

// ---- bf16 x on AVX-512 BF16: vdpbf16ps on exact bf16 images of the quantized values ----
//
// A 64-byte load of a block is UL units of 32 columns (int4: 4 units of 16 bytes, int8: 2 of
// 32); the block's units are its rows' 32-column chunks in order, so unit u is chunk u % NV of
// row u / NV and its scale is scales[u / cpg] (cpg: units per group). Read as 32 words, the
// load's four nibbles per word become four bf16 vectors by one shift and one vpternlog each:
//   int4: 0x4300 | n = 128 + n; int8 (q + 128 = 16 hu + l): 0x4300 | l = 128 + l and
//   0x4500 | hu = 2048 + 16 hu (hu with its top bit flipped in the same vpternlog), so the
//   pair sums to q + 2304.
// vdpbf16ps against x permuted to the same column order (once per call, for all of K) leaves
// each unit's sum in its own 128-bit (int4) / 256-bit (int8) lane group of an fp32 vector, so
// scale and zero apply per load, not per row: acc += s * (dot - (zoff + z) * sum(x)), the dot
// chain starting at -(zoff + z) * sum(x) (sums of x per lane precomputed with x).
// x per call, per row: planes of K / 32 pieces (int4: 4 planes of 16 bytes, nibble k of word w
// is column 4w + k; int8: 2 planes of 32 bytes, even and odd columns), then the negated lane
// sums of x (int4: 4 fp32 per chunk, int8: 8).
#define SK_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

template <int Q>
struct QB {
  static constexpr int UL = Q == 4 ? 4 : 2;        // units per 64-byte load
  static constexpr int PB = Q == 4 ? 16 : 32;      // bytes of one piece (a chunk's share of a plane)
  static constexpr int NX = Q == 4 ? 4 : 2;        // x planes
  static constexpr float ZOFF = Q == 4 ? 128.0f : 2304.0f;
};

// The x pieces of chunks g0 .. g0 + NV - 1 of one plane, as the lanes of load pattern p: lane
// group j holds chunk (UL * p + j) % NV.
template <int Q, int NV, int P>
SK_BF16 inline __m512i pattern(const uint8_t* pl) {
  if constexpr (Q == 4) {
    if constexpr (NV == 1) return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pl)));
    else if constexpr (NV == 2) return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pl)));
    else if constexpr (NV == 4) return _mm512_loadu_si512(pl);
    else {  // NV 3: pieces 0 1 2 (the fourth read is padding or the next chunk), lanes (4p + j) % 3
      const __m512i v = _mm512_loadu_si512(pl);
      return _mm512_shuffle_i64x2(v, v, P == 0 ? 0x24 : P == 1 ? 0x49 : 0x92);
    }
  } else {
    if constexpr (NV == 1) return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pl)));
    else if constexpr (NV == 3 && P == 1)  // chunks 2, 0
      return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pl + 64))),
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pl)), 1);
    else return _mm512_loadu_si512(pl + 32 * ((2 * P) % NV));  // chunks 2p % NV, 2p % NV + 1
  }
}

// Scale index of lane l in pattern p, relative to (UL * t) / cpg.
template <int Q>
inline int scale_lane(int p, int cpg, int l) {
  constexpr int UL = QB<Q>::UL;
  return (UL * p + l / (16 / UL)) / cpg - (UL * p) / cpg;
}

struct XPlanes {
  const uint8_t* base;  // row r at base + r * row_bytes; plane j at + j * plane_bytes
  int64_t row_bytes, plane_bytes;
};

// Blocks are prefetched this many bytes ahead, scales 8 blocks ahead: with the hardware
// prefetchers alone streamed int4 read ~11 GB/s (4096x4096 below: 84 us; 2 KB ahead 57, 4 KB 48,
// 8 KB 40, 16 KB 40).
constexpr int kPrefetch = 8192;

template <int Q, int NV>
constexpr int kPatterns = NV == 3 ? 3 : Q == 8 && NV == 4 ? 2 : 1;  // x layouts of a block's loads

// Pattern P of the x pieces (and the start of the dot chains) of rows r0 .. r0 + R - 1 under
// the block at column c.
template <int Q, bool Z, int R, int NV, int P>
SK_BF16 inline __attribute__((always_inline)) void load_pattern(const XPlanes& xp, int64_t r0, int64_t c,
                                                                __m512i (*xv)[kPatterns<Q, NV>][QB<Q>::NX],
                                                                __m512 (*d0)[kPatterns<Q, NV>]) {
  using B = QB<Q>;
  for (int r = 0; r < R; ++r) {
    const uint8_t* row = xp.base + (r0 + r) * xp.row_bytes + c * NV * B::PB;
    const __m512 xs = _mm512_castsi512_ps(pattern<Q, NV, P>(row + B::NX * xp.plane_bytes));  // -sum(x)
    // Symmetric: times zoff + (8 for int4); zeros: times zoff + z per load.
    d0[r][P] = Z ? xs : _mm512_mul_ps(xs, _mm512_set1_ps(B::ZOFF + (Q == 4 ? 8.0f : 0.0f)));
    for (int k = 0; k < B::NX; ++k) xv[r][P][k] = pattern<Q, NV, P>(row + k * xp.plane_bytes);
  }
}

// Load t (pattern P) of the block at blk: its units' dots, scaled, into acc[t * R + r].
template <int Q, bool Z, int R, int NV, int P>
SK_BF16 inline __attribute__((always_inline)) void dq_step(const uint8_t* blk, int t, uint64_t mask, int cpg,
                                                           const __m512i (*xv)[kPatterns<Q, NV>][QB<Q>::NX],
                                                           const __m512 (*d0)[kPatterns<Q, NV>], __m512i sidx,
                                                           const Sums& sc) {
  constexpr int UL = QB<Q>::UL;
  const __m512i lo4 = _mm512_set1_epi16(0x000f), e128 = _mm512_set1_epi16(0x4300);
  const __m512i e2048 = _mm512_set1_epi16(0x4508);  // int8 high nibbles: 0x4500, top bit flipped
  const __m512i w = ~mask ? _mm512_maskz_loadu_epi8(mask, blk + 64 * t) : _mm512_loadu_si512(blk + 64 * t);
  _mm_prefetch(reinterpret_cast<const char*>(blk + 64 * t + kPrefetch), _MM_HINT_T0);
  __m512i n[4];
  n[0] = _mm512_ternarylogic_epi32(w, lo4, e128, 0xEA);  // (a & b) | c
  if constexpr (Q == 4) {
    n[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), lo4, e128, 0xEA);
    n[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 8), lo4, e128, 0xEA);
    n[3] = _mm512_or_si512(_mm512_srli_epi16(w, 12), e128);
  } else {  // b ? (a ^ c) : c
    n[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), lo4, e2048, 0x6A);
    n[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 8), lo4, e128, 0xEA);
    n[3] = _mm512_xor_si512(_mm512_srli_epi16(w, 12), e2048);
  }
  const int base = (UL * t) / cpg;
  const __m512 sv = _mm512_permutexvar_ps(sidx, _mm512_loadu_ps(sc.s + base));
  __m512 zv = _mm512_setzero_ps();
  if constexpr (Z) zv = _mm512_permutexvar_ps(sidx, _mm512_loadu_ps(sc.z + base));
  for (int r = 0; r < R; ++r) {
    __m512 d = Z ? _mm512_mul_ps(zv, d0[r][P]) : d0[r][P];
    for (int k = 0; k < 4; ++k) d = _mm512_dpbf16_ps(d, (__m512bh)n[k], (__m512bh)xv[r][P][Q == 4 ? k : k / 2]);
    sc.acc[t * R + r] = _mm512_fmadd_ps(sv, d, sc.acc[t * R + r]);
  }
}

// Block row rb, x rows r0 .. r0 + R - 1. Z: stored zeros (else zoff + 0 or zoff + 8).
template <int Q, bool Z, int R, int NV>
SK_BF16 void dq_rows(const BSRLinearArgs& a, const XPlanes& xp, int64_t r0, int64_t rb, const Sums& sc) {
  using B = QB<Q>;
  constexpr int UL = B::UL, NP = kPatterns<Q, NV>;
  const int bm = a.bm, groups = a.groups, cpg = NV / groups;
  const int units = bm * NV, T = (units + UL - 1) / UL, tail_units = units - (T - 1) * UL;
  const uint64_t tail_mask = tail_units == UL ? ~uint64_t{0} : (uint64_t{1} << (tail_units * 64 / UL)) - 1;
  const int64_t kb = a.k / a.bk, bsz = static_cast<int64_t>(units) * 64 / UL;
  const uint8_t* blocks = static_cast<const uint8_t*>(a.blocks);
  const uint16_t* scales = static_cast<const uint16_t*>(a.scales);
  __m512i sidx[NP];
  for (int p = 0; p < NP; ++p) {
    alignas(64) int32_t ix[16];
    for (int l = 0; l < 16; ++l) ix[l] = scale_lane<Q>(p, cpg, l);
    sidx[p] = _mm512_load_si512(ix);
  }
  for (int i = 0; i < T * R; ++i) sc.acc[i] = _mm512_setzero_ps();
  int64_t begin, end;
  bsr_row_range(a, rb, &begin, &end);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t c = a.col[b];
    if (c < 0 || c >= kb) continue;
    // The block's scales (and zoff + zero) as fp32.
    const int ns = bm * groups;
    _mm_prefetch(reinterpret_cast<const char*>(scales + (b + 8) * ns), _MM_HINT_T0);
    if constexpr (Z) _mm_prefetch(reinterpret_cast<const char*>(a.zeros + (b + 8) * ns), _MM_HINT_T0);
    for (int j = 0; j < ns; j += 16) {
      const __mmask16 m = ns - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (ns - j)) - 1);
      const __m256i h = _mm256_maskz_loadu_epi16(m, scales + b * ns + j);
      _mm512_store_ps(sc.s + j, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
      if constexpr (Z) {
        const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, a.zeros + b * ns + j)));
        _mm512_store_ps(sc.z + j, _mm512_add_ps(z, _mm512_set1_ps(B::ZOFF)));
      }
    }
    __m512i xv[R][NP][B::NX];
    __m512 d0[R][NP];
    load_pattern<Q, Z, R, NV, 0>(xp, r0, c, xv, d0);
    if constexpr (NP > 1) load_pattern<Q, Z, R, NV, 1>(xp, r0, c, xv, d0);
    if constexpr (NP > 2) load_pattern<Q, Z, R, NV, 2>(xp, r0, c, xv, d0);
    const uint8_t* blk = blocks + b * bsz;
    int t = 0;
    for (; t + NP < T; t += NP) {
      dq_step<Q, Z, R, NV, 0>(blk, t, ~uint64_t{0}, cpg, xv, d0, sidx[0], sc);
      if constexpr (NP > 1) dq_step<Q, Z, R, NV, 1>(blk, t + 1, ~uint64_t{0}, cpg, xv, d0, sidx[NP > 1 ? 1 : 0], sc);
      if constexpr (NP > 2) dq_step<Q, Z, R, NV, 2>(blk, t + 2, ~uint64_t{0}, cpg, xv, d0, sidx[NP > 2 ? 2 : 0], sc);
    }
    // The last NP loads or fewer; the very last one masked when the block ends inside it.
    for (int p = 0; t < T; ++t, ++p) {
      const uint64_t m = t == T - 1 ? tail_mask : ~uint64_t{0};
      if (p == 0) dq_step<Q, Z, R, NV, 0>(blk, t, m, cpg, xv, d0, sidx[0], sc);
      if constexpr (NP > 1) if (p == 1) dq_step<Q, Z, R, NV, 1>(blk, t, m, cpg, xv, d0, sidx[NP > 1 ? 1 : 0], sc);
      if constexpr (NP > 2) if (p == 2) dq_step<Q, Z, R, NV, 2>(blk, t, m, cpg, xv, d0, sidx[NP > 2 ? 2 : 0], sc);
    }
  }
  // Each unit's lane group summed, units summed per row.
  alignas(64) float lanes[16];
  for (int r = 0; r < R; ++r) {
    float row_sum = 0.0f;
    for (int u = 0; u < units; ++u) {
      if (u % UL == 0) {
        __m512 v = sc.acc[(u / UL) * R + r];
        v = _mm512_add_ps(v, _mm512_shuffle_ps(v, v, 0x4E));
        v = _mm512_add_ps(v, _mm512_shuffle_ps(v, v, 0xB1));
        if constexpr (Q == 8) v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));
        _mm512_store_ps(lanes, v);
      }
      row_sum += lanes[(u % UL) * (16 / UL)];
      if (u % NV == NV - 1) {
        bsr_store(a, r0 + r, rb * bm + u / NV, row_sum);
        row_sum = 0.0f;
      }
    }
  }
}

using DqFn = void (*)(const BSRLinearArgs&, const XPlanes&, int64_t, int64_t, const Sums&);

template <int Q, bool Z, int R>
DqFn dq_of(int nv) {
  switch (nv) {
    case 1: return &dq_rows<Q, Z, R, 1>;
    case 2: return &dq_rows<Q, Z, R, 2>;
    case 3: return &dq_rows<Q, Z, R, 3>;
    default: return &dq_rows<Q, Z, R, 4>;
  }
}

template <int R>
DqFn dq_pick(const BSRLinearArgs& a) {
  const int nv = a.bk / 32;
  if (a.qbits == 8) return a.zeros ? dq_of<8, true, R>(nv) : dq_of<8, false, R>(nv);
  return a.zeros ? dq_of<4, true, R>(nv) : dq_of<4, false, R>(nv);
}

// The x planes of one row (see above).
template <int Q>
SK_BF16 void x_planes(const uint16_t* x, int64_t kc, uint8_t* out, int64_t plane_bytes) {
  using B = QB<Q>;
  alignas(64) int16_t perm[32];  // word 8k + w <- 4w + k (int4); 16p + w <- 2w + p (int8)
  for (int i = 0; i < 32; ++i) perm[i] = Q == 4 ? static_cast<int16_t>(4 * (i % 8) + i / 8) : static_cast<int16_t>(2 * (i % 16) + i / 16);
  const __m512i pidx = _mm512_load_si512(perm);
  const __m512i sel = Q == 4 ? _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
                             : _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i neg1 = _mm512_set1_epi16(static_cast<int16_t>(0xBF80));  // bf16 -1
  for (int64_t g = 0; g < kc; ++g) {
    const __m512i v = _mm512_loadu_si512(x + 32 * g);
    alignas(64) uint8_t pv[64];
    _mm512_store_si512(pv, _mm512_permutexvar_epi16(pidx, v));
    for (int k = 0; k < B::NX; ++k) std::memcpy(out + k * plane_bytes + B::PB * g, pv + B::PB * k, B::PB);
    // -(x[2m] + x[2m + 1]) per lane m, then the lane sums: int4 8 columns, int8 4.
    __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)v, (__m512bh)neg1);
    d = _mm512_add_ps(d, _mm512_shuffle_ps(d, d, 0xB1));
    if constexpr (Q == 4) d = _mm512_add_ps(d, _mm512_shuffle_ps(d, d, 0x4E));
    d = _mm512_permutexvar_ps(sel, d);
    if constexpr (Q == 4) _mm_storeu_ps(reinterpret_cast<float*>(out + B::NX * plane_bytes + 16 * g), _mm512_castps512_ps128(d));
    else _mm256_storeu_ps(reinterpret_cast<float*>(out + B::NX * plane_bytes + 32 * g), _mm512_castps512_ps256(d));
  }
}

bool applies(const BSRLinearArgs& a) {
  if (a.dtype != DType::kBF16 || a.bk % 32 || a.bk > 128 || active_isa() < Isa::kAvx512Bf16) return false;
  return a.groups == 1 || (a.bk / a.groups) % 32 == 0;
}

void decode_dq(const BSRLinearArgs& a) {
  const int64_t kc = a.k / 32;
  const int pb = a.qbits == 4 ? 16 : 32, planes = a.qbits == 4 ? 5 : 3;
  const int64_t plane_bytes = kc * pb + 64;  // 64: the NV 3 pattern's over-read
  const int64_t row_bytes = plane_bytes * planes;
  std::vector<uint8_t> xbuf(row_bytes * a.rows + 64);
  uint8_t* xb = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(xbuf.data()) + 63) & ~uintptr_t{63});
  for (int64_t r = 0; r < a.rows; ++r) {
    const uint16_t* xr = static_cast<const uint16_t*>(a.x) + r * a.ldx;
    if (a.qbits == 4) x_planes<4>(xr, kc, xb + r * row_bytes, plane_bytes);
    else x_planes<8>(xr, kc, xb + r * row_bytes, plane_bytes);
  }
  const XPlanes xp{xb, row_bytes, plane_bytes};
  const DqFn fn[4] = {dq_pick<1>(a), dq_pick<2>(a), dq_pick<3>(a), dq_pick<4>(a)};
  const int ul = a.qbits == 4 ? 4 : 2;
  const int64_t t = (static_cast<int64_t>(a.bm) * (a.bk / 32) + ul - 1) / ul;
  // Per thread: 4 * T accumulators, then the scales and zoff + zeros (+ 16: the window loads).
  const size_t sg = (static_cast<size_t>(a.bm) * a.groups + 31) / 16 * 16;
  const size_t per = static_cast<size_t>(t) * 4 * 16 + 2 * sg;
  bsr_decode_rows_in_fours(a, per, [&](float* mine, int64_t rb, int64_t r0, int n) {
    const Sums sc{reinterpret_cast<__m512*>(mine), mine + t * 4 * 16, mine + t * 4 * 16 + sg};
    fn[n - 1](a, xp, r0, rb, sc);
  });
}

}  // namespace

bool bsr_linear_decode_quant_bf16_avx512(const BSRLinearArgs& a) {
  if (a.qbits != 8 && a.qbits != 4) return false;
  if (!applies(a)) return false;
  decode_dq(a);
  return true;
}

}  // namespace sparsekern::detail
#endif
