// Quantized N:M decode with int8 activations (NMLinearArgs::act_block > 0, opt-in per weight).
//
// x is rounded to int8 per row and block of act_block columns (scale = max |x| / 127, round to
// nearest even, as sparsekern/reference.py), so a kept weight's integer meets its x's integer in
// an integer dot product: the arithmetic llama.cpp runs for its Q8_0 / Q4_0 weights. With
// AVX-512 VBMI + VNNI (2:4, act_block 32, scale groups of 16, 32 or a multiple of 64 kept slots),
// one step covers 64 kept slots = 128 columns: vpmultishiftqb spreads the 2-bit meta fields into
// bytes, vpermi2b picks the 64 x bytes out of the 128 columns, vpdpbusd multiplies them with the
// weight bytes (made unsigned: int8 + 128, int4 nibbles as they are) 4 to a lane, a second
// vpdpbusd with the zero point's bytes gives the term to subtract, and one FMA per lane applies
// weight scale x x scale. int4 bytes are unpacked by parity (low nibbles = even slots in bytes
// 0-31, high nibbles = odd slots in 32-63) and the meta tables follow that order. Everything else
// runs the portable kernel below (same rounding of x, fp32 sums).
// NOTE: 11008x4096 2:4, 1 row, bf16 x, 2 threads, Zen 4 EPYC (bench/bench_quant_decode.py, one
// run): int8 0.76 ms, int4 g128 0.73 ms, against 1.76 / 1.89 ms for the same weights with bf16 x
// (quads kernel) and 2.13 ms for the bf16 2:4 weight. Scale groups of 32 columns (16 kept slots)
// ran the portable kernel until 2026-11-26: 55.6 ms there, 0.67 ms now.
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/nm_linear.h"
#include "cpu/parallel.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sparsekern {

// Round to nearest even without a libm call (std::nearbyint is one per element at the baseline
// ISA): adding and removing 1.5 * 2^23 leaves the rounded value for |v| < 2^22. NOTE: with
// nearbyint the rounding of one 5632-column row cost ~0.1 ms, ~17 ms per TinyLlama token.
inline float round_even(float v) {
  constexpr float kMagic = 12582912.0f;  // IEEE arithmetic (no -ffast-math): the pair is not folded away
  return (v + kMagic) - kMagic;
}

// x rows as int8 per block of a.act_block columns (layout as nm_quantize_x_a8): each row in
// fp32, then block(x of the block, its int8 out) rounds one block and returns its scale.
template <class Block>
void quantize_rows(const NMLinearArgs& a, int8_t* xq, int64_t ldq, float* sx, int64_t lds, Block&& block) {
  const int64_t size = a.act_block, blocks = a.k / size;
  // Rows over the threads (a prefill rounds hundreds; a decode's few stay on one thread).
  parallel_range(a.rows, a.threads, grain_for(a.k), [&](int64_t r0, int64_t r1, int) {
    std::vector<float> xf(a.k);
    for (int64_t r = r0; r < r1; ++r) {
      int8_t* q = xq + r * ldq;
      float* s = sx + r * lds;
      std::fill(q + a.k, q + ldq, int8_t{0});
      std::fill(s + blocks, s + lds, 0.0f);
      convert_rows_f32(static_cast<const char*>(a.x) + r * a.ldx * dtype_size(a.dtype), 1, a.k, a.k, a.dtype,
                       xf.data(), a.k, 1);
      for (int64_t b = 0; b < blocks; ++b) s[b] = block(xf.data() + b * size, q + b * size);
    }
  });
}

void nm_quantize_x_a8(const NMLinearArgs& a, int8_t* xq, int64_t ldq, float* sx, int64_t lds) {
  const int64_t size = a.act_block;
  quantize_rows(a, xq, ldq, sx, lds, [size](const float* xb, int8_t* q) {
    // Comparisons, not std::fmax / std::fmin: those are libm calls per element at the
    // baseline ISA.
    float amax = 0.0f;
    for (int64_t c = 0; c < size; ++c) {
      const float v = xb[c] < 0.0f ? -xb[c] : xb[c];
      amax = v > amax || v != v ? v : amax;  // a NaN sticks
    }
    // A non-finite row is recomputed densely by the op (redo_nonfinite_rows): any finite value here.
    const bool ok = std::isfinite(amax) && amax > 0.0f;
    const float scale = ok ? amax / 127.0f : 1.0f;
    for (int64_t c = 0; c < size; ++c) {
      const float v = ok ? round_even(xb[c] / scale) : 0.0f;
      q[c] = static_cast<int8_t>(v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v);
    }
    return scale;
  });
}

