// sparsekern::_nm_linear_cpu: x [rows, K] @ W.T + bias for an N:M weight (values, meta), on the
// CPU. The op checks its arguments itself (cpu/op_checks.h): it is callable without ops.py. Few rows: the decode kernel (weights
// streamed once per 8 rows); many rows: the sparse GEMM (AVX-512 BF16 or AVX2) where it applies,
// else decompressed tiles of W and the dense GEMM on each. Rows of x holding NaN/Inf (or values of
// magnitude >= 2^100) come out exactly as from the dense op (such rows are redone on the tiles).
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

namespace sparsekern {
namespace {

// NOTE: decode vs decompress+GEMM crossover, measured on the 2-core EPYC (see bench/results):
// the decode kernel's cost grows with rows (one permute chain per row), the GEMM path's does not.
constexpr int64_t kDecodeMaxRows = 8;
// Where no sparse GEMM applies (below): up to this many rows the decode kernel runs once per 8
// rows (the weights are read once per pass) instead of decompress + GEMM. NOTE: 2:4, 4096x4096, 2 threads, quiet: one 8-row pass
// 3.7 ms fp32 / 3.4 ms bf16; decompress + GEMM at 17 rows 16.5 ms fp32 / 22 ms bf16, at 32 rows
// 18.6 / 25.4 ms (dense F.linear 12.1 ms fp32, 48.7 ms bf16: torch's bf16 GEMM is slow here),
// so chunked decode stays ahead to ~32 rows in fp32 and ~64 in bf16/fp16.
constexpr int64_t kChunkedDecodeMaxRowsF32 = 32;
constexpr int64_t kChunkedDecodeMaxRowsHalf = 64;
// Quantized values with fp32 x (where no sparse GEMM applies): dequantizing to
// fp32 tiles costs more than copying float values. NOTE: 2:4 11008x4096, Zen 5, 2 threads, separate processes
// alternating, tiles -> decode passes, int8 / int4 g128 (dense fp32 F.linear): 33 rows 43 -> 23
// ms (28), 41 rows 46 -> 28-30 (30-33), 48 rows 47 -> 33-35 (33-37), 64 rows 53-56 -> 43-45
// (39-43). Past 64 rows the tiles stay, at ~1.4x the dense GEMM's time.
constexpr int64_t kQuantDecodeMaxRowsF32 = 64;
// From this many rows the sparse GEMM (nm_gemm_avx512.cpp) runs where it applies. NOTE:
// Zen 4, 2 threads, bf16, x dense F.linear: 11008x4096 decode passes 1.42x at 8 rows, 1.02x at
// 12, 0.97x at 16; the GEMM 0.99x, 1.03x, 1.12x (2048x2048: decode 0.96x, 0.83x, 0.63x; GEMM
// 0.80x, 0.77x, 1.30x). W8A16 / W4A16 g128 (11008x4096): decode 1.04-1.09x at 8 rows, 0.85-0.90x
// at 12, 0.71-0.75x at 16; the GEMM 0.81-0.84x, 0.85-0.91x, 0.86-0.97x. fp32 (x dense fp32):
// at 13 rows the GEMM 1.98-2.78x, the decode passes 0.96-2.18x (four Llama shapes). The same
// for 4:8 in fp32 (Zen 5, decode passes -> GEMM, ms: 11008x4096 8 rows 6.2 -> 8.7, 12 rows 9.8
// -> 9.3; 2048x2048 8 rows 0.64 -> 0.75, 12 rows 0.96 -> 0.79; 5632x2048 12 rows 2.61 -> 2.56).
// bf16 4:8 and quantized 1:4 / 2:8 too (Zen 5, decode passes -> GEMM, ms: 4:8 11008x4096 8 rows
// 3.1 -> 4.4, 12 rows 5.5 -> 4.7; 2048x2048 16 rows 0.36 -> 0.39, 24 rows 0.57 -> 0.50; 5632x2048
// 12 rows 1.10 -> 1.16, 16 rows 1.42 -> 1.19; 1:4 int4 g128 11008x4096 12 rows 3.0 -> 2.3, 2048x2048
// 12 rows 0.20 -> 0.21, 5632x2048 16 rows 0.75 -> 0.74).
constexpr int64_t kSparseGemmMinRows = 13;
// bf16 1:4 and 2:8 (float values). NOTE: Zen 5, decode passes -> GEMM, ms: 11008x4096 4 rows
// 1.5-1.6 -> 1.2-1.8, 8 rows 2.1-2.4 -> 1.4-1.9; 2048x2048 8 rows 0.12-0.14 -> 0.13-0.16, 12 rows
// 0.17-0.20 -> 0.16-0.18; 5632x2048 8 rows 0.66-0.71 -> 0.38-0.48.
constexpr int64_t kSparseGemmMinRowsQuarterBf16 = 9;
// fp32 1:4 and 2:8, a quarter of the multiply-adds. NOTE: Zen 5, decode passes -> GEMM, ms:
// 11008x4096 6 rows 3.7-4.0 -> 4.1-4.3, 8 rows 5.0 -> 4.2-4.4; 2048x2048 6 rows 0.35-0.42 ->
// 0.30-0.31; 5632x2048 6 rows 0.92-1.10 -> 0.90-0.99, 8 rows 1.23-1.44 -> 0.94-0.98.
constexpr int64_t kSparseGemmMinRowsQuarter = 7;
// Quantized values with fp32 x: the decode passes run the AVX2 quads kernel at 2+ rows (or two
// bf16 parts of x at float32 matmul precision "high"), which the GEMM (fp32 values dequantized as
// they are packed) passes sooner. NOTE: Zen 5, 2 threads, decode passes -> GEMM, ms: 2:4 int8 /
// int4 g128, 11008x4096 4 rows 2.8 -> 3.8, 6 rows 4.3-4.6 -> 4.0-4.4, 8 rows 5.4-5.8 -> 4.2-4.7;
// 2048x2048 4 rows 0.28-0.30 -> 0.35-0.38, 6 rows 0.44-0.53 -> 0.35-0.42; 5632x2048 and 2048x5632
// 6 rows 1.1-1.3 -> 1.0-1.2. 1:4 int8 / 2:8 int4 g128: 11008x4096 6 rows 3.5-4.5 -> 3.8-4.6, 8 rows
// 4.7-5.7 -> 3.9-5.0; 2048x2048 6 rows 0.38-0.49 -> 0.36-0.39. 4:8 int8: 11008x4096 4 rows 3.9 ->
// 4.1, 6 rows 6.0 -> 4.3; 2048x2048 6 rows 0.62 -> 0.42; 5632x2048 6 rows 1.63 -> 1.15.
constexpr int64_t kSparseGemmMinRowsQuantF32 = 6;
// The same with int8 activations (x rounded, then the GEMM). NOTE: int4 g128 +a8, 11008x4096:
// decode 0.94x at 16 rows, 0.66x at 32, 0.63x at 48; the GEMM 0.59x, 0.67x, 0.79x. fp32 x, Zen 5
// (int8 +a8, decode -> GEMM, ms): 11008x4096 16 rows 5.4 -> 5.6-5.7, 24 rows 7.9 -> 7.9, 32 rows
// 10.7 -> 8.2-8.5; 2048x2048 24 rows 0.65 -> 0.70, 32 rows 0.84 -> 0.87; 2048x5632 16 rows 1.30 ->
// 1.48, 32 rows 2.49 -> 2.07: the same crossover.
constexpr int64_t kSparseGemmMinRowsA8 = 33;
// 1:4, 2:8 and 4:8 with int8 activations and fp32 x: their decode kernel (vdpbf16ps on x's
// integers) loses sooner than 2:4's VNNI one. NOTE: Zen 5, decode -> GEMM, ms: 4:8 int8 +a8,
// 11008x4096 6 rows 3.6 -> 4.2, 8 rows 5.2 -> 4.6, 16 rows 10.3 -> 6.1; 2048x2048 10 rows 0.45 ->
// 0.47, 12 rows 0.54 -> 0.50; 5632x2048 12 rows 1.36 -> 1.43, 16 rows 1.65 -> 1.61. 1:4 int8 +a8:
// 11008x4096 6 rows 2.5 -> 2.0; 2048x2048 12 rows 0.32 -> 0.27; 5632x2048 10 rows 0.70 -> 0.66.
// 2:8 int4 g128 +a8: 2048x2048 10 rows 0.35 -> 0.31; 5632x2048 12 rows 1.02 -> 0.71.
constexpr int64_t kSparseGemmMinRowsA8F32 = 11;
// The same with bf16 x. NOTE: Zen 5, 4:8 int8 +a8, decode -> GEMM, ms: 11008x4096 4 rows 2.5 ->
// 4.2, 8 rows 4.9 -> 4.4; 2048x2048 8 rows 0.34 -> 0.39, 12 rows 0.49 -> 0.44; 5632x2048 8 rows
// 1.22 -> 1.13.
constexpr int64_t kSparseGemmMinRowsA8Bf16 = 9;
// Rows of W decompressed per GEMM. NOTE: 512x4096x4096 fp32, 2 loaded cores: one dense GEMM
// 0.61 s; 128-row tiles 1.30 s, 512-row 0.71 s, 1024-row 0.64 s (MKL wants wide N). Decompressing
// the whole weight into one [out, K] buffer and one GEMM into the contiguous output was slower:
// 512 rows, 4096x4096, 2 threads, same run as dense 99 ms: whole 134 ms, 1024-row tiles 104 ms
// (a 16 MiB tile stays in the 32 MiB L3 for its GEMM; a 64 MiB weight is written and re-read).
constexpr int64_t kTileRows = 1024;

// Where the sparse GEMM applies: the fewest rows it takes.
int64_t sparse_gemm_min_rows(const NMLinearArgs& a) {
  const bool is24 = a.n == 2 && a.m == 4, quarter = 4 * a.n == a.m;  // quarter: 1:4, 2:8
  const bool f32 = a.dtype == DType::kF32;
  if (a.act_block) return is24 ? kSparseGemmMinRowsA8 : f32 ? kSparseGemmMinRowsA8F32 : kSparseGemmMinRowsA8Bf16;
  if (!f32) return quarter && !a.qbits ? kSparseGemmMinRowsQuarterBf16 : kSparseGemmMinRows;
  if (a.qbits) return kSparseGemmMinRowsQuantF32;
  return quarter ? kSparseGemmMinRowsQuarter : kSparseGemmMinRows;
}

// The sparse GEMM for a's weight and x on this CPU (nullptr: none, the decompressed tiles): the
// AVX-512 BF16 one, or on AVX2 CPUs (active ISA avx2) the AVX2 one. NOTE: AVX-512 CPUs run
// only the AVX-512 GEMM, as measured; the AVX2 one was measured on an AVX2-only Zen 3 (there
// torch's dense GEMM is AVX2 too).
using SparseGemm = void (*)(const NMLinearArgs&);
SparseGemm sparse_gemm(const NMLinearArgs& a) {
#if defined(__x86_64__)
  if (detail::nm_gemm_avx512_supported(a)) return detail::nm_gemm_avx512;
  if (active_isa() == Isa::kAvx2 && detail::nm_gemm_avx2_supported(a)) return detail::nm_gemm_avx2;
#endif
  return nullptr;
}

// From this many rows the AVX2 sparse GEMM runs where it applies: a quarter or less of the
// weights kept (1:4, 2:8, 1:8), 4:8 (its decode kernel is the slowest), the others (2:4, 1:2);
// float or quantized values, fp32 or bf16 x, int8 activations alike (on the fp32 rounded x,
// whatever x's dtype). NOTE: Zen 3 EPYC (AVX2), 2
// threads, one process, decode passes -> GEMM interleaved, ms (11008x4096 / 2048x2048 /
// 5632x2048): fp32 2:4 16 rows 23.9 -> 30.3 / 4.14 -> 3.22 / 5.38 -> 7.40, 24 rows 34.9 -> 30.6 /
// 6.20 -> 3.75 / 10.2 -> 10.0; bf16 2:4 16 rows 21.7 -> 24.5 / 2.28 -> 2.65 / 6.18 -> 7.69, 24
// rows 34.2 -> 29.9 / 3.04 -> 2.54 / 8.93 -> 8.32; fp32 2:4 int8 16 rows 29.3 -> 31.1 / 2.18 ->
// 1.87 / 7.43 -> 7.34 (int4 g128 and int8 activations alike). 4:8 fp32 16 rows 27.8 -> 28.3 /
// 4.59 -> 3.50 / 7.91 -> 7.44, bf16 16 rows 31.1 -> 26.5 / 2.51 -> 1.94 / 8.54 -> 8.33, 9 rows
// 18.0 -> 24.6. 1:4 fp32 8 rows 10.7 -> 14.8 / 1.88 -> 1.52 / 2.87 -> 3.28, 12 rows 16.4 -> 15.9
// / 2.71 -> 1.73 / 4.07 -> 3.83; bf16 9 rows 11.1 -> 12.3 / 1.03 -> 1.27 / 3.40 -> 4.10, 16 rows
// 20.2 -> 12.8 / 1.90 -> 1.16 / 5.63 -> 4.28. Before this GEMM, these rows took the decode passes
// up to 32 (fp32) or 64 rows, then the decompressed tiles (0.7-0.96x dense fp32 F.linear at
// 65-512 rows). int8 activations with bf16 x, 11008x4096, before (decode passes up to 64 rows,
// then fp32 tiles) -> after, ms, two processes each: 2:4 int8 24 rows 35.8 / 39.5 -> 30.1 / 27.4,
// 65 rows 88.6 / 121 -> 39.9 / 39.2, 512 rows 322 / 366 -> 279 / 260; 1:4 int4 g128 13 rows 20.4
// / 15.9 -> 15.2 / 11.0, 65 rows 73.0 / 105 -> 22.7 / 21.1.
int64_t sparse_gemm_avx2_min_rows(const NMLinearArgs& a) {
  if (4 * a.n <= a.m) return 11;
  return a.n == 4 && a.m == 8 ? 13 : 17;
}

}  // namespace

int64_t nm_decode_max_rows(const NMLinearArgs& a) {
#if defined(__x86_64__)
  NMLinearArgs rounded = a;  // int8 activations: the GEMM runs on x as rounded
  rounded.act_block = 0;
  const SparseGemm gemm = sparse_gemm(rounded);
  if (gemm == detail::nm_gemm_avx512) return sparse_gemm_min_rows(a) - 1;
  if (gemm) return sparse_gemm_avx2_min_rows(a) - 1;  // int8 activations: on the fp32 rounded x
#endif
  if (a.qbits && a.dtype == DType::kF32) return kQuantDecodeMaxRowsF32;
  return a.dtype == DType::kF32 ? kChunkedDecodeMaxRowsF32 : kChunkedDecodeMaxRowsHalf;
}

void redo_nonfinite_on_tiles(const NMLinearArgs& a, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                             at::Tensor& y) {
  redo_nonfinite_rows(x, y, nonfinite_or_huge_rows(x), [&](const at::Tensor& xb) {
    at::Tensor yb = at::empty({xb.size(0), a.out_features}, y.options());
    nm_linear_gemm(a, xb, bias, yb);
    return yb;
  });
}

void nm_linear_many_rows(const NMLinearArgs& a, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                         at::Tensor& y) {
  if (const SparseGemm gemm = sparse_gemm(a)) {
    gemm(a);
    // The kernel skips pruned columns: rows of x holding NaN/Inf again through the dense tiles.
    redo_nonfinite_on_tiles(a, x, bias, y);
    return;
  }
  nm_linear_gemm(a, x, bias, y);
}

void nm_linear_decode_passes(const NMLinearArgs& a) {
  const int64_t es = dtype_size(a.dtype);
  for (int64_t r0 = 0; r0 < a.rows; r0 += kDecodeMaxRows) {
    NMLinearArgs c = a;
    c.rows = std::min(kDecodeMaxRows, a.rows - r0);
    c.x = static_cast<const char*>(a.x) + r0 * a.ldx * es;
    c.out = static_cast<char*>(a.out) + r0 * a.ldo * es;
    nm_linear_decode(c, active_isa());
  }
}

void nm_linear_gemm(const NMLinearArgs& a, const at::Tensor& x, const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t rows = x.size(0), k = x.size(1), out_features = a.out_features;
  // bf16 x on a CPU with AVX-512 bf16: bf16 tiles and torch's bf16 GEMM. NOTE: Zen 4 EPYC,
  // 128 x 5632 x 2048: bf16 F.linear 8 ms against ~30 ms for decompress + fp32 GEMM.
  if (x.scalar_type() == at::kBFloat16 && active_isa() >= Isa::kAvx512Bf16) {
    at::Tensor tile = at::empty({std::min(kTileRows, out_features), k}, x.options());
    for (int64_t o0 = 0; o0 < out_features; o0 += kTileRows) {
      const int64_t nr = std::min(kTileRows, out_features - o0);
      at::Tensor t = tile.narrow(0, 0, nr);
      nm_decompress_rows(a, o0, nr, t.data_ptr(), k, DType::kBF16);
      at::Tensor ys = y.narrow(1, o0, nr);
      if (bias) {
        at::addmm_out(ys, bias->narrow(0, o0, nr), x, t.t());
      } else {
        at::mm_out(ys, x, t.t());
      }
    }
    return;
  }
  // Other low-precision inputs: decompress to fp32 and run the fp32 GEMM. NOTE: at 512x4096x4096
  // on the AVX2 EPYC, torch's bf16 GEMM took 4.1 s against 0.7 s for fp32 (no native bf16 FMA).
  const at::Tensor x32 = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  at::Tensor y32 = x.scalar_type() == at::kFloat ? y : at::empty({rows, std::min(kTileRows, out_features)}, x32.options());
  at::Tensor tile = at::empty({std::min(kTileRows, out_features), k}, x32.options());
  for (int64_t o0 = 0; o0 < out_features; o0 += kTileRows) {
    const int64_t nr = std::min(kTileRows, out_features - o0);
    at::Tensor t = tile.narrow(0, 0, nr);
    nm_decompress_rows(a, o0, nr, t.data_ptr(), k, DType::kF32);
    at::Tensor ys = x.scalar_type() == at::kFloat ? y.narrow(1, o0, nr) : y32.narrow(1, 0, nr);
    if (bias) {
      at::addmm_out(ys, bias->narrow(0, o0, nr).to(at::kFloat), x32, t.t());
    } else {
      at::mm_out(ys, x32, t.t());
    }
    if (x.scalar_type() != at::kFloat) y.narrow(1, o0, nr).copy_(ys);
  }
}

at::Tensor rounded_x_f32(const NMLinearArgs& a) {
  const int64_t rows = a.rows, k = a.k, size = a.act_block;
  std::vector<int8_t> xq(rows * k);
  std::vector<float> sx(rows * (k / size));
  quantize_x_a8(a, xq.data(), k, sx.data(), k / size);
  at::Tensor xf = at::empty({rows, k}, at::TensorOptions().dtype(at::kFloat));
  float* f = xf.data_ptr<float>();
  parallel_range(rows, a.threads, grain_for(k), [&](int64_t r0, int64_t r1, int) {
    for (int64_t i = r0 * k; i < r1 * k; i += size) {
      const float s = sx[i / size];
      for (int64_t c = i; c < i + size; ++c) f[c] = static_cast<float>(xq[c]) * s;
    }
  });
  return xf;
}

void nm_linear_run(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta, int64_t n, int64_t m,
                   const std::optional<at::Tensor>& bias, const at::Tensor& scales, const at::Tensor& zeros,
                   int64_t act_block, at::Tensor& y) {
  const int64_t rows = x.size(0), k = x.size(1), out_features = values.size(0);
  if (rows == 0 || out_features == 0) return;
  if (k == 0) return bias_rows(y, bias);

  NMLinearArgs a{};
  a.x = x.data_ptr();
  a.rows = rows;
  a.k = k;
  a.ldx = k;
  a.values = values.data_ptr();
  a.meta = meta.data_ptr<int32_t>();
  a.out_features = out_features;
  a.meta_words = meta.size(1);
  a.n = static_cast<int>(n);
  a.m = static_cast<int>(m);
  a.bias = bias ? bias->data_ptr() : nullptr;
  a.out = y.data_ptr();
  a.ldo = out_features;
  a.dtype = to_dtype(x.scalar_type());
  a.threads = at::get_num_threads();
  if (scales.defined()) {
    a.qbits = values.scalar_type() == at::kByte ? 4 : 8;
    a.scales = scales.data_ptr();
    a.zeros = zeros.defined() ? zeros.data_ptr<int8_t>() : nullptr;
    a.groups = scales.size(1);
    a.group_kept = k / m * n / a.groups;
    a.act_block = act_block;
    // torch.set_float32_matmul_precision: "highest" (the default) keeps fp32 products.
    a.x_parts = at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::HIGHEST ? 3 : 2;
  }
  if (rows > nm_decode_max_rows(a)) {
    if (!a.act_block) {
      nm_linear_many_rows(a, x, bias, y);
      return;
    }
    // int8 activations: the GEMM runs on x rounded as the decode kernels round it. bf16 x (on
    // AVX-512 BF16): that x rounded once more to bf16 and the bf16 GEMM of every other bf16
    // batch, whose W tiles are bf16 too. NOTE: 512 x 4096 -> 11008, 2:4 int4 g128 +a8, Zen 4:
    // 308 ms through fp32 (dense bf16 F.linear 110 ms).
    const at::Tensor xf = rounded_x_f32(a);
    const bool bf16_gemm = x.scalar_type() == at::kBFloat16 && active_isa() >= Isa::kAvx512Bf16;
    if (bf16_gemm || x.scalar_type() == at::kFloat) {
      const at::Tensor xr = bf16_gemm ? xf.to(at::kBFloat16) : xf;
      NMLinearArgs r = a;  // the rounded x as any x of its type: the sparse GEMM where it applies
      r.x = xr.data_ptr();
      r.act_block = 0;
      nm_linear_many_rows(r, xr, bias, y);
    } else {  // fp16, or bf16 without AVX-512 BF16: fp32 out of the rounded x, then y's dtype
      at::Tensor y32 = at::empty({rows, out_features}, xf.options());
      NMLinearArgs r = a;  // as fp32 x, bias and out: the AVX2 sparse GEMM where it applies
      r.dtype = DType::kF32;
      r.act_block = 0;
      if (sparse_gemm(r) == detail::nm_gemm_avx2) {
        const at::Tensor b32 = bias ? bias->to(at::kFloat) : at::Tensor();
        const at::Tensor s32 = scales.to(at::kFloat);  // scales are read in the x dtype (exact in fp32)
        r.x = xf.data_ptr();
        r.scales = s32.data_ptr();
        r.bias = b32.defined() ? b32.data_ptr() : nullptr;
        r.out = y32.data_ptr();
        detail::nm_gemm_avx2(r);
      } else {  // the fp32 tiles
        nm_linear_gemm(a, xf, bias, y32);
      }
      y.copy_(y32);
    }
    // Rounding gives a row holding NaN/Inf finite integers: such rows are redone as the decode
    // path redoes them (the dense product of x as it is), so they come out as from the dense op.
    redo_nonfinite_on_tiles(a, x, bias, y);
    return;
  }
  // Few rows: the decode kernel, 8 rows of x per pass over the weights.
  nm_linear_decode_passes(a);
  redo_nonfinite_on_tiles(a, x, bias, y);  // uses a's weights only
}

namespace {

at::Tensor nm_linear_cpu(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& meta_in, int64_t n,
                         int64_t m, const std::optional<at::Tensor>& bias_in,
                         const std::optional<at::Tensor>& scales_in, const std::optional<at::Tensor>& zeros_in,
                         int64_t group_size, int64_t act_block) {
  check_nm_linear_args(x_in, values_in, meta_in, n, m, bias_in, scales_in, zeros_in, group_size, act_block);
  const at::Tensor x = x_in.contiguous(), values = values_in.contiguous(), meta = meta_in.contiguous();
  const std::optional<at::Tensor> bias = bias_in ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  const at::Tensor scales = scales_in ? scales_in->contiguous() : at::Tensor();
  const at::Tensor zeros = zeros_in ? zeros_in->contiguous() : at::Tensor();
  at::Tensor y = new_output({x.size(0), values.size(0)}, x.options());
  nm_linear_run(x, values, meta, n, m, bias, scales, zeros, act_block, y);
  return y;
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("_nm_linear_cpu", &sparsekern::nm_linear_cpu); }
