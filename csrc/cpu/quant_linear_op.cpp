// sparsekern::_quant_linear_cpu(x, values, scales, bias, act_block): x [rows, K] @ W.T + bias for a
// dense int8 weight W = values [out, K] (int8) times scales [out] (one per output row), with x
// rounded to int8 per block of act_block columns first (sparsekern/reference.py quantize_x): the
// layer sparsify(..., head="int8") puts in place of an LM head (sparsekern/nn/quant_linear.py).
//
// Few rows, act_block 32, a CPU with AVX-512 VBMI + VNNI: integer dot products, 64 weights per
// vpdpbusd. The weight bytes are made unsigned (+128, one xor), so the lane sums hold
// dot(w, x) + 128 * sum(x): the second term depends on x only and is subtracted per lane from a
// table made once per call. The lane sums (each inside one x block of 32) times the lane's x
// scale accumulate in fp32; the row scale multiplies once at the end. Elsewhere the portable
// kernel (integer dot per x block, same order of scaling) or, for many rows, x and W dequantized
// to fp32 and the fp32 GEMM on tiles of W rows. Rows of x holding NaN/Inf are recomputed from the
// unrounded x (as the N:M int8-activation op does), so they come out non-finite as the reference's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/linear_op_util.h"
#include "cpu/nm_linear.h"
#include "cpu/nm_linear_op.h"
#include "cpu/op_checks.h"
#include "cpu/output.h"
#include "cpu/parallel.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sparsekern {
namespace {

// The decode kernels read the weights once per call, whatever the rows; past this many rows the
// fp32 GEMM on dequantized tiles reads them once per tile and wins (as the N:M op's crossover).
constexpr int64_t kDecodeMaxRows = 8;
constexpr int64_t kTileRows = 1024;  // W rows dequantized per GEMM (nm_linear_op.cpp's tile)

struct Q8Args {
  const int8_t* values;
  const void* scales;
  const void* bias;
  void* out;
  int64_t rows, k, n, ldo;
  DType dtype;
  int threads;
};

// The quantizer's view of x (it reads x, rows, k, ldx, dtype and act_block).
NMLinearArgs x_args(const at::Tensor& x, int64_t act_block) {
  NMLinearArgs a{};
  a.x = x.const_data_ptr();
  a.rows = x.size(0);
  a.k = a.ldx = x.size(1);
  a.dtype = to_dtype(x.scalar_type());
  a.act_block = act_block;
  a.threads = at::get_num_threads();
  return a;
}

// Integer dot per x block, then x scale, summed in fp32; row scale and bias at the end.
void q8_decode_portable(const Q8Args& a, const NMLinearArgs& xa) {
  const int64_t size = xa.act_block, blocks = a.k / size;
  std::vector<int8_t> xq(a.rows * a.k);
  std::vector<float> sx(a.rows * blocks);
  nm_quantize_x_a8(xa, xq.data(), a.k, sx.data(), blocks);
  parallel_range(a.n, a.threads, 16, [&](int64_t o0, int64_t o1, int) {
    for (int64_t o = o0; o < o1; ++o) {
      const int8_t* w = a.values + o * a.k;
      const float scale = load_f32(a.scales, o, a.dtype), b = a.bias ? load_f32(a.bias, o, a.dtype) : 0.0f;
      for (int64_t r = 0; r < a.rows; ++r) {
        const int8_t* q = xq.data() + r * a.k;
        float acc = 0.0f;
        for (int64_t blk = 0; blk < blocks; ++blk) {
          int32_t dot = 0;
          for (int64_t c = blk * size; c < (blk + 1) * size; ++c) dot += int32_t{w[c]} * int32_t{q[c]};
          acc += static_cast<float>(dot) * sx[r * blocks + blk];
        }
        store_f32(a.out, r * a.ldo + o, acc * scale + b, a.dtype);
      }
    }
  });
}

#if defined(__x86_64__)
#define SK_Q8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

bool q8_avx512_supported(int64_t act_block) {
  return act_block == 32 && active_isa() >= Isa::kAvx512 && has_avx512_vnni_vbmi();
}

// What one call prepares from x, per row and 64-column step: the int8 x (zero past K), the lane
// term 128 * sum(x bytes of the lane) and the lane's x scale (lanes 0-7: block 2s, 8-15: 2s+1).
struct Q8X {
  int64_t steps, ldq;
  std::vector<int8_t> xq;
  std::vector<int32_t> corr;
  std::vector<float> sxl;
};

template <DType T, int R>
SK_Q8 inline __attribute__((always_inline)) void q8_rows(const Q8Args& a, const Q8X& p, int64_t r0, int64_t o) {
  const int8_t* w = a.values + o * a.k;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t s = 0; s < p.steps; ++s) {
    const int64_t left = a.k - 64 * s;  // K is a multiple of 32: a short last step holds 32
    const __m512i raw = left >= 64 ? _mm512_loadu_si512(w + 64 * s)
                                   : _mm512_maskz_loadu_epi8((~0ULL) >> (64 - left), w + 64 * s);
    _mm_prefetch(reinterpret_cast<const char*>(w + 64 * s) + 1024, _MM_HINT_T0);
    const __m512i wu = _mm512_xor_si512(raw, flip);  // bytes past K: 128 times x's zero padding
    for (int r = 0; r < R; ++r) {
      const int64_t i = (r0 + r) * p.steps + s;
      const __m512i xv = _mm512_loadu_si512(p.xq.data() + (r0 + r) * p.ldq + 64 * s);
      const __m512i dot = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, xv),
                                           _mm512_loadu_si512(p.corr.data() + 16 * i));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(p.sxl.data() + 16 * i), acc[r]);
    }
  }
  const float scale = load_f32(a.scales, o, T), b = a.bias ? load_f32(a.bias, o, T) : 0.0f;
  for (int r = 0; r < R; ++r) store_f32(a.out, (r0 + r) * a.ldo + o, _mm512_reduce_add_ps(acc[r]) * scale + b, T);
}