namespace detail {

void nm_linear_decode_a8_portable(const NMLinearArgs& a) {
  const int64_t ldq = a.k, lds = a.k / a.act_block, groups = a.k / a.m;
  std::vector<int8_t> xq(a.rows * ldq);
  std::vector<float> sx(a.rows * lds);
  nm_quantize_x_a8(a, xq.data(), ldq, sx.data(), lds);
  parallel_range(a.out_features, a.threads, 16, [&](int64_t o0, int64_t o1, int) {
    for (int64_t o = o0; o < o1; ++o) {
      for (int64_t r = 0; r < a.rows; ++r) {
        const int8_t* q = xq.data() + r * ldq;
        const float* s = sx.data() + r * lds;
        float acc = 0.0f;
        MetaReader meta(a.meta + o * a.meta_words, a.meta_words, log2i(a.m));
        int64_t j = 0;
        for (int64_t g = 0; g < groups; ++g) {
          for (int t = 0; t < a.n; ++t, ++j) {
            const int64_t c = g * a.m + meta.next();
            acc += nm_weight(a, o, j) * (static_cast<float>(q[c]) * s[c / a.act_block]);
          }
        }
        const float b = a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f;
        store_f32(a.out, r * a.ldo + o, acc + b, a.dtype);
      }
    }
  });
}

#if defined(__x86_64__)
#define SK_A8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vnni,f16c")))

bool nm_a8_avx512_supported(const NMLinearArgs& a) {
  if (!has_avx512_vnni_vbmi()) return false;
  // A step (64 kept slots) lies in one scale group, or holds 2 or 4 whole ones (groups of 32 / 16).
  const int64_t gk = a.group_kept;
  return a.n == 2 && a.m == 4 && a.act_block == 32 && (a.groups == 1 || gk == 16 || gk == 32 || gk % 64 == 0);
}

namespace {

// Byte b of a step's weight vector holds kept slot slot_of(b): int8 in order; int4 as unpacked
// below (bytes 0-31 the low nibbles = even slots, 32-63 the high nibbles = odd slots).
template <int Q>
constexpr int slot_of(int b) {
  return Q == 8 ? b : b < 32 ? 2 * b : 2 * (b - 32) + 1;
}

// Which of a step's 4 x blocks (32 columns) / 16-slot quarters lane l (bytes 4l..4l+3) covers.
template <int Q>
constexpr int quarter_of(int l) {
  return slot_of<Q>(4 * l) / 16;
}

template <int Q>
struct A8Tables {
  alignas(64) uint8_t ctrl[64];  // bit offset of byte b's 2-bit meta field in its qword
  alignas(64) uint8_t base[64];  // first column of byte b's group of 4 in the 128-column window
  alignas(64) int64_t qsel[8];   // meta qword (of the step's two) that qword lane q reads
};

template <int Q>
constexpr A8Tables<Q> make_a8_tables() {
  A8Tables<Q> t{};
  for (int b = 0; b < 64; ++b) {
    t.ctrl[b] = static_cast<uint8_t>(2 * (slot_of<Q>(b) % 32));
    t.base[b] = static_cast<uint8_t>(4 * (slot_of<Q>(b) / 2));
  }
  for (int q = 0; q < 8; ++q) t.qsel[q] = slot_of<Q>(8 * q) / 32;  // a qword lane's 8 slots share one
  return t;
}

template <int Q>
constexpr A8Tables<Q> kA8 = make_a8_tables<Q>();

// Lane l's group among the G (1, 2, 4) scale groups of a step.
template <int Q, int G>
SK_A8 inline __m512i group_lanes() {
  alignas(64) int32_t idx[16];
  for (int l = 0; l < 16; ++l) idx[l] = quarter_of<Q>(l) * G / 4;
  return _mm512_load_si512(idx);
}

// vpshufb control that turns G bf16 scales, broadcast to every 128-bit lane, into lane l's
// fp32 scale (its group's bf16 bits in the upper half, zeros below).
template <int Q, int G>
struct ScaleShuffle {
  alignas(64) int8_t c[64];
};

template <int Q, int G>
constexpr ScaleShuffle<Q, G> make_scale_shuffle() {
  ScaleShuffle<Q, G> t{};
  for (int l = 0; l < 16; ++l) {
    const int g = quarter_of<Q>(l) * G / 4;
    t.c[4 * l] = t.c[4 * l + 1] = -128;  // zeroed bytes
    t.c[4 * l + 2] = static_cast<int8_t>(2 * g);
    t.c[4 * l + 3] = static_cast<int8_t>(2 * g + 1);
  }
  return t;
}

template <int Q, int G>
constexpr ScaleShuffle<Q, G> kScaleShuffle = make_scale_shuffle<Q, G>();

// Scales of groups g .. g+count-1 (count <= 4, of element type T: that of x) spread over the
// lanes by `lanes`. NOTE: bf16 with all G of a step's groups: one broadcast load and one
// vpshufb instead of a masked load, a widening, a shift and a cross-lane permute. int4 group 32
// (4 groups a step), 2:4, 1 bf16 row, 2 threads, Zen 4, bench_quant_decode.py in one run each:
// 11008x4096 0.588 -> 0.527 ms, 11264x2048 0.340 -> 0.305 ms (int8 per row 0.55 / 0.29 in both).
template <DType T, int Q = 8, int G = 1>
SK_A8 inline __m512 lane_scales(const void* scales, int64_t g, int64_t count, __m512i lanes) {
  if constexpr (T == DType::kBF16 && (G == 2 || G == 4)) {
    if (count == G) {
      const uint16_t* p = static_cast<const uint16_t*>(scales) + g;
      int64_t bits = 0;
      std::memcpy(&bits, p, 2 * G);
      const __m512i b = G == 4 ? _mm512_set1_epi64(bits) : _mm512_set1_epi32(static_cast<int32_t>(bits));
      return _mm512_castsi512_ps(_mm512_shuffle_epi8(b, _mm512_load_si512(kScaleShuffle<Q, G>.c)));
    }
  }
  const __mmask8 mk = static_cast<__mmask8>((1u << count) - 1u);
  __m128 s;
  if constexpr (T == DType::kF32) {
    s = _mm_maskz_loadu_ps(mk, static_cast<const float*>(scales) + g);
  } else {
    const __m128i h = _mm_maskz_loadu_epi16(mk, static_cast<const uint16_t*>(scales) + g);
    if constexpr (T == DType::kBF16) {
      s = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
    } else {
      s = _mm_cvtph_ps(h);
    }
  }
  return _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(s));
}

// Zero points (+ shift) of groups g .. g+count-1 as the 4 bytes of each lane, spread by `lanes`.
SK_A8 inline __m512i lane_zero_bytes(const int8_t* zeros, int64_t g, int64_t count, int shift, __m512i lanes) {
  const __m128i z = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << count) - 1u), zeros + g);
  const __m512i z32 = _mm512_add_epi32(_mm512_castsi128_si512(_mm_cvtepi8_epi32(z)), _mm512_set1_epi32(shift));
  return _mm512_mullo_epi32(_mm512_permutexvar_epi32(lanes, z32), _mm512_set1_epi32(0x01010101));
}

