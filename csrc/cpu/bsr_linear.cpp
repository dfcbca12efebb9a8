// Block-sparse linear: ISA dispatch, the portable kernel, block-row decompression.
#include "cpu/bsr_linear.h"

#include <algorithm>
#include <vector>

#include "cpu/parallel.h"

namespace sparsekern {

namespace detail {

void bsr_linear_portable(const BSRLinearArgs& a) {
  const int64_t kb = a.k / a.bk;
  std::vector<float> xf(a.rows * a.k);
  convert_rows_f32(a.x, a.rows, a.k, a.ldx, a.dtype, xf.data(), a.k, a.threads);
  std::vector<std::vector<float>> accs(a.threads, std::vector<float>(a.bm));
  std::vector<std::vector<float>> wrows(a.threads, std::vector<float>(a.bk));
  parallel_block_rows(a, [&](int64_t rb, int slot) {
    std::vector<float>& acc = accs[slot];
    std::vector<float>& wrow = wrows[slot];
    int64_t begin, end;
    bsr_row_range(a, rb, &begin, &end);
    for (int64_t r = 0; r < a.rows; ++r) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      const float* xr = xf.data() + r * a.k;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t c = a.col[b];
        if (c < 0 || c >= kb) continue;
        const float* xs = xr + c * a.bk;
        for (int i = 0; i < a.bm; ++i) {
          for (int kk = 0; kk < a.bk; ++kk) wrow[kk] = bsr_weight(a, b, i, kk);
          float s = 0.0f;
          for (int kk = 0; kk < a.bk; ++kk) s += wrow[kk] * xs[kk];
          acc[i] += s;
        }
      }
      for (int i = 0; i < a.bm; ++i) bsr_store(a, r, rb * a.bm + i, acc[i]);
    }
  });
}

}  // namespace detail

void bsr_linear_decode(const BSRLinearArgs& args, Isa isa) {
  BSRLinearArgs a = args;
  a.threads = decode_threads(a.threads, a.rows * a.nnz * a.bm * a.bk);
#if defined(__x86_64__)
  if (a.qbits) {
    if (isa >= Isa::kAvx512 && detail::bsr_linear_decode_quant_avx512(a)) return;
    if (isa >= Isa::kAvx2 && detail::bsr_linear_decode_quant_avx2(a)) return;
    return detail::bsr_linear_portable(a);
  }
  if (isa >= Isa::kAvx512Bf16 && detail::bsr_linear_decode_bf16_avx512(a)) return;
  if (isa >= Isa::kAvx2) return detail::bsr_linear_decode_avx2(a);
#else
  (void)isa;
#endif
  detail::bsr_linear_portable(a);
}

void bsr_linear_batched(const BSRLinearArgs& a, Isa isa) {
#if defined(__x86_64__)
  if (isa >= Isa::kAvx2) return detail::bsr_linear_batched_avx2(a);
#else
  (void)isa;
#endif
  detail::bsr_linear_portable(a);
}

void bsr_decompress_rows(const BSRLinearArgs& a, int64_t rb0, int64_t nrb, void* dense, int64_t ld) {
  const int64_t kb = a.k / a.bk, es = dtype_size(a.dtype), bsz = static_cast<int64_t>(a.bm) * a.bk;
  char* d = static_cast<char*>(dense);
  const char* blocks = static_cast<const char*>(a.blocks);
  parallel_for(nrb, a.threads, [&](int64_t i, int) {
    char* tile = d + i * a.bm * ld * es;
    for (int r = 0; r < a.bm; ++r) std::memset(tile + r * ld * es, 0, a.k * es);
    int64_t begin, end;
    bsr_row_range(a, rb0 + i, &begin, &end);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c = a.col[b];
      if (c < 0 || c >= kb) continue;
      if (a.qbits) {  // dequantized, as the reference (fp32, then the weight's dtype)
        for (int r = 0; r < a.bm; ++r)
          for (int kk = 0; kk < a.bk; ++kk)
            store_f32(tile, r * ld + c * a.bk + kk, bsr_weight(a, b, r, kk), a.dtype);
        continue;
      }
      for (int r = 0; r < a.bm; ++r)
        std::memcpy(tile + (r * ld + c * a.bk) * es, blocks + (b * bsz + static_cast<int64_t>(r) * a.bk) * es,
                    a.bk * es);
    }
  });
}

}  // namespace sparsekern
