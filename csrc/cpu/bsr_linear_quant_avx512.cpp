// Block-sparse decode (up to 16 / 32 rows, bsr_linear_op.h) for quantized blocks (int8, int4 two
// per byte) on AVX-512.
//
// bf16 x on AVX-512 BF16, blocks 32 / 64 / 96 / 128 wide, one group per block row or groups of
// whole 32-column chunks (the common LLM case): vdpbf16ps on exact bf16 images of the stored
// values (0x4300 | nibble = 128 + nibble), offsets and zeros removed per group through sums of x;
// see bsr_linear_quant_bf16_avx512.cpp. Everything else, here: fp32 products and sums (bf16 / fp16 x
// widened to fp32 once per call):
//
// Per stored block the x segment under it is loaded once (into registers) for all bm rows of the
// block, and the block's scales (and zero points) are widened to fp32 into a small buffer, so
// each group costs one broadcast from L1, not a scalar bf16 conversion:
// - int8, groups of whole 16-column chunks (or one per block row): per group the integer dot
//   sum(q * x) in fp32 lanes, then acc += s * (dot - z * sum(x over the group)) (the x sums
//   once per block, zeros only): the scale is applied once per group, not per weight.
// - int4, groups of whole 32-column chunks (or one): x is deinterleaved once per block into even
//   and odd columns (vpermt2ps), so a chunk's 16 bytes give the even weights from their low
//   nibbles and the odd ones from their high nibbles; each nibble looks up (q - z) * s directly in
//   a 16-entry fp32 table built once per group (vpermps reads an index's low 4 bits: no mask, no
//   int -> float conversion, zero and scale already applied).
// - other group sizes (runs of 8 columns, int4 runs of 16, runs that cut a chunk): per-lane scale
//   and zero vectors picked from the block row's by vpermps, weights dequantized per chunk, then
//   the FMAs.
// Partial chunks (bk not a multiple of 16 / 32) load masked x, zero past the block, so the
// weights there (zero bytes: a finite table entry) add nothing.
//
// NOTE: the numbers of both paths are in bsr_linear_quant_bf16_avx512.cpp ("fp32 path": this
// file's kernels, timed there in the same rounds).
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

#define SK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// Per-thread scratch: bm x R partial sums, the current block's scales and zero points as fp32.
struct Scratch {
  __m512* acc;          // [bm * R]
  float* s;             // [bm * groups]
  float* z;             // [bm * groups]: zero points (int4 always, int8 with zeros)
  const int32_t* gidx;  // other group sizes: lane -> group, 16 per chunk
};

// The scales of block b as fp32 into sc.s and (need_z) its zero points into sc.z (symmetric int4:
// 8). Exact: the weight is then (q - z) * s with one rounding, as the reference computes it.
template <DType T>
SK_AVX512 void block_scales(const BSRLinearArgs& a, int64_t b, const Scratch& sc, bool need_z) {
  const int n = a.bm * a.groups;
  const int64_t off = b * n;
  for (int j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1);
    __m512 s;
    if constexpr (T == DType::kF32) {
      s = _mm512_maskz_loadu_ps(m, static_cast<const float*>(a.scales) + off + j);
    } else {
      const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(a.scales) + off + j);
      if constexpr (T == DType::kBF16) {
        s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      } else {
        s = _mm512_cvtph_ps(h);
      }
    }
    _mm512_store_ps(sc.s + j, s);
    if (need_z) {
      const __m512 z = a.zeros ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, a.zeros + off + j)))
                               : _mm512_set1_ps(8.0f);
      _mm512_store_ps(sc.z + j, z);
    }
  }
}

SK_AVX512 inline void scales_of(const BSRLinearArgs& a, int64_t b, const Scratch& sc, bool need_z) {
  switch (a.dtype) {
    case DType::kBF16: return block_scales<DType::kBF16>(a, b, sc, need_z);
    case DType::kF16: return block_scales<DType::kF16>(a, b, sc, need_z);
    default: return block_scales<DType::kF32>(a, b, sc, need_z);
  }
}

