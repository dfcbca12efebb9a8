// N:M linear: ISA dispatch, the portable decode kernel, and row-tile decompression.
#include "cpu/nm_linear.h"

#include <algorithm>
#include <vector>

#include "cpu/parallel.h"

namespace sparsekern {

namespace detail {

void nm_linear_decode_portable(const NMLinearArgs& a) {
  const int64_t groups = a.k / a.m;
  const int bits = log2i(a.m);
  std::vector<float> xf(a.rows * a.k);
  convert_rows_f32(a.x, a.rows, a.k, a.ldx, a.dtype, xf.data(), a.k, a.threads);
  constexpr int kRowBlock = 8;
  parallel_range(a.out_features, a.threads, 16, [&](int64_t o0, int64_t o1, int) {
    for (int64_t o = o0; o < o1; ++o) {
      const int32_t* mrow = a.meta + o * a.meta_words;
      for (int64_t r0 = 0; r0 < a.rows; r0 += kRowBlock) {
        const int nr = static_cast<int>(std::min<int64_t>(kRowBlock, a.rows - r0));
        float acc[kRowBlock] = {};
        MetaReader meta(mrow, a.meta_words, bits);
        int64_t j = 0;
        for (int64_t g = 0; g < groups; ++g) {
          for (int s = 0; s < a.n; ++s, ++j) {
            const int64_t c = g * a.m + meta.next();
            const float v = nm_weight(a, o, j);
            for (int r = 0; r < nr; ++r) acc[r] += v * xf[(r0 + r) * a.k + c];
          }
        }
        const float b = a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f;
        for (int r = 0; r < nr; ++r) store_f32(a.out, (r0 + r) * a.ldo + o, acc[r] + b, a.dtype);
      }
    }
  });
}

}  // namespace detail

void nm_linear_decode(const NMLinearArgs& args, Isa isa) {
  NMLinearArgs a = args;
  a.threads = decode_threads(a.threads, a.rows * a.out_features * (a.k / a.m * a.n));
#if defined(__x86_64__)
  if (a.act_block && isa >= Isa::kAvx512 && detail::nm_a8_avx512_supported(a)) {
    return detail::nm_linear_decode_a8_avx512(a);
  }
  if (isa >= Isa::kAvx512 && detail::nm_avx512_supported(a)) return detail::nm_linear_decode_avx512(a);
  // Quantized values (but 2:4, 1:4, 2:8 and 4:8 on AVX-512 BF16 with bf16 x, or fp32 x at one row,
  // above): the quads kernel where each 8-slot half of its steps lies in one scale group (int8
  // activations: on x as rounded).
  // NOTE: 4:8 int8 +a8, 11008x4096, 1 row, bf16, Zen 4: 49 ms in the portable kernel.
  if (isa >= Isa::kAvx2 && a.qbits && detail::nm_quads_supported(a.n, a.m) &&
      (a.groups == 1 || a.group_kept % 8 == 0)) {
    return detail::nm_linear_decode_quads_avx2(a);
  }
#endif
  if (a.act_block) return detail::nm_linear_decode_a8_portable(a);
#if defined(__x86_64__)
  if (isa >= Isa::kAvx2 && !a.qbits) return detail::nm_linear_decode_avx2(a);
#else
  (void)isa;
#endif
  detail::nm_linear_decode_portable(a);
}

namespace {

template <typename Dst, typename Src, typename Conv>
void scatter_rows(const NMLinearArgs& a, int64_t row0, int64_t nrows, Dst* dense, int64_t ld, Conv conv) {
  const int64_t kept = a.k / a.m * a.n, groups = a.k / a.m;
  const int bits = log2i(a.m);
  const Src* values = static_cast<const Src*>(a.values);
  parallel_range(nrows, a.threads, 16, [&](int64_t i0, int64_t i1, int) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t o = row0 + i;
      Dst* d = dense + i * ld;
      std::memset(d, 0, a.k * sizeof(Dst));
      MetaReader meta(a.meta + o * a.meta_words, a.meta_words, bits);
      const Src* v = values + o * kept;
      for (int64_t g = 0; g < groups; ++g) {
        Dst* dg = d + g * a.m;
        for (int s = 0; s < a.n; ++s) dg[meta.next()] = conv(*v++);
      }
    }
  });
}

}  // namespace