template <DType T>
SK_Q8 void q8_block(const Q8Args& a, const Q8X& p, int64_t lo, int64_t hi) {
  for (int64_t o = lo; o < hi; ++o) {
    int64_t r0 = 0;
    for (; r0 + 4 <= a.rows; r0 += 4) q8_rows<T, 4>(a, p, r0, o);
    switch (a.rows - r0) {
      case 3: q8_rows<T, 3>(a, p, r0, o); break;
      case 2: q8_rows<T, 2>(a, p, r0, o); break;
      case 1: q8_rows<T, 1>(a, p, r0, o); break;
      default: break;
    }
  }
}

void q8_decode_avx512(const Q8Args& a, const NMLinearArgs& xa) {
  Q8X p;
  p.steps = (a.k + 63) / 64;
  p.ldq = 64 * p.steps;
  const int64_t blocks = 2 * p.steps;
  p.xq.resize(a.rows * p.ldq);
  std::vector<float> sx(a.rows * blocks);
  quantize_x_a8(xa, p.xq.data(), p.ldq, sx.data(), blocks);
  p.corr.resize(a.rows * p.steps * 16);
  p.sxl.resize(a.rows * p.steps * 16);
  for (int64_t i = 0; i < a.rows * p.steps; ++i) {  // i = row * steps + step
    const int8_t* q = p.xq.data() + i * 64;          // ldq = 64 * steps: rows follow each other
    for (int l = 0; l < 16; ++l) {
      p.corr[16 * i + l] = 128 * (q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3]);
      p.sxl[16 * i + l] = sx[2 * i + l / 8];
    }
  }
  parallel_range(a.n, a.threads, 16, [&](int64_t lo, int64_t hi, int) {
    switch (a.dtype) {
      case DType::kBF16: return q8_block<DType::kBF16>(a, p, lo, hi);
      case DType::kF16: return q8_block<DType::kF16>(a, p, lo, hi);
      default: return q8_block<DType::kF32>(a, p, lo, hi);
    }
  });
}
#endif

