// The AVX-512 BF16 quantized N:M decode kernel's fp32-x instances (nm_linear_avx512_kernels.h):
// compiled apart from nm_linear_avx512.cpp so the two build in parallel.
#include "cpu/nm_linear_avx512_kernels.h"

#if defined(__x86_64__)
namespace sparsekern::detail {

void nm_quantized_f32x_avx512(const NMLinearArgs& a, const uint16_t* xb, int64_t ldb, const float* sx) {
  if (sx) return quantized_x<XMode<float, true, 1>>(a, xb, ldb, sx);
  return a.x_parts >= 3 ? quantized_x<XMode<float, false, 3>>(a, xb, ldb, sx)
                        : quantized_x<XMode<float, false, 2>>(a, xb, ldb, sx);
}

}  // namespace sparsekern::detail
#endif