void nm_decompress_rows(const NMLinearArgs& a, int64_t row0, int64_t nrows, void* dense, int64_t ld,
                        DType dense_t) {
#if defined(__x86_64__)
  if (dense_t == DType::kBF16 && active_isa() >= Isa::kAvx512Bf16 &&
      detail::nm_24_decompress_bf16_avx512(a, row0, nrows, dense, ld)) {
    return;
  }
#endif
  if (a.qbits) {  // dequantize: (q - zero) * scale per kept slot, stored as dense_t
    const int bits = log2i(a.m);
    parallel_range(nrows, a.threads, 16, [&](int64_t i0, int64_t i1, int) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t o = row0 + i;
        char* d = static_cast<char*>(dense) + i * ld * dtype_size(dense_t);
        std::memset(d, 0, a.k * dtype_size(dense_t));
        MetaReader meta(a.meta + o * a.meta_words, a.meta_words, bits);
        const int8_t* q8 = static_cast<const int8_t*>(a.values) + o * (a.k / a.m * a.n);
        const uint8_t* q4 = static_cast<const uint8_t*>(a.values) + o * (a.k / a.m * a.n / 2);
        // One scale group at a time (no division or type switch per weight). NOTE: nm_weight
        // per element made the batched path ~2x slower than the dense fallback's GEMM on
        // TinyLlama layers at 128-512 rows, so dispatch kept dense copies for prefill.
        // A scale group covers whole N:M groups (group_size is a multiple of m).
        int64_t j = 0, col = 0;
        for (int64_t sg = 0; sg < a.groups; ++sg) {
          const float scale = nm_scale(a, o, sg);
          const int zero = nm_zero(a, o, sg);
          for (int64_t end = (sg + 1) * a.group_kept; j < end; col += a.m) {
            for (int t = 0; t < a.n; ++t, ++j) {
              const int q = a.qbits == 8 ? q8[j] : (j & 1) ? q4[j >> 1] >> 4 : q4[j >> 1] & 15;
              store_f32(d, col + meta.next(), static_cast<float>(q - zero) * scale, dense_t);
            }
          }
        }
      }
    });
  } else if (dense_t == a.dtype) {  // same element type: copy the bits
    if (a.dtype == DType::kF32) {
      scatter_rows<float, float>(a, row0, nrows, static_cast<float*>(dense), ld, [](float v) { return v; });
    } else {
      scatter_rows<uint16_t, uint16_t>(a, row0, nrows, static_cast<uint16_t*>(dense), ld,
                                       [](uint16_t v) { return v; });
    }
  } else if (dense_t == DType::kF32 && a.dtype == DType::kBF16) {
    scatter_rows<float, uint16_t>(a, row0, nrows, static_cast<float*>(dense), ld, bf16_to_f32);
  } else if (dense_t == DType::kF32 && a.dtype == DType::kF16) {
    scatter_rows<float, uint16_t>(a, row0, nrows, static_cast<float*>(dense), ld, f16_to_f32);
  } else {
    // Only fp32 targets are used besides the native type; anything else goes through fp32.
    std::vector<float> tmp(nrows * a.k);
    nm_decompress_rows(a, row0, nrows, tmp.data(), a.k, DType::kF32);
    for (int64_t i = 0; i < nrows; ++i)
      for (int64_t c = 0; c < a.k; ++c) store_f32(dense, i * ld + c, tmp[i * a.k + c], dense_t);
  }
}

}  // namespace sparsekern
