// linear_common.h's one function: x rows converted to fp32 (the N:M and block-sparse linears, the
// dense GEMV's AVX2 loops).
#include "cpu/linear_common.h"

#include <algorithm>
#include <cstring>

#include "cpu/parallel.h"

namespace sparsekern {

void convert_rows_f32(const void* x, int64_t rows, int64_t k, int64_t ldx, DType t, float* dst, int64_t ld_dst,
                      int threads) {
  parallel_range(rows, threads, grain_for(k), [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) {
      float* d = dst + r * ld_dst;
      if (t == DType::kF32) {
        std::memcpy(d, static_cast<const float*>(x) + r * ldx, k * sizeof(float));
      } else {
        const uint16_t* s = static_cast<const uint16_t*>(x) + r * ldx;
        if (t == DType::kBF16) {
          for (int64_t i = 0; i < k; ++i) d[i] = bf16_to_f32(s[i]);
        } else {
          for (int64_t i = 0; i < k; ++i) d[i] = f16_to_f32(s[i]);
        }
      }
      std::fill(d + k, d + ld_dst, 0.0f);
    }
  });
}

}  // namespace sparsekern