template <int R>
SK_AVX512 inline void store_rows(const BSRLinearArgs& a, int64_t r0, int64_t rb, const Scratch& sc) {
  for (int i = 0; i < a.bm; ++i)
    for (int r = 0; r < R; ++r) bsr_store(a, r0 + r, rb * a.bm + i, _mm512_reduce_add_ps(sc.acc[i * R + r]));
}

// Block row rb for x rows r0 .. r0 + R - 1 (fp32, row stride ldx).
using RowFn = void (*)(const BSRLinearArgs&, const float*, int64_t, int64_t, int64_t, const Scratch&);

// int8, NV chunks of 16 columns (the last one 8 wide when bk % 16 == 8), groups of whole chunks.
template <bool Z, int R, int NV>
SK_AVX512 void q8_rows(const BSRLinearArgs& a, const float* x, int64_t ldx, int64_t r0, int64_t rb,
                       const Scratch& sc) {
  const int bm = a.bm, bk = a.bk, groups = a.groups;
  const int cpg = groups == 1 ? NV : bk / groups / 16;  // chunks per group
  const int64_t kb = a.k / bk, bsz = static_cast<int64_t>(bm) * bk;
  const __mmask16 last = bk % 16 ? 0x00ff : 0xffff;
  const int8_t* blocks = static_cast<const int8_t*>(a.blocks);
  for (int i = 0; i < bm * R; ++i) sc.acc[i] = _mm512_setzero_ps();
  int64_t begin, end;
  bsr_row_range(a, rb, &begin, &end);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t c = a.col[b];
    if (c < 0 || c >= kb) continue;
    scales_of(a, b, sc, Z);
    __m512 xv[R][NV];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v)
        xv[r][v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : __mmask16(0xffff), x + (r0 + r) * ldx + c * bk + 16 * v);
    __m512 xsum[R][NV];  // x summed per group (zeros only)
    if constexpr (Z) {
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < NV; ++v) xsum[r][v / cpg] = v % cpg ? _mm512_add_ps(xsum[r][v / cpg], xv[r][v]) : xv[r][v];
    }
    const int8_t* blk = blocks + b * bsz;
    for (int i = 0; i < bm; ++i) {
      const int8_t* wr = blk + static_cast<int64_t>(i) * bk;
      const float* s = sc.s + i * groups;
      const float* z = sc.z + i * groups;
      __m512 acc[R], part[R];
      for (int r = 0; r < R; ++r) acc[r] = sc.acc[i * R + r];
      for (int v = 0; v < NV; ++v) {
        const __m128i bytes = v == NV - 1 && bk % 16 ? _mm_maskz_loadu_epi8(0xff, wr + 16 * v)
                                                      : _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + 16 * v));
        const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
        const bool first = v % cpg == 0;
        for (int r = 0; r < R; ++r) part[r] = first ? _mm512_mul_ps(q, xv[r][v]) : _mm512_fmadd_ps(q, xv[r][v], part[r]);
        if (v % cpg == cpg - 1 || v == NV - 1) {  // the group ends: s * (dot - z * sum(x))
          const int g = v / cpg;
          const __m512 sb = _mm512_set1_ps(s[g]);
          for (int r = 0; r < R; ++r) {
            if constexpr (Z) part[r] = _mm512_fnmadd_ps(_mm512_set1_ps(z[g]), xsum[r][g], part[r]);
            acc[r] = _mm512_fmadd_ps(part[r], sb, acc[r]);
          }
        }
      }
      for (int r = 0; r < R; ++r) sc.acc[i * R + r] = acc[r];
    }
  }
  store_rows<R>(a, r0, rb, sc);
}

