// N:M decode kernel for AVX2+FMA(+F16C) when 8 kept slots cover whole groups: 1:4, 2:4, 1:8,
// 2:8, 4:8. x operands are picked with in-lane permutes (vpermilps) from a per-call reordering
// of x; no vpermps, no gathers, no blend tree for M = 4.
//
// A super-step is 16 kept slots = 16/n whole groups, held in two vectors A and B of 8 lanes.
// Lane l of a ymm sits in half h = l / 4, and vpermilps lets it pick any of the 4 floats of its
// own half by the low 2 bits of its control lane: the meta field itself, moved to bit 0 with
// one vpsrlvd. So x is reordered per call into vectors whose half h holds a 4-column quad of
// the group of the lanes of that half: vector (t, k, p) = [quad p of group of lane 4h + k*n]
// for t in {A, B}, k < 4/n groups per half, p < m/4 quads per group. M = 4: one vpermilps per
// k, combined with immediate blends; M = 8: two (low and high quad), joined by a vblendvps on
// index bit 2.
//
// Which slots land in which lanes depends on how the weights are widened to fp32 (the x
// reordering follows it, so the choice is free): fp32 and fp16 load 8 + 8 slots in order;
// bf16 with n = 2, 4 widens by vpunpckl/hwd with zero (A = slots 0-3 | 8-11, B = 4-7 | 12-15:
// one shuffle per 8 values instead of vpmovzxwd + vpslld), and 1:4, 1:8 by masking the 16-bit
// pairs (A = even slots: vpslld 16, B = odd slots: vpand; no shuffle at all, and with n = 1
// every lane has its own group anyway). The meta of a super-step is one broadcast from memory:
// 2-bit fields, one word; 3-bit fields (10 per word), the 4 words that hold its 16 fields, each
// lane picking its word with a vpermilps from a 5-phase table (16 slots advance 1.6 words).
// NOTE: timed in one standalone process (kernel only, no torch), 4096x4096, 1 row, 2 threads,
// weights rotated through 96 MiB, on the shared 2-core Zen 3 EPYC (3.2 GHz), ms before -> after
// this layout (vpmovzxwd + vpslld widening, one 8-slot step, meta through a GPR broadcast):
// bf16 2:4 0.742 -> 0.680, 2:8 0.627 -> 0.557, 1:4 0.480 -> 0.410, 1:8 0.452 -> 0.427; fp32
// within the run-to-run noise (memory-bound: 2:4 1.16-1.23 vs 1.22-1.28, 2:8 0.67-0.69 vs
// 0.70-0.71). Measured throughputs behind it (independent ops, cycles per instruction):
// vpmovzxwd ymm 1.26, vpbroadcastd ymm from xmm 1.0, vpermps 1.34; vpermilps, vblendvps,
// vpunpcklwd, vpsrlvd, vpslld 0.5; vpand, vblendps, vpcmpgtd 0.25.
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/linear_avx2.h"
#include "cpu/nm_linear.h"
#include "cpu/parallel.h"

namespace sparsekern::detail {
namespace {

constexpr int kPrefetch = 2048;  // bytes ahead on the values stream. NOTE: +10-15% at 1 row.

// How 16 consecutive kept slots are spread over the lanes of vectors A (t = 0) and B (t = 1).
enum class Lanes { kInOrder, kUnpack, kEvenOdd };

template <DType T, int N>
constexpr Lanes lanes_for() {
  return T != DType::kBF16 ? Lanes::kInOrder : N == 1 ? Lanes::kEvenOdd : Lanes::kUnpack;
}

// Slot (0..15 in the super-step) of lane l of vector t.
constexpr int lane_slot(Lanes L, int t, int l) {
  return L == Lanes::kInOrder ? 8 * t + l : L == Lanes::kUnpack ? 4 * t + (l < 4 ? l : l + 4) : 2 * l + t;
}

// 16 slots as fp32 in the lane order of L.
template <DType T, Lanes L>
SK_AVX2 inline void load16(const typename Elem<T>::type* p, __m256& a, __m256& b) {
  if constexpr (T != DType::kBF16) {
    a = load8<T>(p);
    b = load8<T>(p + 8);
  } else {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (L == Lanes::kUnpack) {
      a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), raw));
      b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), raw));
    } else {
      a = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
      b = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
    }
  }
}

