// Torch glue of the CPU attention kernels (csrc/cpu/attention.h):
//   _pruned_attention_cpu(q, k, v, keep_idx, causal, scale)          -> out
//   _pruned_attention_scores_cpu(q, k, v, keep_idx, causal, scale)   -> (out, fp32 key_scores [B, H, kept])
//   _token_scores_cpu(q, k, causal, scale, cls_only)                 -> fp32 [B, H, Sk]
// Each op checks its arguments itself (cpu/op_checks.h, same words as sparsekern/ops.py): they are
// callable without ops.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "cpu/attention.h"
#include "cpu/op_checks.h"
#include "cpu/output.h"

namespace {

using sparsekern::AttnProblem;
using sparsekern::DType;

DType to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kF32;
    case at::kHalf: return DType::kF16;
    default: return DType::kBF16;  // check_float has refused anything else
  }
}

// Head dim contiguous (transposed [B, S, H, D] views pass as they are); anything else is copied.
at::Tensor rows(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

sparsekern::View4 view(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

void check_4d(const char* name, const at::Tensor& t) {
  sparsekern::check_float(name, t);
  TORCH_CHECK_VALUE(t.dim() == 4, name, ": expected [batch, heads, seq, head_dim], got shape ",
                    sparsekern::py_shape(t.sizes()));
}

// sparsekern/ops.py check_attention, in the same order and words.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v) {
  check_4d("q", q);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "q: expected device cpu (a CPU kernel), got ", q.device());
  check_4d("k", k);
  sparsekern::check_same("k", k, q, "q");
  if (v) {
    check_4d("v", *v);
    sparsekern::check_same("v", *v, q, "q");
  }
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), "k: expected [",
                    q.size(0), ", ", q.size(1), ", Sk, ", q.size(3), "] to match q ", sparsekern::py_shape(q.sizes()),
                    ", got ", sparsekern::py_shape(k.sizes()));
  if (v) {
    TORCH_CHECK_VALUE(v->sizes() == k.sizes(), "v: expected shape ", sparsekern::py_shape(k.sizes()),
                      " (that of k), got ", sparsekern::py_shape(v->sizes()));
  }
  TORCH_CHECK_VALUE(k.size(2) >= 1, "k: expected at least one key");
}

AttnProblem problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v, std::optional<double> scale,
                    bool causal) {
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
  check_qkv(q_, k_, &v_);
  sparsekern::check_tensor("keep_idx", keep_, {at::kLong});
  TORCH_CHECK_VALUE(keep_.device() == q_.device(), "keep_idx: expected device ", q_.device(), " (that of q), got ",
                    keep_.device());
  TORCH_CHECK_VALUE(keep_.dim() == 3 && keep_.size(0) == q_.size(0) && keep_.size(1) == q_.size(1),
                    "keep_idx: expected [", q_.size(0), ", ", q_.size(1), ", kept], got shape ",
                    sparsekern::py_shape(keep_.sizes()));
  TORCH_CHECK_VALUE(keep_.size(2) >= 1, "keep_idx: the keep set is empty; expected at least one kept key");
  const at::Tensor keep = keep_.contiguous();
  // Never read outside k/v, whatever the caller passed (sparsekern/ops.py check_keep_idx_values).
  // Repeats stay in bounds; only ops.py refuses them (that check sorts, too dear per call here).
  const int64_t lo = keep.min().item<int64_t>(), hi = keep.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < k_.size(2), "keep_idx: expected key positions in 0..", k_.size(2) - 1,
                    ", got values in ", lo, "..", hi);
  const at::Tensor q = rows(q_), k = rows(k_), v = rows(v_);
  AttnProblem p = problem(q, k, &v, scale, causal);
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
  check_qkv(q_, k_, nullptr);
  TORCH_CHECK_VALUE(!cls_only || q_.size(2) >= 1, "q: cls_only scores the first query; expected at least one query, got shape ",
                    sparsekern::py_shape(q_.sizes()));
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
