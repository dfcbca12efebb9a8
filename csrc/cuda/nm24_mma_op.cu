// Torch registration of sparsekern::_nm24_mma (schema in sparsekern/ops.py): the 2:4 mma.sp GEMM
// y = x @ W^T + bias on a weight already in the hardware layout of sparsekern/formats/sm80.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

// setup.py defines SPARSEKERN_TORCH for nvcc too; the compile test may build this file alone.
#ifndef SPARSEKERN_TORCH
#define SPARSEKERN_TORCH
#endif
#include "cpu/output.h"
#include "cuda/nm24_mma.cuh"

namespace {

using sparsekern::nm24::kBK;
using sparsekern::nm24::kBM;

at::Tensor nm24_mma(const at::Tensor& x_in, const at::Tensor& values, const at::Tensor& meta, int64_t out_features,
                    const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x_in.dim() == 2, "x: expected a 2-D [M, K] tensor, got shape ", x_in.sizes());
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16,
                   "x: expected dtype float16 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK_VALUE(x_in.is_cuda(), "x: expected a CUDA tensor, got device ", x_in.device());
  TORCH_CHECK_TYPE(values.scalar_type() == x_in.scalar_type(), "values_hw: expected dtype ", x_in.scalar_type(),
                   " (that of x), got ", values.scalar_type());
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kInt, "meta_hw: expected dtype int32, got ", meta.scalar_type());
  TORCH_CHECK_VALUE(values.device() == x_in.device() && meta.device() == x_in.device(),
                    "values_hw/meta_hw: expected device ", x_in.device(), ", got ", values.device(), " / ",
                    meta.device());
  TORCH_CHECK_VALUE(values.dim() == 2 && values.is_contiguous(), "values_hw: expected a contiguous 2-D tensor, got ",
                    values.sizes());
  const int64_t n_pad = values.size(0), k_pad = values.size(1) * 2;
  TORCH_CHECK_VALUE(n_pad % kBM == 0 && k_pad % kBK == 0, "values_hw: expected [N_pad, K_pad/2] with N_pad % ", kBM,
                    " == 0 and K_pad % ", kBK, " == 0, got ", values.sizes());
  TORCH_CHECK_VALUE(meta.is_contiguous() && meta.dim() == 2 && meta.size(0) == k_pad / 32 && meta.size(1) == n_pad,
                    "meta_hw: expected contiguous shape [", k_pad / 32, ", ", n_pad, "], got ", meta.sizes());
  const int64_t M = x_in.size(0), K = x_in.size(1), N = out_features;
  TORCH_CHECK_VALUE(N >= 1 && N <= n_pad && N > n_pad - kBM, "out_features: expected a value in (", n_pad - kBM, ", ",
                    n_pad, "] for values_hw of shape ", values.sizes(), ", got ", N);
  TORCH_CHECK_VALUE(K % 4 == 0 && K <= k_pad && K > k_pad - kBK, "x: expected K in (", k_pad - kBK, ", ", k_pad,
                    "] and divisible by 4 for values_hw of shape ", values.sizes(), ", got shape ", x_in.sizes());
  TORCH_CHECK_VALUE(M <= INT32_MAX && n_pad * k_pad <= INT32_MAX * int64_t{2}, "x/values_hw: too large for int32 indexing");
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == x_in.scalar_type(), "bias: expected dtype ", x_in.scalar_type(), ", got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N && bias->device() == x_in.device(),
                      "bias: expected shape [", N, "] on ", x_in.device(), ", got ", bias->sizes(), " on ",
                      bias->device());
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  // cp.async moves 16-byte chunks: rows must start 16-byte aligned and K must be a multiple of 8
  // so no chunk straddles K. Otherwise pad x with zero columns up to K_pad (a copy).
  at::Tensor x = x_in;
  const bool aligned = x.stride(1) == 1 && x.stride(0) % 8 == 0 && K % 8 == 0 &&
                       reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  if (!aligned) x = at::constant_pad_nd(x_in, {0, k_pad - K}, 0).contiguous();
  const int64_t k_eff = aligned ? K : k_pad;
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = sparsekern::new_output({M, N}, x_in.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (x.scalar_type() == at::kHalf) {
    using T = __half;
    err = sparsekern::nm24::launch_nm24_mma<T>(
        reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const T*>(values.data_ptr()),
        reinterpret_cast<const uint32_t*>(meta.data_ptr()),
        b.defined() ? reinterpret_cast<const T*>(b.data_ptr()) : nullptr, reinterpret_cast<T*>(y.data_ptr()), M, N,
        k_eff, x.stride(0), n_pad, k_pad, stream);
  } else {
    using T = __nv_bfloat16;
    err = sparsekern::nm24::launch_nm24_mma<T>(
        reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const T*>(values.data_ptr()),
        reinterpret_cast<const uint32_t*>(meta.data_ptr()),
        b.defined() ? reinterpret_cast<const T*>(b.data_ptr()) : nullptr, reinterpret_cast<T*>(y.data_ptr()), M, N,
        k_eff, x.stride(0), n_pad, k_pad, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "sparsekern::_nm24_mma: launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("_nm24_mma", &nm24_mma); }