// 16 quantized slots (Q = 8: 16 int8; Q = 4: 8 bytes of nibbles, slot 2j low) as fp32 integers
// in slot order, zero point not yet applied.
template <int Q>
SK_AVX2 inline void load16q(const uint8_t* p, __m256& a, __m256& b) {
  __m128i q;
  if constexpr (Q == 8) {
    q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
  } else {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), low = _mm_set1_epi8(15);
    q = _mm_unpacklo_epi8(_mm_and_si128(raw, low), _mm_and_si128(_mm_srli_epi16(raw, 4), low));
    a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
    b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)));
  }
}

// Per-lane meta tables. 2-bit: the shift of each lane's field in the super-step's word. 3-bit:
// for each of the 5 phases (super-step index mod 5; its first field sits at 6 * phase mod 10 in
// word j0 / 10), the word (0..2 after j0 / 10) and the shift of each lane's field.
struct MetaTables {
  alignas(32) int32_t shift2[2][8];
  alignas(32) int32_t word3[5][2][8];
  alignas(32) int32_t shift3[5][2][8];
};

constexpr MetaTables make_tables(Lanes L) {
  MetaTables t{};
  for (int v = 0; v < 2; ++v) {
    for (int l = 0; l < 8; ++l) {
      const int slot = lane_slot(L, v, l);
      t.shift2[v][l] = 2 * slot;
      for (int ph = 0; ph < 5; ++ph) {
        const int f = (16 * ph) % 10 + slot;
        t.word3[ph][v][l] = f / 10;
        t.shift3[ph][v][l] = 3 * (f % 10);
      }
    }
  }
  return t;
}

template <Lanes L>
struct Tables {
  static constexpr MetaTables value = make_tables(L);
};

SK_AVX2 inline __m256i ld(const int32_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }

// In-lane pick from quad P of vector K of a vector's reordered x (vectors of M / 4 quads each).
template <int M, int K, int P>
SK_AVX2 inline __m256 pick(const float* xs, __m256i idx) {
  return _mm256_permutevar_ps(_mm256_loadu_ps(xs + (K * (M / 4) + P) * 8), idx);
}

// Lane l of the result from pick k = its group's rank in its half; quad P of each group.
template <int N, int M, int P>
SK_AVX2 inline __m256 quad_x(const float* xs, __m256i idx) {
  if constexpr (N == 4) {
    return pick<M, 0, P>(xs, idx);
  } else if constexpr (N == 2) {  // vector k serves lanes 2k, 2k+1 (+4)
    return _mm256_blend_ps(pick<M, 0, P>(xs, idx), pick<M, 1, P>(xs, idx), 0xCC);
  } else {  // vector k serves lanes k, k+4
    const __m256 a = _mm256_blend_ps(pick<M, 0, P>(xs, idx), pick<M, 1, P>(xs, idx), 0x22);
    const __m256 b = _mm256_blend_ps(pick<M, 2, P>(xs, idx), pick<M, 3, P>(xs, idx), 0x88);
    return _mm256_blend_ps(a, b, 0xCC);
  }
}

// x operands of one vector's 8 lanes; xs: that vector's reordered x (8m/n floats). M = 8: the
// low and high quads are joined once, after the immediate blends (one vblendvps per vector).
// NOTE: vblendvps and vpermilps share the same two pipes on this Zen 3 (each 2 per cycle
// alone, 2 per cycle mixed; vblendps 4 per cycle), so blendv before the immediate blends
// cost 2:8 bf16 an extra 0.5 cycle per 8 values.
template <int N, int M>
SK_AVX2 inline __m256 vec_x(const float* xs, __m256i idx, __m256 bit2) {
  if constexpr (M == 4) {
    return quad_x<N, 4, 0>(xs, idx);
  } else {
    return _mm256_blendv_ps(quad_x<N, 8, 0>(xs, idx), quad_x<N, 8, 1>(xs, idx), bit2);
  }
}

