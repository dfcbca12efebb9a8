// Sparse GEMM for many rows of x (prefill) on AVX2+FMA CPUs, for N:M weights with n of 1, 2 or
// 4 and m of 2, 4 or 8 (2:4, 1:4, 2:8, 4:8, 1:2, 1:8): no dense copy of W and no dense tile, n / m
// of the dense GEMM's multiply-adds. fp32, bf16 or fp16 x (bf16 / fp16 converted to fp32 once);
// values as stored or int8 / int4 (scale groups of a multiple of 8 kept slots, or one per row)
// dequantized to fp32, as the decompressed fp32 tiles of the path it replaces held them.
//
// Vectorized over rows of x, not over output features: x goes transposed, column after column,
// each column 80 rows (10 vectors of 8) of a pass, so a kept slot (value v, column c) of feature
// o adds v * x[rows, c] with one broadcast and 10 FMAs that take x from memory (L1). No permute:
// on AVX2 a vpermps per 8 products would bound the kernel at one 8-lane product per cycle.
// Accumulators: the rows of one feature's pass in up to 10 registers, over a K block of 64 columns
// (20 KiB of transposed x, in L1).
//
// Work: tasks of 64 to 256 features claimed by the threads (OpenMP's team, as the AVX-512 GEMM:
// see parallel.h); a task walks K in blocks, packs its features' kept slots of the block (fp32
// values and the byte offset of each slot's column in the block's transposed x; 8 slots at a time
// from the meta fields; the next block's values prefetched) and runs every pass of rows over
// them, with fp32 sums per feature and row between blocks; then the sums are transposed (8 x 8)
// into the output, plus the bias. Rows of x go 640 at a time (up to 8 passes, of as even a
// number of vectors as can be), transposed and converted first.
//
// NOTE: Zen 3 EPYC (AVX2), 1 thread, a stand-alone loop of the micro-kernel, 64 features x 4096
// columns (kept multiply-adds per second; torch's dense fp32 GEMM, 1 thread: 25 G at 96 rows, 36-43
// G at 512): 8 vectors 33-34 G, 10 vectors 35-37 G, 12 vectors 28-34 G; K blocks of 32 to 96
// columns alike, 128 slower (x past L1). The loop at 12 vectors on 64 fixed columns in order: 45 G; random
// columns from a table: 40 G (FMA peak 51 G). The array-of-__m256 form of the accumulators
// spilled all of them to the stack at every slot (12-14 G): they are named. The whole kernel,
// 2:4, 11008x4096 @ 512 rows: 24-27 G a thread. Crossovers against the decode passes:
// nm_linear_op.cpp; against dense: bench/results.
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "cpu/aligned.h"
#include "cpu/isa.h"
#include "cpu/linear_avx2.h"
#include "cpu/nm_linear.h"
#include "cpu/parallel.h"

