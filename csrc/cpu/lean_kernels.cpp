// The lean decode step's small ops (see lean_kernels.h). Plain loops: `omp simd` lets the compiler
// vectorise the fp32 reductions (it may not reorder a sum otherwise). Attention and silu * up are
// also compiled for AVX-512 (the same loops inlined into a target("avx512...") wrapper, picked by
// the active ISA): the rest of the file is built for baseline x86-64, 4 lanes. Attention runs its
// heads on the kernels' thread pool; the other ops run on the calling thread.
// NOTE: AMD EPYC Zen 4, 2 threads, bf16, sk.generate, old (one thread, baseline x86-64) and new
// alternated in one process, 7 rounds, medians: SmolLM2 2:4, 16-token prompt + 128 new 139.9 ->
// 143.7 tok/s, 1000-token prompt + 64 new 81.5 -> 104.0 (1.28x); TinyLlama shapes, block32x32
// 90% + int4, 16 + 64: 109.2 -> 113.1.
#include "cpu/lean_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/isa.h"
#include "cpu/parallel.h"

namespace sparsekern::lean {
namespace {

// x rounded to T and back (the Python step holds such values in T).
template <DType T>
inline float round_to(float x) {
  return Elem<T>::load(Elem<T>::store(x));
}

// exp(x), Cephes' expf polynomial (~1 ulp): a branch-free body the compiler vectorises, where
// std::exp is a libm call per element (~1536 per block for silu). NaN stays NaN (selected back at
// the end, so no NaN reaches the int conversion); below -87.3 it gives ~1e-38 instead of 0,
// above 88.7 ~3e38 instead of inf.
inline float fast_exp(float in) {
  const bool nan = in != in;
  const float x = nan ? 0.0f : std::min(std::max(in, -87.3f), 88.7f);
  const float fn = x * 1.44269504088896341f;
  const int n = static_cast<int>(fn + (fn >= 0.0f ? 0.5f : -0.5f));
  const float nf = static_cast<float>(n);
  const float r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return nan ? in : y * scale;
}

template <DType T>
void norm_row(const float* hf, const typename Elem<T>::type* w, float eps, int64_t dim, typename Elem<T>::type* o) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < dim; ++i) ss += hf[i] * hf[i];
  const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
#pragma omp simd
  for (int64_t i = 0; i < dim; ++i) o[i] = Elem<T>::store(round_to<T>(hf[i] * rstd) * Elem<T>::load(w[i]));
}

template <DType T>
void add_norm_t(void* hv, const void* yv, const void* wv, float eps, int64_t rows, int64_t dim, void* ov) {
  using E = typename Elem<T>::type;
  E* h = static_cast<E*>(hv);
  const E* y = static_cast<const E*>(yv);
  const E* w = static_cast<const E*>(wv);
  std::vector<float> hf(w ? dim : 0);
  for (int64_t r = 0; r < rows; ++r) {
    E* hr = h + r * dim;
    if (y) {
      const E* yr = y + r * dim;
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) hr[i] = Elem<T>::store(Elem<T>::load(hr[i]) + Elem<T>::load(yr[i]));
    }
    if (!w) continue;
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) hf[i] = Elem<T>::load(hr[i]);
    norm_row<T>(hf.data(), w, eps, dim, static_cast<E*>(ov) + r * dim);
  }
}