// One output row's walk over its steps (64 kept slots = 128 columns each): the x byte indices
// from the meta, the weight bytes (made unsigned), the zero bytes and the lane scales.
template <int Q, DType T, bool Z, int G>
struct A8Row {
  // The weight's unsigned offset: int8 values are made unsigned by +128; the symmetric zero is
  // then 128 (int8) or 8 (int4). dot(w_u, x) - dot(zero bytes, x) is the signed product.
  static constexpr int zshift = Q == 8 ? 128 : 0;
  const NMLinearArgs& a;
  const uint8_t* v;
  const int32_t* mrow;
  int64_t g_row;
  __m512 sw;
  __m512i zb;

  SK_A8 inline __attribute__((always_inline)) A8Row(const NMLinearArgs& args, int64_t o)
      : a(args),
        v(static_cast<const uint8_t*>(args.values) + o * (Q == 4 ? args.k / 4 : args.k / 2)),
        mrow(args.meta + o * args.meta_words),
        g_row(o * args.groups),
        group_end(args.groups == 1 ? INT64_MAX : args.group_kept) {
    sw = _mm512_set1_ps(load_f32(a.scales, g_row, T));
    zb = _mm512_set1_epi8(static_cast<char>((Z ? a.zeros[g_row] : Q == 8 ? 0 : 8) + zshift));
  }

