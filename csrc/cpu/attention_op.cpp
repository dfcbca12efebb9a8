// Torch glue of the CPU attention kernels (csrc/cpu/attention.h):
//   _pruned_attention_cpu(q, k, v, keep_idx, causal, scale)          -> out
//   _pruned_attention_scores_cpu(q, k, v, keep_idx, causal, scale)   -> (out, fp32 key_scores [B, H, kept])
//   _token_scores_cpu(q, k, causal, scale, cls_only)                 -> fp32 [B, H, Sk]
// sparsekern/ops.py checks the arguments first; the checks here only guard memory safety.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "cpu/attention.h"
#include "cpu/output.h"

namespace {

using sparsekern::AttnProblem;
using sparsekern::DType;

DType to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kF32;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    default: TORCH_CHECK(false, "sparsekern attention: expected float32/float16/bfloat16, got ", t.scalar_type());
  }
}

// Head dim contiguous (transposed [B, S, H, D] views pass as they are); anything else is copied.
at::Tensor rows(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

sparsekern::View4 view(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

AttnProblem problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v, std::optional<double> scale,
                    bool causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "sparsekern attention: q and k must be [B, H, S, D]");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "sparsekern attention: CPU tensors expected");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "sparsekern attention: k dtype differs from q");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3) && k.size(2) >= 1,
              "sparsekern attention: k shape ", k.sizes(), " does not match q ", q.sizes());
  if (v) {
    TORCH_CHECK(v->sizes() == k.sizes() && v->scalar_type() == q.scalar_type() && v->device().is_cpu(),
                "sparsekern attention: v must match k");
  }
  AttnProblem p;
  p.dtype = to_dtype(q);
  p.B = q.size(0), p.H = q.size(1), p.Sq = q.size(2), p.Sk = k.size(2), p.D = q.size(3);
  p.causal = causal;
  p.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(p.D)));
  p.q = view(q), p.k = view(k);
  if (v) p.v = view(*v);
  return p;
}

std::tuple<at::Tensor, at::Tensor> run_pruned(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                              const at::Tensor& keep_, bool causal, std::optional<double> scale,
                                              bool with_scores) {
  const at::Tensor q = rows(q_), k = rows(k_), v = rows(v_);
  AttnProblem p = problem(q, k, &v, scale, causal);
  TORCH_CHECK(keep_.scalar_type() == at::kLong && keep_.dim() == 3 && keep_.size(0) == p.B && keep_.size(1) == p.H &&
                  keep_.size(2) >= 1 && keep_.device().is_cpu(),
              "sparsekern attention: keep_idx must be int64 [B, H, kept>=1], got ", keep_.sizes());
  const at::Tensor keep = keep_.contiguous();
  // Never read outside k/v, whatever the caller passed (ops.py has already said why, if so).
  TORCH_CHECK(keep.min().item<int64_t>() >= 0 && keep.max().item<int64_t>() < p.Sk,
              "sparsekern attention: keep_idx values outside 0..", p.Sk - 1);
  p.keep_idx = keep.data_ptr<int64_t>();
  p.kept = keep.size(2);
  at::Tensor out = sparsekern::new_output({p.B, p.H, p.Sq, p.D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor scores;
  if (with_scores) scores = sparsekern::new_output({p.B, p.H, p.kept}, q.options().dtype(at::kFloat));
  sparsekern::pruned_attention(p, out.data_ptr(), with_scores ? scores.data_ptr<float>() : nullptr);
  return {out, scores};
}

at::Tensor pruned_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& keep_idx, bool causal, std::optional<double> scale) {
  return std::get<0>(run_pruned(q, k, v, keep_idx, causal, scale, false));
}

std::tuple<at::Tensor, at::Tensor> pruned_attention_scores_cpu(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const at::Tensor& keep_idx,
                                                               bool causal, std::optional<double> scale) {
  return run_pruned(q, k, v, keep_idx, causal, scale, true);
}

at::Tensor token_scores_cpu(const at::Tensor& q_, const at::Tensor& k_, bool causal, std::optional<double> scale,
                            bool cls_only) {
  const at::Tensor q = rows(q_), k = rows(k_);
  AttnProblem p = problem(q, k, nullptr, scale, causal);
  at::Tensor out = sparsekern::new_output({p.B, p.H, p.Sk}, q.options().dtype(at::kFloat));
  sparsekern::token_scores(p, cls_only, out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("_pruned_attention_cpu", &pruned_attention_cpu);
  m.impl("_pruned_attention_scores_cpu", &pruned_attention_scores_cpu);
  m.impl("_token_scores_cpu", &token_scores_cpu);
}
