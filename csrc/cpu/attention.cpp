// Drivers of pruned_attention and token_scores (see attention.h). ISA-specific work happens in
// the AttnKernels table; this file only tiles, gathers, masks and schedules.
//
// Prefill layout: per task (b, h, tile of kQT queries) the scaled query tile is packed once,
// transposed (Qt [D][kQT]). Kept keys stream by in blocks of kKB: their K/V rows are gathered and
// converted to fp32 into small per-thread buffers (the fused gather), S^T = K_blk * Qt gives one
// column per query, so the online softmax runs down columns with queries across SIMD lanes (no
// horizontal reductions), and O += P * V_blk reads P through strides (no transpose).
// Decode (Sq == 1): per (b, h), each kept K row and V row is read once, straight from the source.
#include "cpu/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "cpu/attention_kernels.h"
#include "cpu/parallel.h"

namespace sparsekern {
namespace {

// NOTE: tile sizes barely matter once the micro-kernel is right: on the prefill case (B=1 H=8
// Sq=1024 kept=1024 D=64 fp32, one thread) kQT x kKB = 64x64, 64x128, 128x64 and 96x64 all ran
// 31.6-32.6 ms (~66 GFLOP/s); 64x64 keeps the per-thread tiles (~80-140 KB at D = 64..128) in L2.
// Two threads on a quiet moment: 16.3 ms (131 GFLOP/s).
constexpr int64_t kQT = 64, kKB = 64, kDecodeKB = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Scratch {
  std::vector<float> row, Qt, Kp, Vp, S, O, m, l, alpha, lse, col;
  std::vector<int64_t> idx;
  Scratch(int64_t D) {
    const int64_t Dp = round_up(D, kLane);
    row.resize(Dp);
    Qt.resize(D * kQT);
    Kp.resize(std::max(kKB, kDecodeKB) * D);
    Vp.resize(kKB * Dp);
    S.resize(std::max(kKB * kQT, kDecodeKB));
    O.resize(kQT * Dp);
    m.resize(kQT), l.resize(kQT), alpha.resize(kQT), lse.resize(kQT), col.resize(kKB);
    idx.resize(std::max(kKB, kDecodeKB));
  }
};

inline const void* row_ptr(const AttnProblem& p, const View4& t, int64_t b, int64_t h, int64_t s) {
  return elem_ptr(t.data, p.dtype, b * t.sb + h * t.sh + s * t.ss);
}

// Qt[d][i] = q[b, h, q0 + i, d] * scale * log2(e); columns qn..kQT are zero.
void pack_qt(const AttnProblem& p, const AttnKernels& kk, int64_t b, int64_t h, int64_t q0, int64_t qn, Scratch& s) {
  const float sc = p.scale * kLog2e;
  for (int64_t i = 0; i < kQT; ++i) {
    if (i < qn) kk.load_row(s.row.data(), row_ptr(p, p.q, b, h, q0 + i), p.dtype, p.D, p.D, sc);
    for (int64_t d = 0; d < p.D; ++d) s.Qt[d * kQT + i] = i < qn ? s.row[d] : 0.0f;
  }
}

// S^T [kb][kQT] for the gathered keys already in s.Kp, causal positions set to -inf.
void scores_block(const AttnProblem& p, const AttnKernels& kk, int64_t kb, int64_t q0, Scratch& s) {
  kk.gemm(kb, kQT, p.D, s.Kp.data(), p.D, 1, s.Qt.data(), kQT, s.S.data(), kQT, false);
  if (!p.causal) return;
  const int64_t off = p.Sk - p.Sq + q0;  // absolute position of query column 0
  for (int64_t r = 0; r < kb; ++r) {
    const int64_t cut = std::min(std::max<int64_t>(s.idx[r] - off, 0), kQT);  // columns that cannot see key r
    std::fill(s.S.begin() + r * kQT, s.S.begin() + r * kQT + cut, -kInf);
  }
}

// One query tile of pass 1: output rows (when out) and base-2 log-sum-exp per query (when lse).
void prefill_tile(const AttnProblem& p, const AttnKernels& kk, int64_t b, int64_t h, int64_t q0, void* out,
                  float* lse, Scratch& s) {
  const int64_t qn = std::min(kQT, p.Sq - q0), Dp = round_up(p.D, kLane);
  const int64_t* keep = p.keep_idx ? p.keep_idx + (b * p.H + h) * p.kept : nullptr;
  const int64_t limit = p.causal ? p.Sk - p.Sq + q0 + qn - 1 : std::numeric_limits<int64_t>::max();
  pack_qt(p, kk, b, h, q0, qn, s);
  std::fill(s.m.begin(), s.m.end(), -kInf);
  std::fill(s.l.begin(), s.l.end(), 0.0f);
  if (out) std::fill(s.O.begin(), s.O.begin() + qn * Dp, 0.0f);
  int64_t kb = 0;
  auto flush = [&] {
    for (int64_t r = 0; r < kb; ++r) {
      kk.load_row(s.Kp.data() + r * p.D, row_ptr(p, p.k, b, h, s.idx[r]), p.dtype, p.D, p.D, 1.0f);
      if (out) kk.load_row(s.Vp.data() + r * Dp, row_ptr(p, p.v, b, h, s.idx[r]), p.dtype, p.D, Dp, 1.0f);
    }
    scores_block(p, kk, kb, q0, s);
    kk.softmax_cols(s.S.data(), kb, kQT, kQT, s.m.data(), s.l.data(), s.alpha.data());
    if (out) {
      for (int64_t i = 0; i < qn; ++i)
        if (s.alpha[i] != 1.0f) kk.scale(s.O.data() + i * Dp, Dp, s.alpha[i]);
      kk.gemm(qn, Dp, kb, s.S.data(), 1, kQT, s.Vp.data(), Dp, s.O.data(), Dp, true);
    }
    kb = 0;
  };
  for (int64_t j = 0; j < p.kept; ++j) {
    const int64_t key = keep ? keep[j] : j;
    if (key > limit) continue;  // after every query of this tile: never visible here
    s.idx[kb++] = key;
    if (kb == kKB) flush();
  }
  if (kb) flush();
  for (int64_t i = 0; i < qn; ++i) {
    const float l = s.l[i];  // 0: the query saw no kept key -> zero row, contributes no score
    if (out) {
      void* dst = static_cast<char*>(out) + ((b * p.H + h) * p.Sq + q0 + i) * p.D * (p.dtype == DType::kF32 ? 4 : 2);
      kk.store_row(dst, p.dtype, s.O.data() + i * Dp, p.D, l > 0.0f ? 1.0f / l : 0.0f);
    }
    if (lse) lse[i] = l > 0.0f ? s.m[i] + std::log2(l) : kInf;
  }
}

// Pass 2 for one block of kept keys: mean over queries of exp2(s - lse) per key.
void colsum_block(const AttnProblem& p, const AttnKernels& kk, int64_t b, int64_t h, int64_t j0, const float* lse,
                  float* dst, Scratch& s) {
  const int64_t kb = std::min(kKB, p.kept - j0);
  const int64_t* keep = p.keep_idx ? p.keep_idx + (b * p.H + h) * p.kept : nullptr;
  int64_t first = p.Sk;
  for (int64_t r = 0; r < kb; ++r) {
    s.idx[r] = keep ? keep[j0 + r] : j0 + r;
    first = std::min(first, s.idx[r]);
    kk.load_row(s.Kp.data() + r * p.D, row_ptr(p, p.k, b, h, s.idx[r]), p.dtype, p.D, p.D, 1.0f);
  }
  std::fill(s.col.begin(), s.col.begin() + kb, 0.0f);
  // Causal: queries before the earliest key of the block see none of it.
  const int64_t start = p.causal ? std::max<int64_t>(0, first - (p.Sk - p.Sq)) : 0;
  for (int64_t q0 = start; q0 < p.Sq; q0 += kQT) {
    const int64_t qn = std::min(kQT, p.Sq - q0);
    pack_qt(p, kk, b, h, q0, qn, s);
    for (int64_t i = 0; i < kQT; ++i) s.lse[i] = i < qn ? lse[q0 + i] : kInf;
    scores_block(p, kk, kb, q0, s);
    kk.exp_rowsum(s.S.data(), kb, kQT, kQT, s.lse.data(), s.col.data());
  }
  for (int64_t r = 0; r < kb; ++r) dst[j0 + r] = s.col[r] / static_cast<float>(p.Sq);
}

// Sq == 1 (or CLS scores): one (b, h) pair; query row q_row; scores (optional) get the softmax.
void decode_head(const AttnProblem& p, const AttnKernels& kk, int64_t b, int64_t h, int64_t q_row, void* out,
                 float* scores, Scratch& s) {
  const int64_t* keep = p.keep_idx ? p.keep_idx + (b * p.H + h) * p.kept : nullptr;
  const void* kbase = row_ptr(p, p.k, b, h, 0);
  const void* vbase = out ? row_ptr(p, p.v, b, h, 0) : nullptr;
  float* qv = s.row.data();
  float* o = s.O.data();
  kk.load_row(qv, row_ptr(p, p.q, b, h, q_row), p.dtype, p.D, p.D, p.scale * kLog2e);
  std::fill(o, o + p.D, 0.0f);
  float m = -kInf, l = 0.0f;
  for (int64_t j0 = 0; j0 < p.kept; j0 += kDecodeKB) {
    const int64_t kb = std::min(kDecodeKB, p.kept - j0);
    for (int64_t r = 0; r < kb; ++r) s.idx[r] = keep ? keep[j0 + r] : j0 + r;
    float* sc = s.S.data();
    kk.dots(qv, kbase, p.k.ss, s.idx.data(), kb, p.dtype, p.D, sc);
    if (scores) std::copy(sc, sc + kb, scores + j0);
    float mx = m;
    for (int64_t r = 0; r < kb; ++r) mx = std::fmax(mx, sc[r]);
    const float use = mx == -kInf ? 0.0f : mx;
    const float alpha = std::exp2(m - use);
    l = l * alpha + kk.exp_sub(sc, kb, use);
    m = mx;
    if (out) {
      kk.scale(o, p.D, alpha);
      kk.axpys(o, sc, vbase, p.v.ss, s.idx.data(), kb, p.dtype, p.D);
    }
  }
  if (out) {
    void* dst = static_cast<char*>(out) + (b * p.H + h) * p.D * (p.dtype == DType::kF32 ? 4 : 2);
    kk.store_row(dst, p.dtype, o, p.D, 1.0f / l);
  }
  if (scores) kk.exp_sub(scores, p.kept, m + std::log2(l));
}

// One Scratch per thread of a run, made by the first chunk that thread runs (a helper that never
// joins costs no allocation).
struct ScratchSet {
  int64_t D;
  std::vector<std::unique_ptr<Scratch>> per_slot;
  ScratchSet(int64_t d, int threads) : D(d), per_slot(threads) {}
  Scratch& operator[](int slot) {
    if (!per_slot[slot]) per_slot[slot] = std::make_unique<Scratch>(D);
    return *per_slot[slot];
  }
};

// The thread count torch uses (it sets OpenMP's), as the linears get from at::get_num_threads().
int attn_threads() { return omp_get_max_threads(); }

// Pass 1 over every (b, h, query tile), then (when scores) pass 2 over every (b, h, key block).
void prefill(const AttnProblem& p, void* out, float* scores) {
  const AttnKernels& kk = attn_kernels();
  const int64_t nqt = (p.Sq + kQT - 1) / kQT, nkb = (p.kept + kKB - 1) / kKB, BH = p.B * p.H;
  std::vector<float> lse(scores ? BH * p.Sq : 0);
  const int threads = attn_threads();
  ScratchSet s(p.D, threads);
  parallel_for(BH * nqt, threads, [&](int64_t t, int slot) {
    const int64_t bh = t / nqt, q0 = t % nqt * kQT;
    prefill_tile(p, kk, bh / p.H, bh % p.H, q0, out, scores ? lse.data() + bh * p.Sq + q0 : nullptr, s[slot]);
  });
  if (!scores) return;
  parallel_for(BH * nkb, threads, [&](int64_t t, int slot) {
    const int64_t bh = t / nkb;
    colsum_block(p, kk, bh / p.H, bh % p.H, t % nkb * kKB, lse.data() + bh * p.Sq, scores + bh * p.kept, s[slot]);
  });
}

void decode(const AttnProblem& p, int64_t q_row, void* out, float* scores) {
  const AttnKernels& kk = attn_kernels();
  const int threads = attn_threads();
  ScratchSet s(p.D, threads);
  parallel_for(p.B * p.H, threads, [&](int64_t bh, int slot) {
    decode_head(p, kk, bh / p.H, bh % p.H, q_row, out, scores ? scores + bh * p.kept : nullptr, s[slot]);
  });
}

}  // namespace

void pruned_attention(const AttnProblem& p, void* out, float* key_scores) {
  // A single query sits at Sk - 1 and sees every key, so causal changes nothing at decode.
  if (p.Sq == 1) return decode(p, 0, out, key_scores);
  prefill(p, out, key_scores);
}

void token_scores(const AttnProblem& p, bool cls_only, float* out) {
  AttnProblem all = p;
  all.keep_idx = nullptr;
  all.kept = p.Sk;
  all.v = View4{};
  if (cls_only || p.Sq == 1) {
    all.Sq = 1;
    all.causal = false;
    return decode(all, 0, nullptr, out);
  }
  prefill(all, nullptr, out);
}

}  // namespace sparsekern