  // Scales (and zero bytes) of step s, steps taken in order: G > 1 loads the step's G groups;
  // G == 0 (groups of 64 kept slots: one a step) loads step s's; G == 1 moves to the next group
  // where one starts (every a.group_kept / 64 steps). NOTE: G == 0 against the G == 1 walk, 2:4
  // int4 g128 +a8, 1 bf16 row, 2 threads, Zen 4, streamed copies, interleaved in one process:
  // 11008x4096 0.382 -> 0.353 ms (zero points 0.391 -> 0.372), 4096x4096 0.155 -> 0.147; int8 g128
  // unchanged (0.667 / 0.663 ms).
  int64_t group = 0, group_end;  // G == 1: the current group, and the kept slot it ends before
  SK_A8 inline __attribute__((always_inline)) void scales(int64_t s, __m512i lanes) {
    if constexpr (G == 0) {
      sw = _mm512_set1_ps(load_f32(a.scales, g_row + s, T));
      if constexpr (Z) zb = _mm512_set1_epi8(static_cast<char>(a.zeros[g_row + s] + zshift));
    } else if constexpr (G > 1) {
      const int64_t g = G * s, count = std::min<int64_t>(G, a.groups - g);
      sw = lane_scales<T, Q, G>(a.scales, g_row + g, count, lanes);
      if constexpr (Z) zb = lane_zero_bytes(a.zeros, g_row + g, count, zshift, lanes);
    } else if (64 * s >= group_end) {
      ++group;
      group_end += a.group_kept;
      sw = _mm512_set1_ps(load_f32(a.scales, g_row + group, T));
      if constexpr (Z) zb = _mm512_set1_epi8(static_cast<char>(a.zeros[g_row + group] + zshift));
    }
  }

  // x byte index (in the step's 128-column window) of each weight byte of step s.
  SK_A8 inline __attribute__((always_inline)) __m512i x_index(int64_t s, bool full) const {
    __m512i mq;  // each qword lane: the meta qword its slots read (kA8<Q>.qsel)
    if (full) {  // two broadcast loads, no shuffle
      const int64_t* q = reinterpret_cast<const int64_t*>(mrow + 4 * s);
      mq = _mm512_mask_set1_epi64(_mm512_set1_epi64(q[0]), Q == 8 ? 0xf0 : 0xcc, q[1]);
    } else {
      const int64_t words = a.meta_words;
      const __m128i m = _mm_maskz_loadu_epi32(static_cast<__mmask8>((1u << std::min<int64_t>(4, words - 4 * s)) - 1),
                                              mrow + 4 * s);
      mq = _mm512_permutexvar_epi64(_mm512_load_si512(kA8<Q>.qsel), _mm512_castsi128_si512(m));
    }
    const __m512i f = _mm512_multishift_epi64_epi8(_mm512_load_si512(kA8<Q>.ctrl), mq);
    // (field & 3) | base: base is a multiple of 4, so | is +.
    return _mm512_ternarylogic_epi32(f, _mm512_set1_epi8(3), _mm512_load_si512(kA8<Q>.base), 0xea);
  }

  // The step's weight bytes, unsigned; slots past the row read as 0 (their x bytes are xq's zero
  // padding).
  SK_A8 inline __attribute__((always_inline)) __m512i weights(int64_t s, int64_t left) const {
    if constexpr (Q == 8) {
      const __m512i raw = left >= 64 ? _mm512_loadu_si512(v + 64 * s)
                                     : _mm512_maskz_loadu_epi8((~0ULL) >> (64 - left), v + 64 * s);
      _mm_prefetch(reinterpret_cast<const char*>(v + 64 * s) + 1024, _MM_HINT_T0);
      return _mm512_xor_si512(raw, _mm512_set1_epi8(static_cast<char>(0x80)));
    } else {
      // The 32 bytes in both halves, the upper half shifted down a nibble: low nibbles (even
      // slots) in bytes 0-31, high nibbles (odd slots) in 32-63.
      const int64_t nbytes = left >= 64 ? 32 : (left + 1) / 2;
      const __m512i raw = nbytes == 32
                              ? _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32 * s)))
                              : _mm512_broadcast_i64x4(_mm256_maskz_loadu_epi8((1u << nbytes) - 1u, v + 32 * s));
      _mm_prefetch(reinterpret_cast<const char*>(v + 32 * s) + 1024, _MM_HINT_T0);
      return _mm512_and_si512(_mm512_srlv_epi64(raw, _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0)), _mm512_set1_epi8(0x0f));
    }
  }

  // acc + (w - zero) . x picked by idx, times weight scale x x scale, per lane.
  SK_A8 inline __attribute__((always_inline)) __m512 fma(__m512 acc, __m512i w, __m512i idx, const int8_t* xr,
                                                         const float* sx) const {
    const __m512i xp = _mm512_permutex2var_epi8(_mm512_loadu_si512(xr), idx, _mm512_loadu_si512(xr + 64));
    const __m512i zero = _mm512_setzero_si512();
    const __m512i dot = _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, w, xp), _mm512_dpbusd_epi32(zero, zb, xp));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sw, _mm512_loadu_ps(sx)), acc);
  }
};