// Lane j of a 32-column chunk's even (odd) half: column 2j (2j + 1).
alignas(64) constexpr int32_t kEven[16] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
alignas(64) constexpr int32_t kOdd[16] = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
alignas(64) constexpr float kIota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// x columns c0 .. c0 + 31 (the first `cols` of them, the rest zero) as even and odd halves.
SK_AVX512 inline void deinterleave(const float* p, int cols, __m512* even, __m512* odd) {
  const __mmask16 mlo = cols >= 16 ? __mmask16(0xffff) : __mmask16((1u << cols) - 1);
  const __mmask16 mhi = cols >= 32 ? __mmask16(0xffff) : cols > 16 ? __mmask16((1u << (cols - 16)) - 1) : 0;
  const __m512 lo = _mm512_maskz_loadu_ps(mlo, p), hi = _mm512_maskz_loadu_ps(mhi, p + 16);
  *even = _mm512_permutex2var_ps(lo, _mm512_load_si512(kEven), hi);
  *odd = _mm512_permutex2var_ps(lo, _mm512_load_si512(kOdd), hi);
}

// int4, NV chunks of 32 columns (16 bytes; the last one narrower when bk % 32), groups of whole
// chunks: per group a table t[q] = (q - z) * s, looked up by each nibble.
template <int R, int NV>
SK_AVX512 void q4_rows(const BSRLinearArgs& a, const float* x, int64_t ldx, int64_t r0, int64_t rb,
                       const Scratch& sc) {
  const int bm = a.bm, bk = a.bk, groups = a.groups;
  const int cpg = groups == 1 ? NV : bk / groups / 32;
  const int64_t kb = a.k / bk, bsz = static_cast<int64_t>(bm) * (bk / 2);
  const int tail = bk % 32 ? bk % 32 : 32;  // columns of the last chunk
  const __mmask16 last_bytes = static_cast<__mmask16>((1u << (tail / 2)) - 1);
  const uint8_t* blocks = static_cast<const uint8_t*>(a.blocks);
  const __m512 iota = _mm512_load_ps(kIota);
  for (int i = 0; i < bm * R; ++i) sc.acc[i] = _mm512_setzero_ps();
  int64_t begin, end;
  bsr_row_range(a, rb, &begin, &end);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t c = a.col[b];
    if (c < 0 || c >= kb) continue;
    scales_of(a, b, sc, true);
    __m512 xe[R][NV], xo[R][NV];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v)
        deinterleave(x + (r0 + r) * ldx + c * bk + 32 * v, v == NV - 1 ? tail : 32, &xe[r][v], &xo[r][v]);
    const uint8_t* blk = blocks + b * bsz;
    for (int i = 0; i < bm; ++i) {
      const uint8_t* wr = blk + static_cast<int64_t>(i) * (bk / 2);
      const float* s = sc.s + i * groups;
      const float* z = sc.z + i * groups;
      __m512 acc[R], acc2[R], t = iota;
      for (int r = 0; r < R; ++r) acc[r] = sc.acc[i * R + r], acc2[r] = _mm512_setzero_ps();
      for (int v = 0; v < NV; ++v) {
        if (v % cpg == 0) {
          const int g = v / cpg;
          t = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z[g])), _mm512_set1_ps(s[g]));
        }
        const __m128i bytes = v == NV - 1 && tail < 32 ? _mm_maskz_loadu_epi8(last_bytes, wr + 16 * v)
                                                        : _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + 16 * v));
        const __m512i lo = _mm512_cvtepu8_epi32(bytes);  // vpermps reads the low nibble
        const __m512 wl = _mm512_permutexvar_ps(lo, t), wh = _mm512_permutexvar_ps(_mm512_srli_epi32(lo, 4), t);
        for (int r = 0; r < R; ++r) {
          acc[r] = _mm512_fmadd_ps(wl, xe[r][v], acc[r]);
          acc2[r] = _mm512_fmadd_ps(wh, xo[r][v], acc2[r]);
        }
      }
      for (int r = 0; r < R; ++r) sc.acc[i * R + r] = _mm512_add_ps(acc[r], acc2[r]);
    }
  }
  store_rows<R>(a, r0, rb, sc);
}