template <DType T>
void rotary_t(const void* qkvv, const void* cosv, const void* sinv, const AttnShape& s, float* q_out, void* kcv,
              void* vcv) {
  using E = typename Elem<T>::type;
  const E* qkv = static_cast<const E*>(qkvv);
  const int64_t d = s.head_dim, half = d / 2, qk_heads = s.heads + s.kv_heads;
  const int64_t width = (qk_heads + s.kv_heads) * d;
  const E* c = static_cast<const E*>(cosv) + s.pos * d;
  const E* sn = static_cast<const E*>(sinv) + s.pos * d;
  E* kc = static_cast<E*>(kcv);
  E* vc = static_cast<E*>(vcv);
  for (int64_t r = 0; r < s.rows; ++r) {
    const E* row = qkv + r * width;
    for (int64_t hd = 0; hd < qk_heads; ++hd) {
      const E* x = row + hd * d;
      const bool is_q = hd < s.heads;
      E* kdst = is_q ? nullptr : kc + (((r * s.kv_heads) + hd - s.heads) * s.max_len + s.pos) * d;
      float* qdst = is_q ? q_out + (r * s.heads + hd) * d : nullptr;
      // The Python step: qk * cos (rounded), then addcmul(that, swapped, sin) (rounded).
      for (int64_t i = 0; i < d; ++i) {
        const float xc = round_to<T>(Elem<T>::load(x[i]) * Elem<T>::load(c[i]));
        const float v = xc + Elem<T>::load(x[i < half ? i + half : i - half]) * Elem<T>::load(sn[i]);
        if (is_q) {
          qdst[i] = round_to<T>(v);
        } else {
          kdst[i] = Elem<T>::store(v);
        }
      }
    }
    for (int64_t hd = 0; hd < s.kv_heads; ++hd) {
      std::memcpy(vc + ((r * s.kv_heads + hd) * s.max_len + s.pos) * d, row + (qk_heads + hd) * d, d * sizeof(E));
    }
  }
}

// One query head (row r, head h) of attention_t; scratch: n + head_dim floats.
template <DType T>
inline __attribute__((always_inline)) void attention_head(const float* q, const typename Elem<T>::type* kc,
                                                          const typename Elem<T>::type* vc, const AttnShape& s,
                                                          float scale, float* scratch, typename Elem<T>::type* out,
                                                          int64_t r, int64_t h) {
  using E = typename Elem<T>::type;
  const int64_t d = s.head_dim, n = s.pos + 1, group = s.heads / s.kv_heads;
  float* p = scratch;
  float* acc = scratch + n;
  const int64_t g = h / group;
  const float* qh = q + (r * s.heads + h) * d;
  const E* k = kc + (r * s.kv_heads + g) * s.max_len * d;
  const E* v = vc + (r * s.kv_heads + g) * s.max_len * d;
  float mx = -INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    const E* kt = k + t * d;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < d; ++i) dot += qh[i] * Elem<T>::load(kt[i]);
    p[t] = dot * scale;
    mx = std::max(mx, p[t]);
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) {
    p[t] = fast_exp(p[t] - mx);
    sum += p[t];
  }
  std::fill(acc, acc + d, 0.0f);
  for (int64_t t = 0; t < n; ++t) {
    const E* vt = v + t * d;
    // ATen's CPU flash attention rounds the probabilities to T for its p @ V product (their
    // sum stays fp32): so does this, else ~1/3 of a bf16 block's outputs differ by an ulp.
    const float pt = round_to<T>(p[t]);
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) acc[i] += pt * Elem<T>::load(vt[i]);
  }
  const float inv = 1.0f / sum;
  E* o = out + (r * s.heads + h) * d;
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) o[i] = Elem<T>::store(acc[i] * inv);
}

#define SK_LEAN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))

// The heads split over the pool, each thread with its own scratch.
template <DType T>
inline __attribute__((always_inline)) void attention_body(const float* q, const void* kcv, const void* vcv,
                                                          const AttnShape& s, float scale, float* scratch,
                                                          int64_t per, int64_t rh, int slot, void* outv) {
  using E = typename Elem<T>::type;
  attention_head<T>(q, static_cast<const E*>(kcv), static_cast<const E*>(vcv), s, scale, scratch + slot * per,
                    static_cast<E*>(outv), rh / s.heads, rh % s.heads);
}