// Output row o against x rows r0 .. r0+R-1. Q = 8: int8 values, 4: int4; T: x's (and the
// scales') type; Z: zero points stored (else the symmetric zero); G: scale groups a step (0:
// exactly one, groups of 64 kept slots; 1: a step lies in one group; 2, 4: groups of 32, 16).
// sxl: per row, the x scale of each lane of each step (16 floats a step, expanded once per call).
template <int Q, DType T, bool Z, int G, int R>
SK_A8 inline __attribute__((always_inline)) void a8_rows(const NMLinearArgs& a, const int8_t* xq, int64_t ldq,
                                                         const float* sxl, int64_t lds, int64_t r0, int64_t o) {
  const int64_t kept = a.k / 2, steps = (kept + 63) / 64;
  const __m512i lanes = group_lanes<Q, G>();
  A8Row<Q, T, Z, G> row(a, o);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t left = kept - 64 * s;  // kept slots from this step on
    row.scales(s, lanes);
    const __m512i idx = row.x_index(s, left >= 64 && 4 * s + 4 <= a.meta_words);
    const __m512i w = row.weights(s, left);
    for (int r = 0; r < R; ++r) acc[r] = row.fma(acc[r], w, idx, xq + (r0 + r) * ldq + 128 * s, sxl + (r0 + r) * lds + 16 * s);
  }
  const float b = a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f;
  for (int r = 0; r < R; ++r) store_f32(a.out, (r0 + r) * a.ldo + o, _mm512_reduce_add_ps(acc[r]) + b, a.dtype);
}

// Output rows lo .. hi-1 against every x row, 4 x rows at a time. One function for the whole
// range, so tables and constants load once.
// NOTE: 4 output rows at a time against one x row (four independent sums, one reduction) and
// a call per output row both measured the same here (Zen 4, hot in cache, 1 thread: ~13 cycles
// a 64-slot int4 step, ~10 int8): the step's own work decides, not the sums' chain.
template <int Q, DType T, bool Z, int G>
SK_A8 void a8_block(const NMLinearArgs& a, const int8_t* xq, int64_t ldq, const float* sxl, int64_t lds, int64_t lo,
                    int64_t hi) {
  for (int64_t o = lo; o < hi; ++o) {
    int64_t r0 = 0;
    for (; r0 + 4 <= a.rows; r0 += 4) a8_rows<Q, T, Z, G, 4>(a, xq, ldq, sxl, lds, r0, o);
    switch (a.rows - r0) {
      case 3: a8_rows<Q, T, Z, G, 3>(a, xq, ldq, sxl, lds, r0, o); break;
      case 2: a8_rows<Q, T, Z, G, 2>(a, xq, ldq, sxl, lds, r0, o); break;
      case 1: a8_rows<Q, T, Z, G, 1>(a, xq, ldq, sxl, lds, r0, o); break;
      default: break;
    }
  }
}

template <int Q, DType T, bool Z, int G>
void a8_all(const NMLinearArgs& a, const int8_t* xq, int64_t ldq, const float* sxl, int64_t lds) {
  parallel_range(a.out_features, a.threads, 16,
                 [&](int64_t lo, int64_t hi, int) { a8_block<Q, T, Z, G>(a, xq, ldq, sxl, lds, lo, hi); });
}