namespace sparsekern::detail {
namespace {

constexpr int kVecs = 10;                           // vectors of 8 rows per micro-kernel
constexpr int64_t kPassRows = 8 * kVecs;            // rows of a pass: a transposed column's length
constexpr int64_t kBlockCols = 64;                  // columns of x per K block
constexpr int64_t kMaxFeatures = 256;               // output features per task, at most
constexpr int64_t kSuperRows = 8 * kPassRows;       // rows of x transposed at a time
constexpr int64_t kColBytes = kPassRows * sizeof(float);

#define SK_ACC_INIT(i)                                                     \
  __m256 a##i = _mm256_setzero_ps();                                       \
  if constexpr (R > i) {                                                   \
    if (!first) a##i = _mm256_load_ps(c + 8 * i);                          \
  }
#define SK_ACC_FMA(i) \
  if constexpr (R > i) a##i = _mm256_fmadd_ps(w, _mm256_load_ps(p + 8 * i), a##i);
#define SK_ACC_STORE(i) \
  if constexpr (R > i) _mm256_store_ps(c + 8 * i, a##i);
#define SK_ACC_ALL(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9)
static_assert(kVecs == 10, "SK_ACC_ALL names kVecs accumulators");

// c[0 .. 8R) (+)= sum over slots j < ns of v[j] * the column at byte offset off[j] of xb (its
// first 8R rows); ns even.
template <int R>
SK_AVX2 void micro(const float* v, const int32_t* off, int64_t ns, const char* xb, float* c, bool first) {
  SK_ACC_ALL(SK_ACC_INIT)
  for (int64_t j = 0; j < ns; j += 2) {
    {
      const __m256 w = _mm256_broadcast_ss(v + j);
      const float* p = reinterpret_cast<const float*>(xb + off[j]);
      SK_ACC_ALL(SK_ACC_FMA)
    }
    {
      const __m256 w = _mm256_broadcast_ss(v + j + 1);
      const float* p = reinterpret_cast<const float*>(xb + off[j + 1]);
      SK_ACC_ALL(SK_ACC_FMA)
    }
  }
  SK_ACC_ALL(SK_ACC_STORE)
}

#undef SK_ACC_INIT
#undef SK_ACC_FMA
#undef SK_ACC_STORE
#undef SK_ACC_ALL

using MicroFn = void (*)(const float*, const int32_t*, int64_t, const char*, float*, bool);
template <int... R>
constexpr MicroFn micro_for(int vecs, std::integer_sequence<int, R...>) {
  MicroFn fn = nullptr;
  ((fn = vecs == R + 1 ? micro<R + 1> : fn), ...);
  return fn;
}

// Rows [r0, r0 + 8) (those past `rows`: zero) of x, all K columns, as fp32 into the transposed
// pass xt (column c at xt + c * kPassRows, these rows at lane offset lane0).
template <DType T>
SK_AVX2 void transpose_rows(const NMLinearArgs& a, int64_t r0, int64_t rows, float* xt, int64_t lane0) {
  using E = typename Elem<T>::type;
  const E* x = static_cast<const E*>(a.x);
  const int live = static_cast<int>(std::min<int64_t>(8, rows - r0));
  for (int64_t c = 0; c < a.k; c += 8) {
    const int cols = static_cast<int>(std::min<int64_t>(8, a.k - c));
    __m256 r[8];
    for (int i = 0; i < 8; ++i) {
      if (i >= live) {
        r[i] = _mm256_setzero_ps();
        continue;
      }
      const E* src = x + (r0 + i) * a.ldx + c;
      r[i] = cols == 8 ? load8<T>(src) : load_partial<T>(src, cols);
    }
    transpose8(r);
    for (int j = 0; j < cols; ++j) _mm256_store_ps(xt + (c + j) * kPassRows + lane0, r[j]);
  }
}

// The kept slots of features [o0, o0 + live) in the K block at column b0: feature f's slots at
// v / off + f * stride (stride a multiple of 8; slots past the row's last: value 0, column 0 of
// the block). off: the slot's column within the block times kColBytes.
template <DType T>
SK_AVX2 void pack_block(const NMLinearArgs& a, int64_t o0, int live, int64_t b0, int64_t stride,
                        float* v, int32_t* off) {
  using E = typename Elem<T>::type;
  const int n = a.n, m = a.m, bits = log2i(m);
  const int64_t kept = a.k / m * n, j0 = b0 / m * n, j1 = std::min(kept, (b0 + kBlockCols) / m * n);
  const int per_word = 32 / bits;
  const __m256i shifts = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));
  const __m256i field = _mm256_set1_epi32((1 << bits) - 1);
  // slot j + l (j a multiple of 8) lies in group j / n + l / n (n of 1, 2 or 4: a shift)
  const __m256i groups = _mm256_srli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), n / 2);
  // The next block's values and meta, fetched while this one runs: 64 rows are too many streams
  // for the hardware prefetcher. NOTE: Zen 3, 2:4 fp32 11008x4096 @ 512 rows, 1 thread: without
  // it, the first load of each 8 values took 69% of the packing's time, packing 20% of the call.
  const int64_t slot_bits = a.qbits ? a.qbits : 8 * static_cast<int64_t>(sizeof(E));
  const int64_t next = std::min(kept, j1 + (j1 - j0)), row_bytes = kept * slot_bits / 8;
  for (int f = 0; f < live; ++f) {
    const int64_t o = o0 + f;
    const int32_t* meta = a.meta + o * a.meta_words;
    if (j1 < kept) {
      const char* vf = static_cast<const char*>(a.values) + o * row_bytes;
      const int64_t end = next * slot_bits / 8;
      for (int64_t l = j1 * slot_bits / 8; l < end; l += 64) _mm_prefetch(vf + l, _MM_HINT_T0);
      _mm_prefetch(vf + end - 1, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(meta + j1 / per_word), _MM_HINT_T0);
    }
    for (int64_t j = j0; j < j0 + stride; j += 8) {
      float* vd = v + f * stride + (j - j0);
      int32_t* od = off + f * stride + (j - j0);
      const int cnt = static_cast<int>(std::min<int64_t>(8, j1 - j));
      if (cnt <= 0) {
        _mm256_store_ps(vd, _mm256_setzero_ps());
        _mm256_store_si256(reinterpret_cast<__m256i*>(od), _mm256_setzero_si256());
        continue;
      }
      const uint32_t fields = nm_meta_chunk8(meta, a.meta_words, j / per_word, static_cast<int>(j % per_word), bits);
      __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(fields)), shifts), field);
      // column within the block: (group - first group of the block) * m + index
      const __m256i group = _mm256_add_epi32(groups, _mm256_set1_epi32(static_cast<int32_t>(j / n - b0 / m)));
      idx = _mm256_add_epi32(_mm256_mullo_epi32(group, _mm256_set1_epi32(m)), idx);
      __m256 val;
      if (cnt < 8) {  // the row's last slots: scalar, zero past them
        alignas(32) float t[8] = {};
        for (int l = 0; l < cnt; ++l) t[l] = nm_weight(a, o, j + l);
        val = _mm256_load_ps(t);
        idx = _mm256_and_si256(idx, _mm256_castps_si256(lane_mask(cnt)));
      } else if (a.qbits) {
        const int64_t g = a.groups == 1 ? 0 : j / a.group_kept;
        const __m256i q = _mm256_sub_epi32(load8q(a.values, a.qbits, o * kept + j), _mm256_set1_epi32(nm_zero(a, o, g)));
        val = _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(nm_scale(a, o, g)));
      } else {
        val = load8<T>(static_cast<const E*>(a.values) + o * kept + j);
      }
      _mm256_store_ps(vd, val);
      _mm256_store_si256(reinterpret_cast<__m256i*>(od), _mm256_mullo_epi32(idx, _mm256_set1_epi32(kColBytes)));
    }
  }
}