// Any group size (runs of 8, 16, ... columns that cut a chunk): per chunk, the scale and zero of
// each lane's group picked from the block row's (vpermps by sc.gidx), weights dequantized, FMAs.
// x segments in memory (arrays indexed at run time), chunks of 16 (int8) or 32 (int4) columns.
template <int Q, bool Z, int R>
SK_AVX512 void any_rows(const BSRLinearArgs& a, const float* x, int64_t ldx, int64_t r0, int64_t rb,
                        const Scratch& sc) {
  constexpr int W = Q == 8 ? 16 : 32;  // columns per chunk
  const int bm = a.bm, bk = a.bk, groups = a.groups, nv = (bk + W - 1) / W;
  const int tail = bk % W ? bk % W : W;
  const int64_t kb = a.k / bk, row_bytes = bk * Q / 8, bsz = static_cast<int64_t>(bm) * row_bytes;
  const __mmask16 gmask = static_cast<__mmask16>((1u << groups) - 1);
  const __mmask16 last_bytes = static_cast<__mmask16>((1u << (tail * Q / 8)) - 1);
  const uint8_t* blocks = static_cast<const uint8_t*>(a.blocks);
  for (int i = 0; i < bm * R; ++i) sc.acc[i] = _mm512_setzero_ps();
  int64_t begin, end;
  bsr_row_range(a, rb, &begin, &end);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t c = a.col[b];
    if (c < 0 || c >= kb) continue;
    scales_of(a, b, sc, Z);
    __m512 xe[R][8], xo[R][8];  // int8: xe the chunk; int4: its even / odd columns
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < nv; ++v) {
        const float* p = x + (r0 + r) * ldx + c * bk + W * v;
        const int cols = v == nv - 1 ? tail : W;
        if constexpr (Q == 8) {
          xe[r][v] = _mm512_maskz_loadu_ps(cols == 16 ? __mmask16(0xffff) : __mmask16((1u << cols) - 1), p);
        } else {
          deinterleave(p, cols, &xe[r][v], &xo[r][v]);
        }
      }
    const uint8_t* blk = blocks + b * bsz;
    for (int i = 0; i < bm; ++i) {
      const uint8_t* wr = blk + static_cast<int64_t>(i) * row_bytes;
      const __m512 s = _mm512_maskz_loadu_ps(gmask, sc.s + i * groups);
      const __m512 z = Z ? _mm512_maskz_loadu_ps(gmask, sc.z + i * groups) : _mm512_setzero_ps();
      __m512 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = sc.acc[i * R + r];
      for (int v = 0; v < nv; ++v) {
        const __m512i gi = _mm512_load_si512(sc.gidx + 16 * v);
        const __m512 sv = _mm512_permutexvar_ps(gi, s), zv = _mm512_permutexvar_ps(gi, z);
        const __m128i bytes = v == nv - 1 && tail < W ? _mm_maskz_loadu_epi8(last_bytes, wr + 16 * v)
                                                       : _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + 16 * v));
        if constexpr (Q == 8) {
          __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
          if constexpr (Z) q = _mm512_sub_ps(q, zv);
          const __m512 w = _mm512_mul_ps(q, sv);
          for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(w, xe[r][v], acc[r]);
        } else {
          const __m512i lo = _mm512_cvtepu8_epi32(bytes);
          const __m512 ql = _mm512_cvtepi32_ps(_mm512_and_si512(lo, _mm512_set1_epi32(15)));
          const __m512 qh = _mm512_cvtepi32_ps(_mm512_srli_epi32(lo, 4));
          const __m512 wl = _mm512_mul_ps(_mm512_sub_ps(ql, zv), sv), wh = _mm512_mul_ps(_mm512_sub_ps(qh, zv), sv);
          for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(wh, xo[r][v], _mm512_fmadd_ps(wl, xe[r][v], acc[r]));
        }
      }
      for (int r = 0; r < R; ++r) sc.acc[i * R + r] = acc[r];
    }
  }
  store_rows<R>(a, r0, rb, sc);
}

template <bool Z, int R>
RowFn q8_of(int nv) {
  switch (nv) {
    case 1: return &q8_rows<Z, R, 1>;
    case 2: return &q8_rows<Z, R, 2>;
    case 3: return &q8_rows<Z, R, 3>;
    case 4: return &q8_rows<Z, R, 4>;
    case 5: return &q8_rows<Z, R, 5>;
    case 6: return &q8_rows<Z, R, 6>;
    case 7: return &q8_rows<Z, R, 7>;
    default: return &q8_rows<Z, R, 8>;
  }
}