template <int Q, DType T, bool Z>
void a8_groups(const NMLinearArgs& a, const int8_t* xq, int64_t ldq, const float* sxl, int64_t lds) {
  if (a.groups > 1 && a.group_kept == 16) return a8_all<Q, T, Z, 4>(a, xq, ldq, sxl, lds);
  if (a.groups > 1 && a.group_kept == 32) return a8_all<Q, T, Z, 2>(a, xq, ldq, sxl, lds);
  if (a.groups > 1 && a.group_kept == 64) return a8_all<Q, T, Z, 0>(a, xq, ldq, sxl, lds);
  a8_all<Q, T, Z, 1>(a, xq, ldq, sxl, lds);
}

template <int Q, DType T>
void a8_dispatch(const NMLinearArgs& a, const int8_t* xq, int64_t ldq, const float* sxl, int64_t lds) {
  a.zeros ? a8_groups<Q, T, true>(a, xq, ldq, sxl, lds) : a8_groups<Q, T, false>(a, xq, ldq, sxl, lds);
}

template <int Q>
void a8_typed(const NMLinearArgs& a, const int8_t* xq, int64_t ldq, const float* sxl, int64_t lds) {
  switch (a.dtype) {
    case DType::kBF16: return a8_dispatch<Q, DType::kBF16>(a, xq, ldq, sxl, lds);
    case DType::kF16: return a8_dispatch<Q, DType::kF16>(a, xq, ldq, sxl, lds);
    default: return a8_dispatch<Q, DType::kF32>(a, xq, ldq, sxl, lds);
  }
}

SK_A8 inline __m128i round_x8(__m512 x, __m512 scale, __m512 lo, __m512 hi) {
  const __m512 v = _mm512_roundscale_ps(_mm512_div_ps(x, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, v))));
}

// nm_quantize_x_a8 for act_block 32, 16 lanes at a time: the same scales and integers (IEEE
// division by the scale, round to nearest even, clamp to +-127).
// NOTE: the scalar quantizer took ~5 us of a ~21 us call for 2048 columns (Zen 4, 1 thread).
void quantize_x_a8_32(const NMLinearArgs& a, int8_t* xq, int64_t ldq, float* sx, int64_t lds) {
  quantize_rows(a, xq, ldq, sx, lds, [](const float* xb, int8_t* q) SK_A8 {
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(x0, absmask), _mm512_and_ps(x1, absmask)));
    // max_ps may drop a NaN: any finite result is fine (the op recomputes non-finite rows).
    const bool ok = std::isfinite(amax) && amax > 0.0f;
    const float scale = ok ? amax / 127.0f : 1.0f;
    const __m512 sv = _mm512_set1_ps(scale);
    if (ok) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), round_x8(x0, sv, lo, hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), round_x8(x1, sv, lo, hi));
    } else {
      std::fill_n(q, 32, int8_t{0});
    }
    return scale;
  });
}

}  // namespace

void nm_linear_decode_a8_avx512(const NMLinearArgs& a) {
  const int64_t steps = (a.k / 2 + 63) / 64, ldq = 128 * steps + 64, blocks = 4 * steps;
  std::vector<int8_t> xq(a.rows * ldq);
  std::vector<float> sx(a.rows * blocks), sxl(a.rows * 16 * steps);
  quantize_x_a8_32(a, xq.data(), ldq, sx.data(), blocks);
  // Lane l of step s holds 4 kept slots, all in x block (32 columns) 4s + quarter_of<Q>(l).
  if (a.qbits == 8) {
    spread_block_scales(sx.data(), a.rows * steps, 4, quarter_of<8>, sxl.data());
    return a8_typed<8>(a, xq.data(), ldq, sxl.data(), 16 * steps);
  }
  spread_block_scales(sx.data(), a.rows * steps, 4, quarter_of<4>, sxl.data());
  a8_typed<4>(a, xq.data(), ldq, sxl.data(), 16 * steps);
}
#endif

}  // namespace detail

bool has_avx512_vnni_vbmi() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

void quantize_x_a8(const NMLinearArgs& a, int8_t* xq, int64_t ldq, float* sx, int64_t lds) {
#if defined(__x86_64__)
  if (a.act_block == 32 && active_isa() >= Isa::kAvx512 && has_avx512_vnni_vbmi()) {
    return detail::quantize_x_a8_32(a, xq, ldq, sx, lds);
  }
#endif
  nm_quantize_x_a8(a, xq, ldq, sx, lds);
}

}  // namespace sparsekern