// The vectors of 8 rows of a super pass, split into passes of at most kVecs, as even as can be
// (a last pass of a few vectors would run far below the micro-kernel's rate): the first `extra`
// passes hold base + 1 vectors, the others base.
struct Passes {
  int64_t vecs, passes, base, extra;
  explicit Passes(int64_t v)
      : vecs(v), passes((v + kVecs - 1) / kVecs), base(vecs / passes), extra(vecs % passes) {}
  int64_t first(int64_t p) const { return p * base + std::min(p, extra); }
  int64_t size(int64_t p) const { return base + (p < extra ? 1 : 0); }
  int64_t pass_of(int64_t g) const {
    return g < extra * (base + 1) ? g / (base + 1) : extra + (g - extra * (base + 1)) / base;
  }
};

template <DType T>
SK_AVX2 void gemm(const NMLinearArgs& a) {
  using E = typename Elem<T>::type;
  const int64_t kept = a.k / a.m * a.n, per_block = kBlockCols / a.m * a.n;  // slots a full block
  const int64_t n_blocks = (a.k + kBlockCols - 1) / kBlockCols;
  const int threads = std::max(a.threads, 1);
  // Features per task: a multiple of 64, at most kMaxFeatures, about four tasks per thread. Each
  // task reads all of the transposed x once per block. NOTE: Zen 3, 2 threads, 2:4 fp32 @ 512
  // rows, one process, interleaved (x dense): 11008x4096 64 features 1.25x, 128 1.31x, 256 1.44x;
  // 5632x2048 1.27x, 1.30x, 1.30x.
  const int64_t features = 64 * std::clamp<int64_t>(a.out_features / (4 * threads * 64), 1, kMaxFeatures / 64);
  const int64_t tasks = (a.out_features + features - 1) / features;
  const int64_t super_rows = std::min(kSuperRows, a.rows);
  const int64_t max_passes = (super_rows + kPassRows - 1) / kPassRows, ldc = max_passes * kPassRows;
  auto xt = aligned_array<float>(max_passes * a.k * kPassRows);
  std::vector<AlignedArray<float>> sums, vals;
  std::vector<AlignedArray<int32_t>> offs;
  for (int t = 0; t < threads; ++t) {
    sums.push_back(aligned_array<float>(features * ldc));
    std::memset(sums.back().get(), 0, sizeof(float) * features * ldc);  // lanes of absent features: read, not stored
    vals.push_back(aligned_array<float>(features * per_block));
    offs.push_back(aligned_array<int32_t>(features * per_block));
  }
  E* out = static_cast<E*>(a.out);
  constexpr auto kOpenMP = ThreadPool::Team::kOpenMP;  // as the AVX-512 GEMM (file comment)
  for (int64_t r0 = 0; r0 < a.rows; r0 += kSuperRows) {
    const int64_t nrows = std::min(kSuperRows, a.rows - r0);
    const Passes ps((nrows + 7) / 8);
    parallel_for(ps.vecs, threads, [&](int64_t g, int) SK_AVX2 {
      const int64_t p = ps.pass_of(g);
      transpose_rows<T>(a, r0 + 8 * g, r0 + nrows, xt.get() + p * a.k * kPassRows, 8 * (g - ps.first(p)));
    }, kOpenMP);
    auto task_fn = [&](int64_t task, int slot) SK_AVX2 {
      const int64_t o0 = task * features;
      const int live = static_cast<int>(std::min(features, a.out_features - o0));
      float* c = sums[slot].get();
      float* v = vals[slot].get();
      int32_t* off = offs[slot].get();
      for (int64_t b = 0; b < n_blocks; ++b) {
        const int64_t b0 = b * kBlockCols;
        const int64_t slots = (std::min(kept, (b0 + kBlockCols) / a.m * a.n) - b0 / a.m * a.n + 7) / 8 * 8;
        pack_block<T>(a, o0, live, b0, slots, v, off);
        for (int64_t p = 0; p < ps.passes; ++p) {
          const MicroFn fn = micro_for(static_cast<int>(ps.size(p)), std::make_integer_sequence<int, kVecs>{});
          const char* xb = reinterpret_cast<const char*>(xt.get() + (p * a.k + b0) * kPassRows);
          for (int f = 0; f < live; ++f) fn(v + f * slots, off + f * slots, slots, xb, c + f * ldc + p * kPassRows, b == 0);
        }
      }
      // The sums, transposed 8 features x 8 rows at a time, plus the bias, into out.
      for (int f8 = 0; f8 < live; f8 += 8) {
        const int nf = std::min(8, live - f8);
        __m256 bias = _mm256_setzero_ps();
        if (a.bias) {
          const E* bp = static_cast<const E*>(a.bias) + o0 + f8;
          bias = nf == 8 ? load8<T>(bp) : load_partial<T>(bp, nf);
        }
        for (int64_t r8 = 0; r8 < nrows; r8 += 8) {
          const int64_t p = ps.pass_of(r8 / 8), lane = 8 * (r8 / 8 - ps.first(p));
          __m256 t[8];
          for (int i = 0; i < 8; ++i) t[i] = _mm256_load_ps(c + (f8 + i) * ldc + p * kPassRows + lane);
          transpose8(t);
          for (int j = 0; j < 8 && r8 + j < nrows; ++j) store8<T>(out + (r0 + r8 + j) * a.ldo + o0 + f8, _mm256_add_ps(t[j], bias), nf);
        }
      }
    };
    parallel_for(tasks, threads, task_fn, kOpenMP);
  }
}

}  // namespace

bool nm_gemm_avx2_supported(const NMLinearArgs& a) {
  if (a.act_block || a.k % a.m != 0 || active_isa() < Isa::kAvx2) return false;
  if ((a.n != 1 && a.n != 2 && a.n != 4) || (a.m != 2 && a.m != 4 && a.m != 8) || a.n >= a.m) return false;
  // Quantized values: each 8-slot step of a pack lies in one scale group.
  return !a.qbits || a.groups == 1 || a.group_kept % 8 == 0;
}

void nm_gemm_avx2(const NMLinearArgs& a) {
  switch (a.dtype) {
    case DType::kBF16: return gemm<DType::kBF16>(a);
    case DType::kF16: return gemm<DType::kF16>(a);
    default: return gemm<DType::kF32>(a);
  }
}

}  // namespace sparsekern::detail
#endif