template <DType T>
SK_LEAN_AVX512 void attention_chunk_avx512(const float* q, const void* kcv, const void* vcv, const AttnShape& s,
                                           float scale, float* scratch, int64_t per, int64_t rh, int slot,
                                           void* outv) {
  attention_body<T>(q, kcv, vcv, s, scale, scratch, per, rh, slot, outv);
}

template <DType T>
void attention_chunk(const float* q, const void* kcv, const void* vcv, const AttnShape& s, float scale,
                     float* scratch, int64_t per, int64_t rh, int slot, void* outv) {
  attention_body<T>(q, kcv, vcv, s, scale, scratch, per, rh, slot, outv);
}

template <DType T>
void attention_t(const float* q, const void* kcv, const void* vcv, const AttnShape& s, float scale, int threads,
                 float* scratch, void* outv) {
  const int64_t per = s.pos + 1 + s.head_dim;
  const bool wide = active_isa() >= Isa::kAvx512;
  parallel_for(s.rows * s.heads, threads, [&](int64_t rh, int slot) {
    if (wide) {
      attention_chunk_avx512<T>(q, kcv, vcv, s, scale, scratch, per, rh, slot, outv);
    } else {
      attention_chunk<T>(q, kcv, vcv, s, scale, scratch, per, rh, slot, outv);
    }
  });
}

template <DType T>
inline __attribute__((always_inline)) void silu_mul_body(const void* guv, int64_t rows, int64_t inter, void* outv) {
  using E = typename Elem<T>::type;
  const E* gu = static_cast<const E*>(guv);
  E* out = static_cast<E*>(outv);
  for (int64_t r = 0; r < rows; ++r) {
    const E* g = gu + r * 2 * inter;
    const E* u = g + inter;
    E* o = out + r * inter;
#pragma omp simd
    for (int64_t i = 0; i < inter; ++i) {
      const float x = Elem<T>::load(g[i]);
      o[i] = Elem<T>::store(round_to<T>(x / (1.0f + fast_exp(-x))) * Elem<T>::load(u[i]));
    }
  }
}

template <DType T>
SK_LEAN_AVX512 void silu_mul_avx512(const void* gu, int64_t rows, int64_t inter, void* out) {
  silu_mul_body<T>(gu, rows, inter, out);
}

template <DType T>
void silu_mul_t(const void* gu, int64_t rows, int64_t inter, void* out) {
  if (active_isa() >= Isa::kAvx512) return silu_mul_avx512<T>(gu, rows, inter, out);
  silu_mul_body<T>(gu, rows, inter, out);
}

}  // namespace

#define SK_LEAN_DISPATCH(t, fn, ...)                           \
  switch (t) {                                                 \
    case DType::kBF16: return fn<DType::kBF16>(__VA_ARGS__);   \
    case DType::kF16: return fn<DType::kF16>(__VA_ARGS__);     \
    default: return fn<DType::kF32>(__VA_ARGS__);              \
  }

void add_rms_norm(void* h, const void* y, const void* w, float eps, int64_t rows, int64_t dim, DType t, void* out) {
  SK_LEAN_DISPATCH(t, add_norm_t, h, y, w, eps, rows, dim, out)
}

void rotary_kv(const void* qkv, const void* cos, const void* sin, const AttnShape& s, DType t, float* q_out,
               void* k_cache, void* v_cache) {
  SK_LEAN_DISPATCH(t, rotary_t, qkv, cos, sin, s, q_out, k_cache, v_cache)
}

void attention(const float* q, const void* k_cache, const void* v_cache, const AttnShape& s, float scale, DType t,
               int threads, float* scratch, void* out) {
  SK_LEAN_DISPATCH(t, attention_t, q, k_cache, v_cache, s, scale, threads, scratch, out)
}

void silu_mul(const void* gu, int64_t rows, int64_t inter, DType t, void* out) {
  SK_LEAN_DISPATCH(t, silu_mul_t, gu, rows, inter, out)
}

}  // namespace sparsekern::lean
