// Block-sparse decode (up to 4 rows, bsr_linear_op.h) for quantized blocks (int8, int4 two per
// byte) on AVX2+FMA(+F16C): the machines without AVX-512 (there: bsr_linear_quant_avx512.cpp),
// and blocks wider than 128 columns on AVX-512 too. fp32 products and sums; bf16 / fp16 x
// widened to fp32 once per call.
//
// Groups are runs of a multiple of 8 columns (op_checks.h), so a step of 8 columns (one fp32
// vector) lies in one group whatever the group size: per step the stored integers widened to
// fp32 (int8: vpmovsxbd + cvt; int4: the step's 4 bytes broadcast, lane j shifted right by 4j and
// masked to its nibble, cvt), one FMA per x row into the group's partial dot, and where the group
// ends acc += s * (dot - z * sum(x over the group)): the scale applied once per group, the zero
// point through sums of x made once per block (int4 always has one: 8 when symmetric). int4 with
// groups of whole 16-column runs (the common case) takes steps of 16 columns instead: one
// vpmovzxbd of 8 bytes, the low nibbles are the even columns and the high ones the odd columns,
// against x reordered to match once per call (permute_even_odd).
// Per stored block the block's scales (and zero points) are widened to fp32 into a small buffer
// (a group's costs one broadcast from L1); x is read from L1 by the FMAs (16 registers cannot
// hold a block's x segment for 4 rows). Partial sums stay 8-lane across a block row's blocks
// and are reduced once. Blocks are prefetched kPrefetch bytes ahead (the distance measured for
// the AVX-512 kernels, bsr_linear_quant_bf16_avx512.cpp).
//
// NOTE: AMD EPYC family 26 model 2 (Zen 5), 2 vCPUs, SPARSEKERN_CPU_ISA per call, block 32x32 at 90%,
// group 32, weights streamed (>= 96 MB in rotation), 7 interleaved rounds, medians, us per call
// (bench/bench_bsr_quant_decode.py), portable loop -> this file (AVX-512 fp32 path in brackets):
//   4096x4096 1 row:  int8 bf16 x 2496 -> 114 (154), fp32 x 2525 -> 107 (128);
//                     int4 bf16 x 2532 -> 80 (135), fp32 x 2519 -> 82 (130).
//   11008x4096 1 row: int8 bf16 x 6698 -> 245 (361); int4 bf16 x 6852 -> 193 (325), zeros 202.
//   4 rows: 4096x4096 169-190 (AVX-512 fp32 path 162-213), 11008x4096 438-493 (446-536).
// Hot (one weight), 4096x4096 1 row bf16 x: int8 54 us, int4 71 -> 57 with the 16-column int4
// steps; sc's fields in locals (stores through __m256 may alias them): int8 90 -> 54.
// Prefetch off, 11008x4096 1 row streamed, separate processes (noisy): int8 372-439 us vs
// 242-405 with it, int4 281-352 vs 193-292.
//
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/bsr_linear.h"
#include "cpu/linear_avx2.h"
#include "cpu/parallel.h"

namespace sparsekern::detail {
namespace {

constexpr int kPrefetch = 8192;

// Zero points: none (int8 symmetric), 8 (int4 symmetric), stored (int8 zeros).
enum Zero { kNone, kEight, kStored };

// Per-thread scratch: bm x R partial sums, R x groups sums of x, the block's scales and zeros.
struct Scratch {
  __m256* acc;   // [bm * R]
  __m256* xsum;  // [R * groups]
  float* s;      // [bm * groups]
  float* z;      // [bm * groups] (kStored)
};

// The scales of block b as fp32 into sc.s and (zeros) its zero points into sc.z. Exact: the
// weight is then (q - z) * s with one rounding, as the reference computes it.
template <DType T>
SK_AVX2 inline __attribute__((always_inline)) void block_scales(const BSRLinearArgs& a, int64_t b, const Scratch& sc,
                                                                bool zeros) {
  const int n = a.bm * a.groups;
  const int64_t off = b * n;
  const auto* s = static_cast<const typename Elem<T>::type*>(a.scales) + off;
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_store_ps(sc.s + j, load8<T>(s + j));
    if (zeros) {
      const __m128i z8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.zeros + off + j));
      _mm256_store_ps(sc.z + j, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(z8)));
    }
  }
  for (; j < n; ++j) {
    sc.s[j] = load_f32(a.scales, off + j, T);
    if (zeros) sc.z[j] = a.zeros[off + j];
  }
}

SK_AVX2 inline __attribute__((always_inline)) void scales_of(const BSRLinearArgs& a, int64_t b, const Scratch& sc,
                                                             bool zeros) {
  switch (a.dtype) {
    case DType::kBF16: return block_scales<DType::kBF16>(a, b, sc, zeros);
    case DType::kF16: return block_scales<DType::kF16>(a, b, sc, zeros);
    default: return block_scales<DType::kF32>(a, b, sc, zeros);
  }
}

