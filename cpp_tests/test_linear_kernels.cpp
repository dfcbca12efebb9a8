// ctest: raw N:M and BSR kernels (decode, batched, decompression) against a double-precision
// reference on odd shapes, in fp32, bf16 and fp16, for every ISA this CPU has. Inputs are drawn
// in fp32 and rounded to the element type first, so the reference sees exactly the kernel's
// inputs; the bound per element is one rounding of the result to the element type plus a small
// fp32-accumulation floor scaled by sum |x*w| (tests/conftest.py's rule, without torch).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/bsr_linear.h"
#include "cpu/dtype.h"
#include "cpu/nm_linear.h"

using namespace sparsekern;

static std::mt19937 rng(1234);
static float rnd() { return std::uniform_real_distribution<float>(-1.f, 1.f)(rng); }

static const char* dtype_name(DType t) { return t == DType::kF32 ? "fp32" : t == DType::kBF16 ? "bf16" : "fp16"; }

// Unit roundoff of the element type: one rounding moves a value v by at most unit(t) * |v|.
static double unit(DType t) { return t == DType::kF32 ? 0x1p-24 : t == DType::kBF16 ? 0x1p-8 : 0x1p-11; }

// fp32 values as a kernel buffer of element type t (bytes), and back.
static std::vector<uint8_t> encode(const std::vector<float>& v, DType t) {
  std::vector<uint8_t> b(v.size() * dtype_size(t) + 1);  // +1: data() of an empty buffer is still valid
  for (size_t i = 0; i < v.size(); ++i) {
    if (t == DType::kF32) {
      std::memcpy(b.data() + 4 * i, &v[i], 4);
    } else {
      const uint16_t h = t == DType::kBF16 ? f32_to_bf16(v[i]) : f32_to_f16(v[i]);
      std::memcpy(b.data() + 2 * i, &h, 2);
    }
  }
  return b;
}

static std::vector<float> decode(const std::vector<uint8_t>& b, size_t n, DType t) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = load_f32(b.data(), static_cast<int64_t>(i), t);
  return v;
}

// Round every value to element type t in place: the reference then uses the kernel's inputs.
static void round_to(std::vector<float>& v, DType t) { v = decode(encode(v, t), v.size(), t); }

struct Reference {
  std::vector<double> want, mag;  // x @ dense.T + bias in double; sum |x*w| + |bias| per element
};

// x [rows, k] @ dense.T [k, out] + bias, accumulated in double.
static Reference reference(const std::vector<float>& x, const std::vector<float>& dense,
                           const std::vector<float>& bias, int64_t rows, int64_t out, int64_t k) {
  Reference ref{std::vector<double>(rows * out), std::vector<double>(rows * out)};
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double s = bias[o], a = std::fabs(bias[o]);
      for (int64_t c = 0; c < k; ++c) {
        const double p = static_cast<double>(x[r * k + c]) * dense[o * k + c];
        s += p;
        a += std::fabs(p);
      }
      ref.want[r * out + o] = s;
      ref.mag[r * out + o] = a;
    }
  return ref;
}

// |got - want| <= unit(t) * |want| (the output's rounding) + 2^-16 * sum |x*w| (fp32 sums).
static int check(const char* what, const std::vector<uint8_t>& y, const Reference& ref, DType t) {
  const std::vector<float> got = decode(y, ref.want.size(), t);
  for (size_t i = 0; i < got.size(); ++i) {
    const double bound = unit(t) * std::fabs(ref.want[i]) + 0x1p-16 * ref.mag[i];
    if (!(std::fabs(got[i] - ref.want[i]) <= bound)) {
      std::printf("FAIL %s at %zu: %.8g vs %.8g (bound %.3g)\n", what, i, got[i], ref.want[i], bound);
      return 1;
    }
  }
  return 0;
}

static int check_exact(const char* what, const std::vector<float>& got, const std::vector<float>& want) {
  for (size_t i = 0; i < got.size(); ++i)
    if (!(got[i] == want[i])) {
      std::printf("FAIL %s at %zu: %g vs %g\n", what, i, got[i], want[i]);
      return 1;
    }
  return 0;
}

