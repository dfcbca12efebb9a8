// N:M decode kernel for AVX2+FMA(+F16C) when 8 kept slots cover whole groups: 1:4, 2:4, 1:8,
// 2:8, 4:8. x operands are picked with in-lane permutes (vpermilps) from a per-call reordering
// of x; no vpermps, no gathers, no blend tree for M = 4.
//
// A step is 8 kept slots = 8/n whole groups = 8m/n dense columns. Lane l of a ymm sits in half
// h = l / 4, and vpermilps lets it pick any of the 4 floats of its own half, by the low 2 bits
// of its control lane: the meta fields themselves (one vpsrlvd of a broadcast chunk). So x is
// reordered per step into vectors whose half h holds a 4-column quad of the group of the lanes
// of that half: vector (k, p) = [quad p of group h0(k) | quad p of group h1(k)], k < 4/n groups
// per half, p < m/4 quads per group. M = 4: one vpermilps per k, combined with immediate
// blends; M = 8: two (low and high quad), joined by a vblendvps on index bit 2.
// NOTE: 4096x4096, 1 row, 1 thread, standalone loop on the loaded 2-core EPYC, ns per 8 kept
// values (fp32 / bf16 weights): blend-tree planes kernel (nm_linear_planes_avx2.cpp) 2:4
// 2.35 / 1.88, 1:4 2.39 / 1.46, 2:8 4.6 / 3.8; vpermps window kernel ~8; a 256-entry LUT
// expanding the weights with vpermps 2.7 / 2.3 (vpermps is slow on this core). This kernel:
// 2:4 2.2 / 1.3, 1:4 2.0 / 1.7, 2:8 2.5 / 2.4, 4:8 2.1 / 1.9 (fp32 2:4 = 15.7 GB/s, about the
// 16.5 GB/s of a plain one-thread fp32 dot-product stream on the same box).
// Against F.linear in one process (torch.set_num_threads(1), 1 row, 4096x4096, loaded box):
// fp32 2:4 2.72 vs 3.10 ms (1.14x), 1:4 1.25 vs 3.02 (2.42x), 2:8 1.49 vs 2.82 (1.89x); bf16 2:4
// 1.58 vs 3.25 (2.06x), 1:4 1.10 vs 3.23 (2.94x), 2:8 1.49 vs 3.24 (2.18x). With 2 threads
// (bench_linear_cpu.py --quick, quiet moment): fp32 2:4 2.09x (77% of the 31.9 GB/s roofline),
// 1:4 3.35x, 2:8 2.95x; bf16 2:4 1.83x (66%), 1:4 2.66x, 2:8 2.06x.
#if defined(__x86_64__)
#include <immintrin.h>
#include <omp.h>

#include <vector>

#include "cpu/linear_avx2.h"
#include "cpu/nm_linear.h"

