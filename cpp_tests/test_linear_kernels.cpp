// ctest: raw N:M and BSR kernels (decode, batched, decompression) against naive loops on odd
// shapes, fp32 and bf16, for every ISA this CPU has. Returns non-zero on the first mismatch.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/bsr_linear.h"
#include "cpu/nm_linear.h"

using namespace sparsekern;

static std::mt19937 rng(1234);
static float rnd() { return std::uniform_real_distribution<float>(-1.f, 1.f)(rng); }

static int check(const char* what, const std::vector<float>& got, const std::vector<float>& want, float tol) {
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(std::fabs(got[i] - want[i]) <= tol * (1.f + std::fabs(want[i])))) {
      std::printf("FAIL %s at %zu: %g vs %g\n", what, i, got[i], want[i]);
      return 1;
    }
  }
  return 0;
}

// x [rows, k] @ dense.T [k, out] + bias, accumulated in double.
static std::vector<float> reference(const std::vector<float>& x, const std::vector<float>& dense,
                                    const std::vector<float>& bias, int64_t rows, int64_t out, int64_t k) {
  std::vector<float> want(rows * out);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double s = bias[o];
      for (int64_t c = 0; c < k; ++c) s += static_cast<double>(x[r * k + c]) * dense[o * k + c];
      want[r * out + o] = static_cast<float>(s);
    }
  return want;
}

static int test_nm(int n, int m, int64_t rows, int64_t out, int64_t groups, Isa isa) {
  const int bits = m == 2 ? 1 : m == 4 ? 2 : m == 8 ? 3 : 4, per = 32 / bits;
  const int64_t k = groups * m, kept = groups * n, words = (kept + per - 1) / per;
  std::vector<float> x(rows * k), vals(out * kept), bias(out), dense(out * k, 0.f), y(rows * out), want(rows * out);
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
  want = reference(x, dense, bias, rows, out, k);
  NMLinearArgs a{x.data(), rows, k, k, vals.data(), meta.data(), out, words, n, m, bias.data(), y.data(), out,
                 DType::kF32, 2};
  nm_linear_decode(a, isa);
  char name[96];
  std::snprintf(name, sizeof name, "nm %d:%d rows=%lld isa=%s", n, m, static_cast<long long>(rows), isa_name(isa));
  if (check(name, y, want, 1e-4f)) return 1;
  std::vector<float> dd(out * k, -1.f);
  nm_decompress_rows(a, 0, out, dd.data(), k, DType::kF32);
  if (check("nm decompress", dd, dense, 0.f)) return 1;
  return 0;
}

static int test_bsr(int bm, int bk, int64_t rows, int64_t brows, int64_t kb, Isa isa, bool batched) {
  const int64_t out = brows * bm, k = kb * bk;
  std::vector<int32_t> crow(brows + 1, 0), col;
  std::vector<float> blocks, x(rows * k), bias(out), dense(out * k, 0.f), y(rows * out), want(rows * out);
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
  want = reference(x, dense, bias, rows, out, k);
  BSRLinearArgs a{x.data(), rows, k, k, crow.data(), col.data(), blocks.data(), brows,
                  static_cast<int64_t>(col.size()), bm, bk, bias.data(), y.data(), out, DType::kF32, 2};
  if (batched) {
    bsr_linear_batched(a, isa);
  } else {
    bsr_linear_decode(a, isa);
  }
  char name[96];
  std::snprintf(name, sizeof name, "bsr %dx%d rows=%lld isa=%s", bm, bk, static_cast<long long>(rows), isa_name(isa));
  if (check(name, y, want, 1e-4f)) return 1;
  std::vector<float> dd(out * k, -1.f);
  bsr_decompress_rows(a, 0, brows, dd.data(), k);
  return check("bsr decompress", dd, dense, 0.f);
}

// Batched BSR edge cases: a block row with no blocks (rb 1), all-empty weights (keep == 0),
// row counts that leave partial 6-row tiles and 24-row chunks, bm not a multiple of 16 and
// bk not a multiple of 8; the output is NaN-poisoned so an unwritten element fails.
static int test_bsr_batched_edges(int bm, int bk, int64_t rows, int keep_pct, Isa isa) {
  const int64_t brows = 4, kb = 9, out = brows * bm, k = kb * bk;
  std::vector<int32_t> crow(brows + 1, 0), col;
  std::vector<float> blocks, x(rows * k), bias(out), dense(out * k, 0.f), want(rows * out);
  std::vector<float> y(rows * out, std::nanf(""));
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
  want = reference(x, dense, bias, rows, out, k);
  BSRLinearArgs a{x.data(), rows, k, k, crow.data(), col.data(), blocks.empty() ? nullptr : blocks.data(), brows,
                  static_cast<int64_t>(col.size()), bm, bk, bias.data(), y.data(), out, DType::kF32, 2};
  bsr_linear_batched(a, isa);
  char name[112];
  std::snprintf(name, sizeof name, "bsr batched edges %dx%d rows=%lld keep=%d%% isa=%s", bm, bk,
                static_cast<long long>(rows), keep_pct, isa_name(isa));
  return check(name, y, want, 1e-4f);
}

int main() {
  const int nm[][2] = {{1, 2}, {1, 4}, {2, 4}, {3, 4}, {1, 8}, {2, 8}, {3, 8}, {4, 8}, {5, 8}, {7, 8}, {1, 16}, {4, 16}, {9, 16}};
  int fails = 0, runs = 0;
  for (Isa isa : {Isa::kPortable, Isa::kAvx2}) {
    if (static_cast<int>(isa) > static_cast<int>(detect_isa())) {
      std::printf("skip %s: not supported by this CPU\n", isa_name(isa));
      continue;
    }
    for (auto& p : nm)
      for (int64_t rows : {1, 3, 6, 11}) fails += test_nm(p[0], p[1], rows, 13, 21, isa), ++runs;
    for (auto bs : {std::pair{8, 8}, std::pair{16, 32}, std::pair{12, 20}, std::pair{32, 32}})
      for (int64_t rows : {1, 5, 7, 17}) {
        fails += test_bsr(bs.first, bs.second, rows, 3, 5, isa, false);
        fails += test_bsr(bs.first, bs.second, rows, 3, 5, isa, true);
        runs += 2;
      }
    for (auto bs : {std::pair{16, 8}, std::pair{12, 20}, std::pair{32, 32}, std::pair{40, 24}})
      for (int64_t rows : {5, 7, 37, 130})
        for (int keep : {0, 30, 100}) fails += test_bsr_batched_edges(bs.first, bs.second, rows, keep, isa), ++runs;
  }
  std::printf("%d of %d kernel checks failed\n", fails, runs);
  return fails ? 1 : 0;
}