// Rows r0 .. r0+R-1 of x against output row o.
// NOTE: interleaving 2 or 4 output rows (more weight streams in flight) was slower at 1 row:
// 2:4 bf16 1.27 ns per 8 values with 1 row, 1.8 with 2, 1.5-1.8 with 4; fp32 within noise.
// Q = 8 / 4: quantized values (T then only names x's type, read through xq and load_f32); each
// 8-slot vector of a super-step lies in one scale group (a.groups == 1 or a.group_kept % 8 ==
// 0). H: the two halves of a step may lie in different groups (group_kept % 16 != 0), else they
// share one. With H, the group's scale s and -zero * s turn the integers into weights with one
// FMA per 8. Without it, the steps of a group accumulate (q - zero) * x and the group's sum is
// scaled once, when the next group starts and after the row: one subtraction per 8 instead of
// the FMA, and 2 FMAs a group instead of 2 a step. NOTE: Zen 3, bf16 x, 1 row, time over the bf16
// 2:4 kernel's in the same process, FMA per step -> scaled per group: 1024x4096 hot in L3, 1
// thread: int8 1.54 -> 1.35, int8 g128 1.98 -> 1.53, int4 g128 1.99 -> 1.78 (a second pair
// of runs: 1.49-1.53 -> 1.36-1.47, g128 1.67-1.84 -> 1.55-1.67); 11008x4096 from memory, 2
// threads (bench/bench_quant_decode.py, old and new builds alternating, 2 runs each; speed as a
// fraction of the bf16 kernel's): int8 0.68-0.94 -> 0.76-1.06, int8 g128 0.65-0.70 -> 0.65-0.90,
// int4 g128 0.54-0.62 -> 0.65-0.81. This VM's noise is that wide. Still compute-bound there
// (~9 cycles per 16 slots): not below the bf16 kernel's time on AVX2.
// NOTE: tracking both halves where they share a group made 2:4 int4 g32 (bf16 x, 11008x4096,
// 1 row) 2.3 -> 4.9 ms: the scalar scale reload is a large part of a step.
template <DType T, int N, int M, int R, int Q = 0, bool H = false>
SK_AVX2 void quads_rows(const NMLinearArgs& a, const float* xq, int64_t ldq, int64_t r0, int64_t o) {
  constexpr Lanes L = Q ? Lanes::kInOrder : lanes_for<T, N>();
  constexpr int SS = 16 * M / N;  // reordered x floats per super-step (two vectors)
  using E = typename Elem<T>::type;
  const MetaTables& tb = Tables<L>::value;
  const int64_t kept = a.k / a.m * a.n, words = a.meta_words;
  const E* v = static_cast<const E*>(a.values) + o * kept;
  constexpr int QB = Q == 8 ? 16 : 8;  // bytes per super-step of quantized values
  const uint8_t* vq = static_cast<const uint8_t*>(a.values) + o * (Q == 4 ? kept / 2 : kept);
  // Scale group of each 8-slot vector (t = 0: slots 16s.., 1: 16s+8..), walked in order.
  const int64_t group_kept = a.groups == 1 ? INT64_MAX : a.group_kept;
  int64_t group[2] = {-1, -1}, group_end[2] = {0, 0};  // group -1 ends at slot 0
  __m256 scale[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, shift[2] = {scale[0], scale[0]};
  // acc0/acc1: sums of the group in progress (quantized, !H) or of the row; tot: the scaled sums.
  __m256 acc0[R], acc1[R], tot[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = tot[r] = _mm256_setzero_ps();
  auto flush = [&]() SK_AVX2 {  // quantized, !H: the finished group's sums, scaled, into tot
    for (int r = 0; r < R; ++r) {
      tot[r] = _mm256_fmadd_ps(_mm256_add_ps(acc0[r], acc1[r]), scale[0], tot[r]);
      acc0[r] = acc1[r] = _mm256_setzero_ps();
    }
  };
  // Weights of super-step s (from a zero-padded copy on the row's last, partial one).
  auto load = [&](int64_t s, const void* src, __m256& wa, __m256& wb) SK_AVX2 {
    if constexpr (Q == 0) {
      load16<T, L>(static_cast<const E*>(src), wa, wb);
    } else {
      for (int t = 0; t < (H ? 2 : 1); ++t) {
        if (16 * s + 8 * t >= group_end[t]) {
          if (!H && group[0] >= 0) flush();
          // No division per step (it cost 2:4 int4 g32 2x): at most two groups a step.
          while (16 * s + 8 * t >= group_end[t]) {
            ++group[t];
            group_end[t] += group_kept;
          }
          // (a half wholly past the row, zero-padded with zero x, keeps the last group)
          group[t] = std::min(group[t], a.groups - 1);
          const float sc = nm_scale(a, o, group[t]);
          scale[t] = _mm256_set1_ps(sc);
          // H: the weights are scaled here (q * s - zero * s); !H: shift is the zero alone, the
          // group's sums are scaled by flush().
          const float zero = static_cast<float>(nm_zero(a, o, group[t]));
          shift[t] = _mm256_set1_ps(H ? -zero * sc : zero);
        }
      }
      load16q<Q>(static_cast<const uint8_t*>(src), wa, wb);
      if constexpr (H) {
        wa = _mm256_fmadd_ps(wa, scale[0], shift[0]);
        wb = _mm256_fmadd_ps(wb, scale[1], shift[1]);
      } else {
        wa = _mm256_sub_ps(wa, shift[0]);
        wb = _mm256_sub_ps(wb, shift[0]);
      }
    }
  };
  const int32_t* mrow = a.meta + o * words;
  const float* xr = xq + r0 * ldq;
  // One super-step: weights wa, wb; meta from `m4` (M = 4: the word; M = 8: its 4 words).
  auto step = [&](const __m256 wa, const __m256 wb, const __m256i m4, int ph, int64_t s) SK_AVX2 {
    __m256i ia, ib;
    if constexpr (M == 4) {
      ia = _mm256_srlv_epi32(m4, ld(tb.shift2[0]));
      ib = _mm256_srlv_epi32(m4, ld(tb.shift2[1]));
    } else {
      const __m256 w4 = _mm256_castsi256_ps(m4);
      ia = _mm256_srlv_epi32(_mm256_castps_si256(_mm256_permutevar_ps(w4, ld(tb.word3[ph][0]))), ld(tb.shift3[ph][0]));
      ib = _mm256_srlv_epi32(_mm256_castps_si256(_mm256_permutevar_ps(w4, ld(tb.word3[ph][1]))), ld(tb.shift3[ph][1]));
    }
    const __m256 ba = M == 8 ? _mm256_castsi256_ps(_mm256_slli_epi32(ia, 29)) : _mm256_setzero_ps();
    const __m256 bb = M == 8 ? _mm256_castsi256_ps(_mm256_slli_epi32(ib, 29)) : _mm256_setzero_ps();
    const float* xs = xr + s * SS;
    for (int r = 0; r < R; ++r) {
      acc0[r] = _mm256_fmadd_ps(wa, vec_x<N, M>(xs + r * ldq, ia, ba), acc0[r]);
      acc1[r] = _mm256_fmadd_ps(wb, vec_x<N, M>(xs + r * ldq + SS / 2, ib, bb), acc1[r]);
    }
  };
  int64_t s = 0;
  int ph = 0;  // s mod 5
  __m256 wa, wb;
  auto fetch = [&](int64_t s) SK_AVX2 {  // a whole super-step's weights, prefetching ahead
    const char* p = Q == 0 ? reinterpret_cast<const char*>(v + 16 * s) : reinterpret_cast<const char*>(vq + QB * s);
    _mm_prefetch(p + kPrefetch, _MM_HINT_T0);
    load(s, p, wa, wb);
  };
  if constexpr (M == 4) {
    for (; 16 * s + 16 <= kept; ++s) {
      fetch(s);
      step(wa, wb, _mm256_set1_epi32(mrow[s]), 0, s);
    }
  } else {
    for (; 16 * s + 16 <= kept && (16 * s) / 10 + 4 <= words; ++s) {
      fetch(s);
      const __m128i w4 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(mrow + (16 * s) / 10));
      step(wa, wb, _mm256_broadcastsi128_si256(w4), ph, s);
      ph = ph == 4 ? 0 : ph + 1;
    }
  }
  for (; 16 * s < kept; ++s) {  // last super-steps: copies, zero past the row (x is zero past K too)
    if constexpr (Q == 0) {
      E tv[16] = {};
      std::copy(v + 16 * s, v + std::min<int64_t>(kept, 16 * s + 16), tv);
      load(s, tv, wa, wb);
    } else {
      uint8_t tv[16] = {};
      const int64_t row_bytes = Q == 4 ? kept / 2 : kept;
      std::copy(vq + QB * s, vq + std::min<int64_t>(row_bytes, QB * s + QB), tv);
      load(s, tv, wa, wb);
    }
    if constexpr (M == 4) {
      step(wa, wb, _mm256_set1_epi32(mrow[s]), 0, s);
    } else {
      alignas(16) int32_t tw[4] = {};
      for (int i = 0; i < 4; ++i) tw[i] = (16 * s) / 10 + i < words ? mrow[(16 * s) / 10 + i] : 0;
      step(wa, wb, _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(tw))), ph, s);
      ph = ph == 4 ? 0 : ph + 1;
    }
  }
  if constexpr (Q != 0 && !H) {
    flush();
  } else {
    for (int r = 0; r < R; ++r) tot[r] = _mm256_add_ps(acc0[r], acc1[r]);
  }
  const float b = a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f;
  for (int r = 0; r < R; ++r) store_f32(a.out, (r0 + r) * a.ldo + o, hsum(tot[r]) + b, a.dtype);
}