// x32 [rows, k] (fp32) @ (values * scales).T + bias into y, dequantizing kTileRows rows of W at a time.
void q8_gemm(const at::Tensor& x32, const at::Tensor& values, const at::Tensor& scales,
             const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t n = values.size(0);
  const bool f32 = y.scalar_type() == at::kFloat;
  at::Tensor y32 = f32 ? y : at::empty({x32.size(0), std::min(kTileRows, n)}, x32.options());
  for (int64_t o0 = 0; o0 < n; o0 += kTileRows) {
    const int64_t nr = std::min(kTileRows, n - o0);
    const at::Tensor t = values.narrow(0, o0, nr).to(at::kFloat).mul_(scales.narrow(0, o0, nr).to(at::kFloat).unsqueeze(1));
    at::Tensor ys = f32 ? y.narrow(1, o0, nr) : y32.narrow(1, 0, nr);
    if (bias) {
      at::addmm_out(ys, bias->narrow(0, o0, nr).to(at::kFloat), x32, t.t());
    } else {
      at::mm_out(ys, x32, t.t());
    }
    if (!f32) y.narrow(1, o0, nr).copy_(ys);
  }
}

at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& scales,
                            const std::optional<at::Tensor>& bias, int64_t act_block) {
  check_tensor("values", values, {at::kChar});
  TORCH_CHECK_VALUE(values.dim() == 2 && values.is_contiguous(),
                    "values: expected a contiguous 2-D int8 [out, in] tensor, got shape ", py_shape(values.sizes()));
  const int64_t n = values.size(0), k = values.size(1);
  check_float("scales", scales);
  check_linear_common(x, scales, "scales", n, k, bias);
  check_same_device("values", values, x, "x");
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == n, "scales: expected shape ", py_shape({n}),
                    " (one per output row), got ", py_shape(scales.sizes()));
  TORCH_CHECK_VALUE(act_block > 0 && k % act_block == 0, "act_block: expected a block size > 0 that divides in_features ", k,
                    ", got ", act_block);
  const at::Tensor xc = x.contiguous(), sc = scales.contiguous();
  const std::optional<at::Tensor> bc = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  at::Tensor y = new_output({x.size(0), n}, x.options());
  const int64_t rows = xc.size(0);
  if (rows == 0 || n == 0) return y;
  if (k == 0) {
    bias_rows(y, bc);
    return y;
  }
  const NMLinearArgs xa = x_args(xc, act_block);
  if (rows > kDecodeMaxRows) {
    q8_gemm(rounded_x_f32(xa), values, sc, bc, y);
  } else {
    const Q8Args a{values.const_data_ptr<int8_t>(), sc.const_data_ptr(), bc ? bc->const_data_ptr() : nullptr,
                   y.data_ptr(), rows, k, n, n, to_dtype(x.scalar_type()), at::get_num_threads()};
#if defined(__x86_64__)
    if (q8_avx512_supported(act_block)) {
      q8_decode_avx512(a, xa);
    } else {
      q8_decode_portable(a, xa);
    }
#else
    q8_decode_portable(a, xa);
#endif
  }
  redo_nonfinite_rows(xc, y, nonfinite_or_huge_rows(xc), [&](const at::Tensor& xb) {
    at::Tensor yb = at::empty({xb.size(0), n}, y.options());
    q8_gemm(xb.to(at::kFloat), values, sc, bc, yb);
    return yb;
  });
  return y;
}

bool quant_linear_fast(int64_t act_block) {
#if defined(__x86_64__)
  return q8_avx512_supported(act_block);
#else
  return false;
#endif
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("_quant_linear_cpu", &sparsekern::quant_linear_cpu); }
TORCH_LIBRARY_IMPL(sparsekern, CompositeExplicitAutograd, m) {
  m.impl("_quant_linear_fast", &sparsekern::quant_linear_fast);
}