namespace sparsekern::detail {
namespace {

constexpr int kPrefetch = 2048;  // bytes ahead on the values stream. NOTE: +10-15% at 1 row.

// Meta fields j .. j+7 in the low bits. BITS 2 never straddles a word; 3-bit fields (10 per
// word) are tracked incrementally by word w and field f.
struct MetaCursor {
  const int32_t* row = nullptr;
  int64_t words = 0, w = 0;
  int f = 0;
  template <int BITS>
  inline uint32_t get() const {
    if constexpr (BITS == 2) {
      return static_cast<uint32_t>(row[w]) >> (2 * f);
    } else {
      const uint64_t lo = static_cast<uint32_t>(row[w]);
      const uint64_t hi = w + 1 < words ? static_cast<uint32_t>(row[w + 1]) : 0u;
      return static_cast<uint32_t>(((lo & 0x3fffffffu) | (hi << 30)) >> (3 * f));
    }
  }
  template <int BITS>
  inline void next() {
    f += 8;
    if (f >= (BITS == 2 ? 16 : 10)) f -= BITS == 2 ? 16 : 10, ++w;
  }
};

// Operand of vector k (lanes whose slot's group is the k-th of its half).
template <int M, int K>
SK_AVX2 inline __m256 pick(const float* xs, __m256i idx, __m256 bit2) {
  constexpr int P = M / 4;
  const __m256 lo = _mm256_permutevar_ps(_mm256_loadu_ps(xs + K * P * 8), idx);
  if constexpr (M == 4) {
    return lo;
  } else {
    return _mm256_blendv_ps(lo, _mm256_permutevar_ps(_mm256_loadu_ps(xs + K * P * 8 + 8), idx), bit2);
  }
}

// x operands of one step's 8 slots; xs: the step's reordered x (8m/n floats).
template <int N, int M>
SK_AVX2 inline __m256 step_x(const float* xs, __m256i idx, __m256 bit2) {
  if constexpr (N == 4) {
    return pick<M, 0>(xs, idx, bit2);
  } else if constexpr (N == 2) {  // vector k serves lanes 2k, 2k+1 (+4)
    return _mm256_blend_ps(pick<M, 0>(xs, idx, bit2), pick<M, 1>(xs, idx, bit2), 0xCC);
  } else {  // vector k serves lanes k, k+4
    const __m256 a = _mm256_blend_ps(pick<M, 0>(xs, idx, bit2), pick<M, 1>(xs, idx, bit2), 0x22);
    const __m256 b = _mm256_blend_ps(pick<M, 2>(xs, idx, bit2), pick<M, 3>(xs, idx, bit2), 0x88);
    return _mm256_blend_ps(a, b, 0xCC);
  }
}

// Rows r0 .. r0+R-1 of x against output row o.
// NOTE: interleaving 2 or 4 output rows (more weight streams in flight) was slower at 1 row:
// 2:4 bf16 1.27 ns per 8 values with 1 row, 1.8 with 2, 1.5-1.8 with 4; fp32 within noise.
template <DType T, int N, int M, int R>
SK_AVX2 void quads_rows(const NMLinearArgs& a, const float* xq, int64_t ldq, int64_t r0, int64_t o) {
  constexpr int BITS = M == 4 ? 2 : 3, STEP = 8 * M / N;  // dense columns per step
  using E = typename Elem<T>::type;
  const int64_t kept = a.k / a.m * a.n;
  const E* v = static_cast<const E*>(a.values) + o * kept;
  const float* xr = xq + r0 * ldq;
  const __m256i lo_shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
  const __m256i hi_shifts = _mm256_sub_epi32(_mm256_set1_epi32(32 - BITS), lo_shifts);  // bit 2 -> sign
  MetaCursor mc{a.meta + o * a.meta_words, a.meta_words};
  // Two chains per row: one FMA's latency spans more than one step.
  __m256 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  auto step = [&](const __m256 w, int64_t j, __m256* acc) SK_AVX2 {
    const __m256i ch = _mm256_set1_epi32(static_cast<int>(mc.get<BITS>()));
    mc.next<BITS>();
    const __m256i idx = _mm256_srlv_epi32(ch, lo_shifts);
    const __m256 bit2 = M == 8 ? _mm256_castsi256_ps(_mm256_sllv_epi32(ch, hi_shifts)) : _mm256_setzero_ps();
    const float* xs = xr + j / 8 * STEP;
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(w, step_x<N, M>(xs + r * ldq, idx, bit2), acc[r]);
  };
  int64_t j = 0;
  for (; j + 16 <= kept; j += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(v + j) + kPrefetch, _MM_HINT_T0);
    step(load8<T>(v + j), j, acc0);
    step(load8<T>(v + j + 8), j + 8, acc1);
  }
  for (; j < kept; j += 8) {  // reordered x is zero past K: tail lanes add 0 * 0
    step(j + 8 <= kept ? load8<T>(v + j) : load_partial<T>(v + j, static_cast<int>(kept - j)), j, acc0);
  }
  const float b = a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f;
  for (int r = 0; r < R; ++r)
    store_f32(a.out, (r0 + r) * a.ldo + o, hsum(_mm256_add_ps(acc0[r], acc1[r])) + b, a.dtype);
}

template <DType T, int N, int M>
SK_AVX2 void quads_all(const NMLinearArgs& a, const float* xq, int64_t ldq) {
#pragma omp parallel for num_threads(a.threads) schedule(static)
  for (int64_t o = 0; o < a.out_features; ++o) {
    int64_t r0 = 0;
    for (; r0 + 4 <= a.rows; r0 += 4) quads_rows<T, N, M, 4>(a, xq, ldq, r0, o);
    switch (a.rows - r0) {
      case 3: quads_rows<T, N, M, 3>(a, xq, ldq, r0, o); break;
      case 2: quads_rows<T, N, M, 2>(a, xq, ldq, r0, o); break;
      case 1: quads_rows<T, N, M, 1>(a, xq, ldq, r0, o); break;
      default: break;
    }
  }
}

template <int N, int M>
void quads_dtype(const NMLinearArgs& a, const float* xq, int64_t ldq) {
  switch (a.dtype) {
    case DType::kBF16: return quads_all<DType::kBF16, N, M>(a, xq, ldq);
    case DType::kF16: return quads_all<DType::kF16, N, M>(a, xq, ldq);
    default: return quads_all<DType::kF32, N, M>(a, xq, ldq);
  }
}

}  // namespace

bool nm_quads_supported(int n, int m) {
  return (m == 4 && (n == 1 || n == 2)) || (m == 8 && (n == 1 || n == 2 || n == 4));
}

void nm_linear_decode_quads_avx2(const NMLinearArgs& a) {
  const int n = a.n, m = a.m, q = 4 / n, parts = m / 4, step_cols = 8 * m / n;
  const int64_t kept = a.k / m * n, steps = (kept + 7) / 8, ldq = steps * step_cols;
  std::vector<float> xq(a.rows * ldq);
  // Vector (k, p) of step s: half h holds quad p of group s*8/n + h*4/n + k (zero past K).
#pragma omp parallel for num_threads(a.threads) schedule(static) if (a.rows * ldq > (1 << 16))
  for (int64_t r = 0; r < a.rows; ++r) {
    float* d = xq.data() + r * ldq;
    for (int64_t s = 0; s < steps; ++s) {
      for (int k = 0; k < q; ++k) {
        for (int p = 0; p < parts; ++p) {
          for (int h = 0; h < 2; ++h) {
            const int64_t col0 = (s * (8 / n) + h * q + k) * m + 4 * p;
            for (int e = 0; e < 4; ++e) {
              *d++ = col0 + e < a.k ? load_f32(a.x, r * a.ldx + col0 + e, a.dtype) : 0.0f;
            }
          }
        }
      }
    }
  }
  switch (m * 16 + n) {
    case 4 * 16 + 1: return quads_dtype<1, 4>(a, xq.data(), ldq);
    case 4 * 16 + 2: return quads_dtype<2, 4>(a, xq.data(), ldq);
    case 8 * 16 + 1: return quads_dtype<1, 8>(a, xq.data(), ldq);
    case 8 * 16 + 2: return quads_dtype<2, 8>(a, xq.data(), ldq);
    default: return quads_dtype<4, 8>(a, xq.data(), ldq);
  }
}

}  // namespace sparsekern::detail
#endif