template <DType T, int N, int M, int Q = 0, bool H = false>
SK_AVX2 void quads_all(const NMLinearArgs& a, const float* xq, int64_t ldq) {
  if constexpr (Q != 0 && !H) {
    if (a.groups > 1 && a.group_kept % 16 != 0) return quads_all<T, N, M, Q, true>(a, xq, ldq);
  }
  parallel_range(a.out_features, a.threads, 16, [&](int64_t lo, int64_t hi, int) {
    for (int64_t o = lo; o < hi; ++o) {
      int64_t r0 = 0;
      for (; r0 + 4 <= a.rows; r0 += 4) quads_rows<T, N, M, 4, Q, H>(a, xq, ldq, r0, o);
      switch (a.rows - r0) {
        case 3: quads_rows<T, N, M, 3, Q, H>(a, xq, ldq, r0, o); break;
        case 2: quads_rows<T, N, M, 2, Q, H>(a, xq, ldq, r0, o); break;
        case 1: quads_rows<T, N, M, 1, Q, H>(a, xq, ldq, r0, o); break;
        default: break;
      }
    }
  });
}

// x reordered for lane order L: per super-step, vector (t, k, p) half h = quad p of the group of
// lane 4h + k*n of vector t (zero past K). From xf ([rows, K] fp32) where given, else a.x.
template <int N, int M, Lanes L>
void reorder_x(const NMLinearArgs& a, float* xq, int64_t ldq, int64_t supersteps, const float* xf = nullptr) {
  constexpr int Q = 4 / N, P = M / 4;
  parallel_range(a.rows, a.threads, grain_for(ldq), [&](int64_t lo, int64_t hi, int) {
    for (int64_t r = lo; r < hi; ++r) {
      float* d = xq + r * ldq;
      for (int64_t s = 0; s < supersteps; ++s) {
        for (int t = 0; t < 2; ++t) {
          for (int k = 0; k < Q; ++k) {
            for (int p = 0; p < P; ++p) {
              for (int h = 0; h < 2; ++h) {
                const int64_t col0 = (16 * s + lane_slot(L, t, 4 * h + k * N)) / N * M + 4 * p;
                for (int e = 0; e < 4; ++e) {
                  const int64_t c = col0 + e;
                  *d++ = c >= a.k ? 0.0f : xf ? xf[r * a.k + c] : load_f32(a.x, r * a.ldx + c, a.dtype);
                }
              }
            }
          }
        }
      }
    }
  });
}