template <int R>
RowFn q4_of(int nv) {
  switch (nv) {
    case 1: return &q4_rows<R, 1>;
    case 2: return &q4_rows<R, 2>;
    case 3: return &q4_rows<R, 3>;
    default: return &q4_rows<R, 4>;
  }
}

template <int R>
RowFn pick(const BSRLinearArgs& a) {
  const int gs = a.bk / a.groups;
  if (a.qbits == 8) {
    if (a.groups == 1 || gs % 16 == 0) return a.zeros ? q8_of<true, R>((a.bk + 15) / 16) : q8_of<false, R>((a.bk + 15) / 16);
    return a.zeros ? &any_rows<8, true, R> : &any_rows<8, false, R>;
  }
  if (a.groups == 1 || gs % 32 == 0) return q4_of<R>((a.bk + 31) / 32);
  return &any_rows<4, true, R>;  // int4 always has a zero point (8 when symmetric)
}

}  // namespace

bool bsr_linear_decode_quant_avx512(const BSRLinearArgs& a) {
  if (a.qbits != 8 && a.qbits != 4) return false;
  // At most 8 chunks a block row (q8_of / q4_of, xe[R][8]) and 16 groups (gmask): wider blocks (the
  // raw op takes them; BlockSparseWeight does not make them) go to the AVX2 kernel.
  if (a.bk > 128) return false;
  if (bsr_linear_decode_quant_bf16_avx512(a)) return true;
  // One row: the AVX2 kernel (bsr_linear_quant_avx2.cpp) is faster than this file's fp32 path.
  // NOTE: Zen 5 (EPYC family 26 model 2), 2 threads, block 32x32 at 90 %, group 32, streamed
  // weights, medians of 7 interleaved rounds, us, this file vs AVX2, 1 row: 4096x4096 int8 fp32 x
  // 106 vs 86, int4 116 vs 80, int4 with zeros fp16 x 138 vs 98; 11008x4096 int8 295 vs 225, int4
  // 304 vs 204, int4 with zeros fp16 x 349 vs 196 (all 12 cases 1.2-1.8x). At 2-3 rows they
  // trade (0.89-1.41x), at 4 this file is 0.96-1.11x faster. Prefetching blocks 8 KB ahead here
  // changed nothing (0.93-1.02x).
  if (a.rows == 1) return false;
  std::vector<float> xf;
  const float* x = static_cast<const float*>(a.x);
  int64_t ldx = a.ldx;
  if (a.dtype != DType::kF32) {
    xf.resize(a.rows * a.k);
    convert_rows_f32(a.x, a.rows, a.k, a.ldx, a.dtype, xf.data(), a.k, a.threads);
    x = xf.data();
    ldx = a.k;
  }
  const RowFn fn[4] = {pick<1>(a), pick<2>(a), pick<3>(a), pick<4>(a)};
  // Lane -> group of each chunk (any_rows).
  alignas(64) int32_t gidx[8 * 16];
  const int w = a.qbits == 8 ? 16 : 32, gs = a.bk / a.groups;
  for (int v = 0; v < 8; ++v)
    for (int l = 0; l < 16; ++l) gidx[16 * v + l] = std::min((w * v + (a.qbits == 8 ? l : 2 * l)) / gs, a.groups - 1);
  // Per thread (64-byte aligned: per is a multiple of 16 floats): 4 * bm partial sums, then the
  // scales and zero points.
  const size_t sg = (static_cast<size_t>(a.bm) * a.groups + 15) / 16 * 16;
  const size_t per = static_cast<size_t>(a.bm) * 4 * 16 + 2 * sg;
  bsr_decode_rows_in_fours(a, per, [&](float* mine, int64_t rb, int64_t r0, int n) {
    const Scratch sc{reinterpret_cast<__m512*>(mine), mine + a.bm * 4 * 16, mine + a.bm * 4 * 16 + sg, gidx};
    fn[n - 1](a, x, ldx, r0, rb, sc);
  });
  return true;
}

}  // namespace sparsekern::detail
#endif