// Chunk v (columns 8v .. 8v + 7) of a stored block row as fp32 integers.
template <int Q>
SK_AVX2 inline __m256 chunk(const uint8_t* wr, int v, __m256i shifts) {
  if constexpr (Q == 8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + 8 * v))));
  } else {
    int32_t w;
    std::memcpy(&w, wr + 4 * v, 4);
    const __m256i n = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w), shifts), _mm256_set1_epi32(15));
    return _mm256_cvtepi32_ps(n);
  }
}

// Block row rb for x rows r0 .. r0 + R - 1 (fp32, row stride ldx).
using RowFn = void (*)(const BSRLinearArgs&, const float*, int64_t, int64_t, int64_t, const Scratch&);

// A step is a chunk of 8 columns, or (EO: int4, groups of whole 16-column runs) 16 columns whose
// 8 bytes give all 16 weights from one vpmovzxbd, the even columns from the low nibbles and the
// odd ones from the high nibbles, against x permuted once per call to match (even_odd).
// CPG: steps per group (0: the block row's, at run time).
template <int Q, bool EO, Zero Z, int R, int CPG>
SK_AVX2 void quant_rows(const BSRLinearArgs& a, const float* x, int64_t ldx, int64_t r0, int64_t rb,
                        const Scratch& sc) {
  constexpr int W = EO ? 16 : 8;  // columns per step
  const int bm = a.bm, bk = a.bk, groups = a.groups;
  const int cpg = CPG ? CPG : bk / groups / W;
  const int64_t kb = a.k / bk, row_bytes = bk * Q / 8, bsz = static_cast<int64_t>(bm) * row_bytes;
  const uint8_t* blocks = static_cast<const uint8_t*>(a.blocks);
  // Locals: stores through __m256 (may_alias) would make the compiler reload sc's fields.
  __m256* const accs = sc.acc;
  __m256* const xsum = sc.xsum;
  const float* const scl = sc.s;
  const float* const zer = sc.z;
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256 eight = _mm256_set1_ps(8.0f);
  for (int i = 0; i < bm * R; ++i) accs[i] = _mm256_setzero_ps();
  int64_t begin, end;
  bsr_row_range(a, rb, &begin, &end);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t c = a.col[b];
    if (c < 0 || c >= kb) continue;
    const uint8_t* blk = blocks + b * bsz;
    for (int64_t o = 0; o < bsz; o += 64) _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetch + o), _MM_HINT_T0);
    scales_of(a, b, sc, Z == kStored);
    const float* xs[R];
    for (int r = 0; r < R; ++r) xs[r] = x + (r0 + r) * ldx + c * bk;
    if constexpr (Z != kNone) {
      for (int r = 0; r < R; ++r)
        for (int g = 0; g < groups; ++g) {
          const float* p = xs[r] + W * g * cpg;
          __m256 t = _mm256_loadu_ps(p);
          for (int v = 1; v < cpg * W / 8; ++v) t = _mm256_add_ps(t, _mm256_loadu_ps(p + 8 * v));
          xsum[r * groups + g] = t;
        }
    }
    for (int i = 0; i < bm; ++i) {
      const uint8_t* wr = blk + i * row_bytes;
      const float* s = scl + i * groups;
      const float* z = zer + i * groups;
      __m256 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = accs[i * R + r];
      for (int g = 0; g < groups; ++g) {
        const int ch0 = g * cpg;
        __m256 part[R];
        if constexpr (EO) {
          __m256 odd[R];
          const __m256i n0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + 8 * ch0)));
          const __m256 qe0 = _mm256_cvtepi32_ps(_mm256_and_si256(n0, _mm256_set1_epi32(15)));
          const __m256 qo0 = _mm256_cvtepi32_ps(_mm256_srli_epi32(n0, 4));
          for (int r = 0; r < R; ++r) {
            part[r] = _mm256_mul_ps(qe0, _mm256_loadu_ps(xs[r] + 16 * ch0));
            odd[r] = _mm256_mul_ps(qo0, _mm256_loadu_ps(xs[r] + 16 * ch0 + 8));
          }
          for (int v = 1; v < cpg; ++v) {
            const int ch = ch0 + v;
            const __m256i n = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + 8 * ch)));
            const __m256 qe = _mm256_cvtepi32_ps(_mm256_and_si256(n, _mm256_set1_epi32(15)));
            const __m256 qo = _mm256_cvtepi32_ps(_mm256_srli_epi32(n, 4));
            for (int r = 0; r < R; ++r) {
              part[r] = _mm256_fmadd_ps(qe, _mm256_loadu_ps(xs[r] + 16 * ch), part[r]);
              odd[r] = _mm256_fmadd_ps(qo, _mm256_loadu_ps(xs[r] + 16 * ch + 8), odd[r]);
            }
          }
          for (int r = 0; r < R; ++r) part[r] = _mm256_add_ps(part[r], odd[r]);
        } else {
          const __m256 q0 = chunk<Q>(wr, ch0, shifts);
          for (int r = 0; r < R; ++r) part[r] = _mm256_mul_ps(q0, _mm256_loadu_ps(xs[r] + 8 * ch0));
          for (int v = 1; v < cpg; ++v) {
            const __m256 q = chunk<Q>(wr, ch0 + v, shifts);
            for (int r = 0; r < R; ++r) part[r] = _mm256_fmadd_ps(q, _mm256_loadu_ps(xs[r] + 8 * (ch0 + v)), part[r]);
          }
        }
        const __m256 sb = _mm256_broadcast_ss(s + g);
        for (int r = 0; r < R; ++r) {
          if constexpr (Z == kEight) part[r] = _mm256_fnmadd_ps(eight, xsum[r * groups + g], part[r]);
          if constexpr (Z == kStored) {
            part[r] = _mm256_fnmadd_ps(_mm256_broadcast_ss(z + g), xsum[r * groups + g], part[r]);
          }
          acc[r] = _mm256_fmadd_ps(part[r], sb, acc[r]);
        }
      }
      for (int r = 0; r < R; ++r) accs[i * R + r] = acc[r];
    }
  }
  for (int i = 0; i < bm; ++i)
    for (int r = 0; r < R; ++r) bsr_store(a, r0 + r, rb * bm + i, hsum(accs[i * R + r]));
}

