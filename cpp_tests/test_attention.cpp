// ctest: CPU pruned_attention / token_scores against a naive double-precision loop, every ISA,
// odd sizes (head dim 59, 113 queries x 203 keys), causal and not, decode, a query that sees
// no kept key. Torch-free: links the kernels library only.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/attention.h"

using sparsekern::AttnProblem;

namespace {

struct Case {
  int64_t B, H, Sq, Sk, D, kept;
  bool causal;
};

// Naive attention over the kept keys in double; also the kept keys' mean probabilities.
void naive(const Case& c, const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
           const std::vector<int64_t>& keep, float scale, std::vector<double>& out, std::vector<double>& scores) {
  out.assign(c.B * c.H * c.Sq * c.D, 0.0);
  scores.assign(c.B * c.H * c.kept, 0.0);
  for (int64_t bh = 0; bh < c.B * c.H; ++bh) {
    for (int64_t i = 0; i < c.Sq; ++i) {
      std::vector<double> s(c.kept, -INFINITY);
      double mx = -INFINITY;
      for (int64_t j = 0; j < c.kept; ++j) {
        const int64_t key = keep[bh * c.kept + j];
        if (c.causal && key > c.Sk - c.Sq + i) continue;
        double acc = 0;
        for (int64_t d = 0; d < c.D; ++d) acc += (double)q[(bh * c.Sq + i) * c.D + d] * k[(bh * c.Sk + key) * c.D + d];
        s[j] = acc * scale;
        mx = std::fmax(mx, s[j]);
      }
      if (mx == -INFINITY) continue;  // sees nothing: zero row, no score
      double l = 0;
      for (double& x : s) l += (x = std::exp(x - mx));
      for (int64_t j = 0; j < c.kept; ++j) {
        const double p = s[j] / l;
        scores[bh * c.kept + j] += p / c.Sq;
        const int64_t key = keep[bh * c.kept + j];
        for (int64_t d = 0; d < c.D; ++d) out[(bh * c.Sq + i) * c.D + d] += p * v[(bh * c.Sk + key) * c.D + d];
      }
    }
  }
}

int run(const Case& c, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  std::vector<float> q(c.B * c.H * c.Sq * c.D), k(c.B * c.H * c.Sk * c.D), v(k.size());
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = nd(rng);
  std::vector<int64_t> keep;
  for (int64_t bh = 0; bh < c.B * c.H; ++bh) {
    std::vector<int64_t> perm(c.Sk);
    for (int64_t j = 0; j < c.Sk; ++j) perm[j] = j;
    std::shuffle(perm.begin(), perm.end(), rng);  // unsorted keep sets
    keep.insert(keep.end(), perm.begin(), perm.begin() + c.kept);
  }
  AttnProblem p;
  p.B = c.B, p.H = c.H, p.Sq = c.Sq, p.Sk = c.Sk, p.D = c.D, p.causal = c.causal;
  p.scale = 1.0f / std::sqrt((float)c.D);
  p.q = {q.data(), c.H * c.Sq * c.D, c.Sq * c.D, c.D};
  p.k = {k.data(), c.H * c.Sk * c.D, c.Sk * c.D, c.D};
  p.v = {v.data(), c.H * c.Sk * c.D, c.Sk * c.D, c.D};
  p.keep_idx = keep.data(), p.kept = c.kept;
  std::vector<double> want, want_scores;
  naive(c, q, k, v, keep, p.scale, want, want_scores);
  std::vector<float> out(want.size(), NAN), scores(want_scores.size(), NAN);
  sparsekern::pruned_attention(p, out.data(), scores.data());
  double err = 0, serr = 0;
  for (size_t i = 0; i < out.size(); ++i) err = std::fmax(err, std::fabs(out[i] - want[i]) + (std::isnan(out[i]) ? 1e9 : 0));
  for (size_t i = 0; i < scores.size(); ++i)
    serr = std::fmax(serr, std::fabs(scores[i] - want_scores[i]) + (std::isnan(scores[i]) ? 1e9 : 0));
  const bool ok = err < 2e-5 && serr < 1e-6;
  std::printf("%s B%ld H%ld Sq%ld Sk%ld D%ld kept%ld causal%d: out err %.2g, scores err %.2g\n", ok ? "ok  " : "FAIL",
              (long)c.B, (long)c.H, (long)c.Sq, (long)c.Sk, (long)c.D, (long)c.kept, (int)c.causal, err, serr);
  return ok ? 0 : 1;
}

}  // namespace

int main() {
  const Case cases[] = {
      {2, 3, 113, 203, 59, 70, true}, {2, 3, 113, 203, 59, 70, false}, {1, 2, 1, 300, 128, 77, false},
      {1, 2, 65, 64, 32, 64, true},   {2, 4, 6, 10, 40, 2, true},  // 2 of 10 keys kept: some early queries see none
  };
  int failures = 0;
  for (const char* isa : {"portable", "avx2"}) {
    setenv("SPARSEKERN_CPU_ISA", isa, 1);
    std::printf("ISA request: %s\n", isa);
    std::mt19937 rng(1234);
    for (const Case& c : cases) failures += run(c, rng);
  }
  return failures ? 1 : 0;
}