template <int N, int M>
void quads_nm(const NMLinearArgs& a) {
  const int64_t kept = a.k / M * N, supersteps = (kept + 15) / 16, ldq = supersteps * (16 * M / N);
  // 64-byte aligned (ldq is a multiple of 16 floats): no x load splits a cache line.
  // NOTE: 1:4 bf16 4096x4096 0.477 -> 0.406 ms, 2:8 0.63 -> 0.57, 2:4 0.745 -> 0.68 (malloc's
  // 16-byte alignment split every other 32-byte load).
  std::vector<float> buf(a.rows * ldq + 16);
  float* xq = buf.data() + (16 - reinterpret_cast<uintptr_t>(buf.data()) / 4 % 16) % 16;
  if (a.qbits) {  // slots in order; x's type only matters to the reordering and the stores
    std::vector<float> xf;
    if (a.act_block) {  // int8 activations: x as rounded (exact in fp32), then the same kernel
      std::vector<int8_t> q(a.rows * a.k);
      std::vector<float> sx(a.rows * (a.k / a.act_block));
      nm_quantize_x_a8(a, q.data(), a.k, sx.data(), a.k / a.act_block);
      xf.resize(q.size());
      for (size_t i = 0; i < q.size(); ++i) xf[i] = static_cast<float>(q[i]) * sx[i / a.act_block];
    }
    reorder_x<N, M, Lanes::kInOrder>(a, xq, ldq, supersteps, a.act_block ? xf.data() : nullptr);
    return a.qbits == 8 ? quads_all<DType::kF32, N, M, 8>(a, xq, ldq) : quads_all<DType::kF32, N, M, 4>(a, xq, ldq);
  }
  switch (a.dtype) {
    case DType::kBF16:
      reorder_x<N, M, lanes_for<DType::kBF16, N>()>(a, xq, ldq, supersteps);
      return quads_all<DType::kBF16, N, M>(a, xq, ldq);
    case DType::kF16:
      reorder_x<N, M, Lanes::kInOrder>(a, xq, ldq, supersteps);
      return quads_all<DType::kF16, N, M>(a, xq, ldq);
    default:
      reorder_x<N, M, Lanes::kInOrder>(a, xq, ldq, supersteps);
      return quads_all<DType::kF32, N, M>(a, xq, ldq);
  }
}

}  // namespace

bool nm_quads_supported(int n, int m) {
  return (m == 4 && (n == 1 || n == 2)) || (m == 8 && (n == 1 || n == 2 || n == 4));
}

void nm_linear_decode_quads_avx2(const NMLinearArgs& a) {
  switch (a.m * 16 + a.n) {
    case 4 * 16 + 1: return quads_nm<1, 4>(a);
    case 4 * 16 + 2: return quads_nm<2, 4>(a);
    case 8 * 16 + 1: return quads_nm<1, 8>(a);
    case 8 * 16 + 2: return quads_nm<2, 8>(a);
    default: return quads_nm<4, 8>(a);
  }
}

}  // namespace sparsekern::detail
#endif
