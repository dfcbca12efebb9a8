// 2:4 sparse GEMM on the sparse tensor cores (mma.sp m16n8k32, sm_80+), torch-free.
//
//   y[M, N] = x[M, K] @ W[N, K]^T + bias[N]      (W 2:4 along K; fp16 or bf16; fp32 accumulate)
//
// mma.sp takes the sparse operand as A (the 16-row side), so each CTA computes a tile of
// y^T = W x^T: W rows are the MMA "M" dimension, x rows the MMA "N" dimension.
//
// Inputs are in the hardware layout made once at load time by sparsekern/formats/sm80.py:
//   values  [N_pad, K_pad/2]   kept weights, row-major (2 per group of 4, in column order)
//   meta    [K_pad/32, N_pad]  uint32 words; per K step of 32 columns and block of 32 rows the
//                              32 words are in the order the 32 lanes of a warp read them
//                              (lane 4b+a; a=0/1: rows b and b+8, K columns 0-15 / 16-31 of
//                              the first 16-row tile; a=2/3: the same for the second tile,
//                              which the MMA reads with sparsity selector 1). Same word order
//                              as CUTLASS / torch's to_sparse_semi_structured.
// N_pad % kBM == 0 and K_pad % kBK == 0, with zero values and valid metadata (0x4: indices 0,1)
// in the padding, so the kernel never predicates W. x is read with predicated, zero-filling
// cp.async (rows >= M, columns >= K); K % 8 == 0 and a 16-byte aligned x (the host wrapper
// pads x otherwise) so every 16-byte chunk is either fully inside or fully outside.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sparsekern {
namespace nm24 {

constexpr int kBM = 128;  // W rows per CTA (padding unit of N in the hardware layout)
constexpr int kBK = 64;   // logical K per pipeline stage (padding unit of K)
constexpr int kThreads = 256;

// Tile configurations: BN = x rows per CTA; WM x WN warps (WM along W rows, WN along x rows).
template <int BN_, int WM_, int WN_, int STAGES_>
struct Config {
  static constexpr int BN = BN_, WM = WM_, WN = WN_, STAGES = STAGES_;
  static constexpr int WARP_ROWS = kBM / WM;  // W rows per warp: a multiple of 32 (meta blocks)
  static constexpr int WARP_COLS = BN / WN;   // x rows per warp: a multiple of 8
  static constexpr int MT = WARP_ROWS / 16;   // m16 tiles per warp
  static constexpr int NT = WARP_COLS / 8;    // n8 tiles per warp
  static constexpr int W_STAGE = kBM * (kBK / 2);  // halfs of W per stage
  static constexpr int X_STAGE = BN * kBK;         // halfs of x per stage
  static constexpr int E_STAGE = (kBK / 32) * kBM; // meta words per stage
  static constexpr int SMEM_BYTES = STAGES * (2 * W_STAGE + 2 * X_STAGE + 4 * E_STAGE);
  static_assert(WM * WN * 32 == kThreads, "8 warps");
  static_assert(WARP_ROWS % 32 == 0, "a warp covers whole 32-row metadata blocks");
  static_assert(WARP_COLS % 8 == 0, "a warp covers whole n8 tiles");
};

// NOTE: unmeasured (no GPU yet). 128x128x64 with 3 stages is 75 KiB of shared memory: two CTAs
// per SM on A100 (164 KiB) and H100 (228 KiB). The small-BN tile is for M <= 64 (decode and
// small batches), where a 128-row x tile would be mostly zero fill.
using ConfigLarge = Config<128, 2, 4, 3>;
using ConfigSmall = Config<32, 4, 2, 4>;

template <typename T>
struct MmaSp;

#if (__CUDACC_VER_MAJOR__ > 12) || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5)
// ordered_metadata: our in-group indices are strictly increasing, as it requires. The plain
// .sp form draws a "reduced performance on future architectures" advisory from ptxas 12.5+.
#define SK_MMA_SP "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32."
#else
#define SK_MMA_SP "mma.sp.sync.aligned.m16n8k32.row.col.f32."
#endif

#define SK_MMA_SP_BODY(TY, SEL)                                                             \
  asm volatile(SK_MMA_SP TY "." TY ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "   \
               "{%0,%1,%2,%3}, %12, " #SEL ";\n"                                            \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                             \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), \
                 "r"(b[3]), "r"(e))

template <>
struct MmaSp<__half> {
  template <int SEL>
  __device__ __forceinline__ static void run(float* d, const uint32_t* a, const uint32_t* b, uint32_t e) {
    if constexpr (SEL == 0) {
      SK_MMA_SP_BODY("f16", 0);
    } else {
      SK_MMA_SP_BODY("f16", 1);
    }
  }
};

template <>
struct MmaSp<__nv_bfloat16> {
  template <int SEL>
  __device__ __forceinline__ static void run(float* d, const uint32_t* a, const uint32_t* b, uint32_t e) {
    if constexpr (SEL == 0) {
      SK_MMA_SP_BODY("bf16", 0);
    } else {
      SK_MMA_SP_BODY("bf16", 1);
    }
  }
};

// Explicit conversions: torch builds define __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy that bypasses L1; src_bytes == 0 writes zeros (edge tiles).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Shared-memory swizzles (16-byte chunk index XOR row bits) so that the 8 row addresses of
// each ldmatrix 8x8 matrix fall in 8 distinct bank groups.
// W tile: rows of 64 bytes (4 chunks); two rows share a 128-byte line.
__device__ __forceinline__ int w_off(int row, int chunk) { return row * 32 + ((chunk ^ ((row >> 1) & 3)) << 3); }
// x tile: rows of 128 bytes (8 chunks).
__device__ __forceinline__ int x_off(int row, int chunk) { return row * 64 + ((chunk ^ (row & 7)) << 3); }

template <typename T, typename C>
__global__ void __launch_bounds__(kThreads) nm24_mma_kernel(const T* __restrict__ x,         // (M, lda)
                                                            const T* __restrict__ values,    // (N_pad, K_pad/2)
                                                            const uint32_t* __restrict__ meta,  // (K_pad/32, N_pad)
                                                            const T* __restrict__ bias,      // (N,) or null
                                                            T* __restrict__ y,               // (M, N)
                                                            int M, int N, int K, int lda, int n_pad, int k_pad) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // mma.sp and cp.async need sm_80; TORCH_CUDA_ARCH_LIST may still include older targets,
  // which the backend never launches on (supports() checks the capability).
  __trap();
#else
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sW = reinterpret_cast<T*>(smem_raw);
  T* sX = sW + C::STAGES * C::W_STAGE;
  uint32_t* sE = reinterpret_cast<uint32_t*>(sX + C::STAGES * C::X_STAGE);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp % C::WM, warp_n = warp / C::WM;
  const int n0 = blockIdx.x * kBM;     // first W row (output column) of this CTA
  const int m0 = blockIdx.y * C::BN;   // first x row (output row) of this CTA
  const int k_tiles = k_pad / kBK;
  const int vals_ld = k_pad / 2;

  auto load_stage = [&](int slot, int kt) {
    // W values: kBM rows x 4 chunks; always in bounds (padded layout).
    T* w_dst = sW + slot * C::W_STAGE;
    for (int i = tid; i < kBM * 4; i += kThreads) {
      const int r = i >> 2, c = i & 3;
      const T* src = values + static_cast<int64_t>(n0 + r) * vals_ld + kt * (kBK / 2) + c * 8;
      cp_async16(smem_addr(w_dst + w_off(r, c)), src, 16);
    }
    // x: BN rows x 8 chunks, zero-filled outside [M, K).
    T* x_dst = sX + slot * C::X_STAGE;
    for (int i = tid; i < C::BN * 8; i += kThreads) {
      const int r = i >> 3, c = i & 7;
      const int gm = m0 + r, gk = kt * kBK + c * 8;
      const bool ok = gm < M && gk < K;
      const T* src = ok ? x + static_cast<int64_t>(gm) * lda + gk : x;
      cp_async16(smem_addr(x_dst + x_off(r, c)), src, ok ? 16 : 0);
    }
    // Metadata: two K steps of kBM words each.
    uint32_t* e_dst = sE + slot * C::E_STAGE;
    for (int i = tid; i < C::E_STAGE / 4; i += kThreads) {
      const int s = i / (kBM / 4), w = (i % (kBM / 4)) * 4;
      const uint32_t* src = meta + static_cast<int64_t>(kt * (kBK / 32) + s) * n_pad + n0 + w;
      cp_async16(smem_addr(e_dst + s * kBM + w), src, 16);
    }
  };

  float acc[C::MT][C::NT][4];
#pragma unroll
  for (int i = 0; i < C::MT; ++i)
#pragma unroll
    for (int j = 0; j < C::NT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

  // Prologue: STAGES-1 tiles in flight (empty groups past the end keep the wait count uniform).
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  const int wrow0 = warp_m * C::WARP_ROWS;  // within the CTA's W rows
  const int xrow0 = warp_n * C::WARP_COLS;  // within the CTA's x rows

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();  // tile kt is visible to all; slot (kt-1) % STAGES is free again
    {
      const int next = kt + C::STAGES - 1;
      if (next < k_tiles) load_stage(next % C::STAGES, next);
      cp_async_commit();
    }
    const int slot = kt % C::STAGES;
    const T* w_s = sW + slot * C::W_STAGE;
    const T* x_s = sX + slot * C::X_STAGE;
    const uint32_t* e_s = sE + slot * C::E_STAGE;

#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) {
      uint32_t a[C::MT][4], b[C::NT][4], e[C::MT / 2];
#pragma unroll
      for (int i = 0; i < C::MT; ++i) {
        // Compressed 16x16 tile: lanes 0-15 give rows 0-15 of chunk 2ks, lanes 16-31 chunk 2ks+1.
        const int r = wrow0 + i * 16 + (lane & 15);
        ldmatrix_x4(a[i], smem_addr(w_s + w_off(r, ks * 2 + (lane >> 4))));
      }
#pragma unroll
      for (int j = 0; j < C::NT; ++j) {
        // 8 x rows by 32 K: matrix q (lanes 8q..8q+7) is K columns 8q..8q+7 of this step.
        const int r = xrow0 + j * 8 + (lane & 7);
        ldmatrix_x4(b[j], smem_addr(x_s + x_off(r, ks * 4 + (lane >> 3))));
      }
#pragma unroll
      for (int i = 0; i < C::MT / 2; ++i) e[i] = e_s[ks * kBM + wrow0 + i * 32 + lane];
#pragma unroll
      for (int i = 0; i < C::MT; ++i)
#pragma unroll
        for (int j = 0; j < C::NT; ++j) {
          if (i % 2 == 0) {
            MmaSp<T>::template run<0>(acc[i][j], a[i], b[j], e[i / 2]);
          } else {
            MmaSp<T>::template run<1>(acc[i][j], a[i], b[j], e[i / 2]);
          }
        }
    }
  }
  cp_async_wait<0>();

  // Epilogue: acc[i][j][q] is W row (g or g+8) x x row (2t or 2t+1) of the y^T tile.
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < C::MT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = n0 + wrow0 + i * 16 + g + h * 8;
      if (n >= N) continue;
      const float bv = bias != nullptr ? to_f32(bias[n]) : 0.f;
#pragma unroll
      for (int j = 0; j < C::NT; ++j) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int m = m0 + xrow0 + j * 8 + t * 2 + q;
          if (m < M) y[static_cast<int64_t>(m) * N + n] = from_f32<T>(acc[i][j][h * 2 + q] + bv);
        }
      }
    }
  }
#endif
}

// Host launcher (defined in nm24_mma.cu for T = __half and __nv_bfloat16).
// Preconditions (checked by the torch wrapper): n_pad % kBM == 0, k_pad % kBK == 0,
// N <= n_pad, k_pad - kBK < K <= k_pad, K % 8 == 0, lda % 8 == 0, x 16-byte aligned.
template <typename T>
cudaError_t launch_nm24_mma(const T* x, const T* values, const uint32_t* meta, const T* bias, T* y, int M, int N,
                            int K, int lda, int n_pad, int k_pad, cudaStream_t stream);

}  // namespace nm24
}  // namespace sparsekern