static int test_nm(int n, int m, int64_t rows, int64_t out, int64_t groups, Isa isa, DType t) {
  const int bits = m == 2 ? 1 : m == 4 ? 2 : m == 8 ? 3 : 4, per = 32 / bits;
  const int64_t k = groups * m, kept = groups * n, words = (kept + per - 1) / per;
  std::vector<float> x(rows * k), vals(out * kept), bias(out), dense(out * k, 0.f);
  std::vector<int32_t> meta(out * words, 0);
  for (auto& v : x) v = rnd();
  for (auto& v : bias) v = rnd();
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t g = 0; g < groups; ++g) {
      std::vector<int> pos(m);
      for (int i = 0; i < m; ++i) pos[i] = i;
      std::shuffle(pos.begin(), pos.end(), rng);
      std::sort(pos.begin(), pos.begin() + n);
      for (int s = 0; s < n; ++s) {
        const int64_t j = g * n + s;
        vals[o * kept + j] = rnd();
        dense[o * k + g * m + pos[s]] = vals[o * kept + j];
        meta[o * words + j / per] |= static_cast<int32_t>(static_cast<uint32_t>(pos[s]) << (bits * (j % per)));
      }
    }
  }
  round_to(x, t), round_to(vals, t), round_to(bias, t), round_to(dense, t);
  const Reference ref = reference(x, dense, bias, rows, out, k);
  const auto xb = encode(x, t), vb = encode(vals, t), bb = encode(bias, t);
  auto yb = encode(std::vector<float>(rows * out, std::nanf("")), t);  // poisoned: unwritten fails
  NMLinearArgs a{xb.data(), rows, k, k, vb.data(), meta.data(), out, words, n, m, bb.data(), yb.data(), out, t, 2};
  nm_linear_decode(a, isa);
  char name[96];
  std::snprintf(name, sizeof name, "nm %d:%d rows=%lld isa=%s %s", n, m, static_cast<long long>(rows), isa_name(isa),
                dtype_name(t));
  if (check(name, yb, ref, t)) return 1;
  auto dd = encode(std::vector<float>(out * k, -1.f), t);
  nm_decompress_rows(a, 0, out, dd.data(), k, t);
  return check_exact("nm decompress", decode(dd, out * k, t), dense);
}

static int test_bsr(int bm, int bk, int64_t rows, int64_t brows, int64_t kb, Isa isa, bool batched, DType t) {
  const int64_t out = brows * bm, k = kb * bk;
  std::vector<int32_t> crow(brows + 1, 0), col;
  std::vector<float> blocks, x(rows * k), bias(out), dense(out * k, 0.f);
  for (auto& v : x) v = rnd();
  for (auto& v : bias) v = rnd();
  for (int64_t rb = 0; rb < brows; ++rb) {
    for (int64_t c = 0; c < kb; ++c) {
      if (rng() % 3) continue;
      col.push_back(static_cast<int32_t>(c));
      for (int i = 0; i < bm; ++i)
        for (int j = 0; j < bk; ++j) {
          blocks.push_back(rnd());
          dense[(rb * bm + i) * k + c * bk + j] = blocks.back();
        }
    }
    crow[rb + 1] = static_cast<int32_t>(col.size());
  }
  round_to(x, t), round_to(blocks, t), round_to(bias, t), round_to(dense, t);
  const Reference ref = reference(x, dense, bias, rows, out, k);
  const auto xb = encode(x, t), blk = encode(blocks, t), bb = encode(bias, t);
  auto yb = encode(std::vector<float>(rows * out, std::nanf("")), t);
  BSRLinearArgs a{xb.data(), rows, k, k, crow.data(), col.data(), blk.data(), brows,
                  static_cast<int64_t>(col.size()), bm, bk, bb.data(), yb.data(), out, t, 2};
  if (batched) {
    bsr_linear_batched(a, isa);
  } else {
    bsr_linear_decode(a, isa);
  }
  char name[112];
  std::snprintf(name, sizeof name, "bsr %dx%d rows=%lld isa=%s %s %s", bm, bk, static_cast<long long>(rows),
                isa_name(isa), batched ? "batched" : "decode", dtype_name(t));
  if (check(name, yb, ref, t)) return 1;
  if (t != DType::kF32) return 0;  // block-row decompression is fp32 only (the dense-GEMM fallback)
  std::vector<float> dd(out * k, -1.f);
  bsr_decompress_rows(a, 0, brows, dd.data(), k);
  return check_exact("bsr decompress", dd, dense);
}