template <int Q, bool EO, Zero Z, int R>
RowFn of_cpg(int cpg) {
  switch (cpg) {
    case 1: return &quant_rows<Q, EO, Z, R, 1>;
    case 2: return &quant_rows<Q, EO, Z, R, 2>;
    case 4: return &quant_rows<Q, EO, Z, R, 4>;
    case 8: return &quant_rows<Q, EO, Z, R, 8>;
    case 16: return &quant_rows<Q, EO, Z, R, 16>;
    default: return &quant_rows<Q, EO, Z, R, 0>;
  }
}

// int4 steps of 16 columns (quant_rows): every group a whole number of them.
inline bool even_odd(const BSRLinearArgs& a) { return a.qbits == 4 && (a.bk / a.groups) % 16 == 0; }

// Rows of fp32 x (row stride ld, k a multiple of 16) with the columns of every 16 reordered even
// ones first, then odd ones, in place.
SK_AVX2 void permute_even_odd(float* x, int64_t rows, int64_t k, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < k; c += 16) {
      float* p = x + r * ld + c;
      const __m256 lo = _mm256_loadu_ps(p), hi = _mm256_loadu_ps(p + 8);
      const __m256 e = _mm256_shuffle_ps(lo, hi, 0x88), o = _mm256_shuffle_ps(lo, hi, 0xDD);  // 0 2 8 10 | 4 6 12 14
      _mm256_storeu_ps(p, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8)));
      _mm256_storeu_ps(p + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), 0xD8)));
    }
}

template <int R>
RowFn pick(const BSRLinearArgs& a) {
  const int cpg = a.bk / a.groups / 8;
  if (a.qbits == 8) return a.zeros ? of_cpg<8, false, kStored, R>(cpg) : of_cpg<8, false, kNone, R>(cpg);
  if (even_odd(a)) return a.zeros ? of_cpg<4, true, kStored, R>(cpg / 2) : of_cpg<4, true, kEight, R>(cpg / 2);
  return a.zeros ? of_cpg<4, false, kStored, R>(cpg) : of_cpg<4, false, kEight, R>(cpg);
}

}  // namespace

bool bsr_linear_decode_quant_avx2(const BSRLinearArgs& a) {
  if (a.qbits != 8 && a.qbits != 4) return false;
  if (a.groups < 1 || a.bk % a.groups || (a.bk / a.groups) % 8) return false;  // op_checks.h rejects these
  std::vector<float> xf;
  const float* x = static_cast<const float*>(a.x);
  int64_t ldx = a.ldx;
  if (a.dtype != DType::kF32 || even_odd(a)) {
    xf.resize(a.rows * a.k);
    convert_rows_f32(a.x, a.rows, a.k, a.ldx, a.dtype, xf.data(), a.k, a.threads);
    if (even_odd(a)) permute_even_odd(xf.data(), a.rows, a.k, a.k);
    x = xf.data();
    ldx = a.k;
  }
  const RowFn fn[4] = {pick<1>(a), pick<2>(a), pick<3>(a), pick<4>(a)};
  // Per thread (32-byte aligned: per is a multiple of 8 floats): 4 * bm partial sums, 4 * groups
  // sums of x, then the scales and zero points.
  const size_t sg = (static_cast<size_t>(a.bm) * a.groups + 7) / 8 * 8;
  const size_t nacc = static_cast<size_t>(a.bm) * 4 * 8, nxs = static_cast<size_t>(a.groups) * 4 * 8;
  bsr_decode_rows_in_fours(a, nacc + nxs + 2 * sg, [&](float* mine, int64_t rb, int64_t r0, int n) {
    const Scratch sc{reinterpret_cast<__m256*>(mine), reinterpret_cast<__m256*>(mine + nacc), mine + nacc + nxs,
                     mine + nacc + nxs + sg};
    fn[n - 1](a, x, ldx, r0, rb, sc);
  });
  return true;
}

}  // namespace sparsekern::detail
#endif
