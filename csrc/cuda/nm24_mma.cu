// Host launchers of the 2:4 mma.sp GEMM (kernel in nm24_mma.cuh). Torch-free, so the nvcc
// compile + SASS checks (cmake/cuda_checks.cmake) build this file without libtorch.
#include "nm24_mma.cuh"

namespace sparsekern {
namespace nm24 {

template <typename T, typename C>
static cudaError_t launch_config(const T* x, const T* values, const uint32_t* meta, const T* bias, T* y, int M, int N,
                                 int K, int lda, int n_pad, int k_pad, cudaStream_t stream) {
  auto kernel = nm24_mma_kernel<T, C>;
  // Above 48 KiB of dynamic shared memory a kernel must opt in (once per kernel is enough,
  // but the call is cheap next to a GEMM and keeps this stateless).
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM_BYTES);
  if (err != cudaSuccess) return err;
  const dim3 grid(n_pad / kBM, (M + C::BN - 1) / C::BN);
  if (grid.y > 65535) return cudaErrorInvalidConfiguration;
  kernel<<<grid, kThreads, C::SMEM_BYTES, stream>>>(x, values, meta, bias, y, M, N, K, lda, n_pad, k_pad);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_nm24_mma(const T* x, const T* values, const uint32_t* meta, const T* bias, T* y, int M, int N,
                            int K, int lda, int n_pad, int k_pad, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  // NOTE: unmeasured (no GPU yet): the 32-row x tile is a guess for where the 128-row tile's
  // zero fill starts to dominate; bench/bench_nm24_gpu.py sweeps M to place the switch.
  if (M <= 64) return launch_config<T, ConfigSmall>(x, values, meta, bias, y, M, N, K, lda, n_pad, k_pad, stream);
  return launch_config<T, ConfigLarge>(x, values, meta, bias, y, M, N, K, lda, n_pad, k_pad, stream);
}

template cudaError_t launch_nm24_mma<__half>(const __half*, const __half*, const uint32_t*, const __half*, __half*, int,
                                             int, int, int, int, int, cudaStream_t);
template cudaError_t launch_nm24_mma<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*, const uint32_t*,
                                                    const __nv_bfloat16*, __nv_bfloat16*, int, int, int, int, int, int,
                                                    cudaStream_t);

}  // namespace nm24
}  // namespace sparsekern