// Batched BSR edge cases: a block row with no blocks (rb 1), all-empty weights (keep == 0),
// row counts that leave partial 6-row tiles and 24-row chunks, bm not a multiple of 16 and
// bk not a multiple of 8; the output is NaN-poisoned so an unwritten element fails.
static int test_bsr_batched_edges(int bm, int bk, int64_t rows, int keep_pct, Isa isa, DType t) {
  const int64_t brows = 4, kb = 9, out = brows * bm, k = kb * bk;
  std::vector<int32_t> crow(brows + 1, 0), col;
  std::vector<float> blocks, x(rows * k), bias(out), dense(out * k, 0.f);
  for (auto& v : x) v = rnd();
  for (auto& v : bias) v = rnd();
  for (int64_t rb = 0; rb < brows; ++rb) {
    for (int64_t c = 0; c < kb; ++c) {
      if (rb == 1 || static_cast<int>(rng() % 100) >= keep_pct) continue;
      col.push_back(static_cast<int32_t>(c));
      for (int i = 0; i < bm * bk; ++i) {
        blocks.push_back(rnd());
        dense[(rb * bm + i / bk) * k + c * bk + i % bk] = blocks.back();
      }
    }
    crow[rb + 1] = static_cast<int32_t>(col.size());
  }
  round_to(x, t), round_to(blocks, t), round_to(bias, t), round_to(dense, t);
  const Reference ref = reference(x, dense, bias, rows, out, k);
  const auto xb = encode(x, t), blk = encode(blocks, t), bb = encode(bias, t);
  auto yb = encode(std::vector<float>(rows * out, std::nanf("")), t);
  BSRLinearArgs a{xb.data(), rows, k, k, crow.data(), col.data(), blocks.empty() ? nullptr : blk.data(), brows,
                  static_cast<int64_t>(col.size()), bm, bk, bb.data(), yb.data(), out, t, 2};
  bsr_linear_batched(a, isa);
  char name[128];
  std::snprintf(name, sizeof name, "bsr batched edges %dx%d rows=%lld keep=%d%% isa=%s %s", bm, bk,
                static_cast<long long>(rows), keep_pct, isa_name(isa), dtype_name(t));
  return check(name, yb, ref, t);
}

int main() {
  const int nm[][2] = {{1, 2}, {1, 4}, {2, 4}, {3, 4}, {1, 8}, {2, 8}, {3, 8}, {4, 8}, {5, 8}, {7, 8}, {1, 16}, {4, 16}, {9, 16}};
  int fails = 0, runs = 0;
  for (Isa isa : {Isa::kPortable, Isa::kAvx2}) {
    if (static_cast<int>(isa) > static_cast<int>(detect_isa())) {
      std::printf("skip %s: not supported by this CPU\n", isa_name(isa));
      continue;
    }
    for (DType t : {DType::kF32, DType::kBF16, DType::kF16}) {
      for (auto& p : nm)
        for (int64_t rows : {1, 3, 6, 11}) fails += test_nm(p[0], p[1], rows, 13, 21, isa, t), ++runs;
      // Past decode_threads' serial limit (parallel.h), so the 2-thread split runs too.
      for (auto& p : nm) fails += test_nm(p[0], p[1], 1, 300, 128, isa, t), ++runs;
      for (auto bs : {std::pair{8, 8}, std::pair{16, 32}, std::pair{12, 20}, std::pair{32, 32}})
        for (int64_t rows : {1, 5, 7, 17}) {
          fails += test_bsr(bs.first, bs.second, rows, 3, 5, isa, false, t);
          fails += test_bsr(bs.first, bs.second, rows, 3, 5, isa, true, t);
          runs += 2;
        }
      for (auto bs : {std::pair{16, 8}, std::pair{12, 20}, std::pair{32, 32}, std::pair{40, 24}})
        for (int64_t rows : {5, 7, 37, 130})
          for (int keep : {0, 30, 100})
            fails += test_bsr_batched_edges(bs.first, bs.second, rows, keep, isa, t), ++runs;
    }
  }
  std::printf("%d of %d kernel checks failed\n", fails, runs);
  return fails ? 1 : 0;
}
