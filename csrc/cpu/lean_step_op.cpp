// sparsekern::_lean_step_cpu: one decode step of a Llama-family LM, every block, in one call
// (sparsekern/lean/native.py packs the arguments; sparsekern/lean/decoder.py LeanDecoder.step is
// the same step in Python and the ground truth). Per block: residual add + rms_norm, qkv, rotary
// on q and k with K/V of `pos` written in place, attention over positions 0..pos, o, residual add
// + rms_norm, gate_up, silu(gate) * up, down; then the last add and the final rms_norm. The logits
// are left to native.py (_lean_head_cpu or the head module). The linears run the same C++ kernels
// the CPU backend's plans run (nm_linear_run, bsr_linear_run, at::linear); the small ops are
// lean_kernels.h's fp32 loops, rounded to the dtype where the Python step's ATen ops round, so the
// two steps agree within a few ulps (fp32: ~1e-5), not bit for bit.
//
// NOTE: why C++: the Python step costs ~10 torch calls + 4 planned linear calls per block, a few us
// each in Python (~90 us per block, ~2.7 ms of SmolLM2's 30 blocks besides the weights). Why not
// ATen for the small ops: in bf16 they cost ~150 us per block against ~63 in fp32 (SmolLM2's
// depth at 8 dims per head, 2:4: 4.3 ms/token with ATen, 1.4 with the loops; fp32 1.8 vs 0.8).
//
// Every argument is checked before anything is written: a bad one raises naming it (and its block),
// with the K/V caches untouched.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "cpu/bsr_linear_op.h"
#include "cpu/gemv.h"
#include "cpu/lean_kernels.h"
#include "cpu/parallel.h"
#include "cpu/linear_op_util.h"
#include "cpu/nm_linear_op.h"
#include "cpu/op_checks.h"
#include "cpu/output.h"

namespace sparsekern {
namespace {

// Per block, in `weights` / `specs`: qkv, o, gate_up, down, each as kSlots tensors and kSpec ints
// (sparsekern/lean/native.py pack_linear):
//   dense: [weight, bias?, -, -, -, -]                [0, 0, 0, 0, 0]
//   N:M:   [values, meta, bias?, scales?, zeros?, -]  [1, n, m, group_size, act_block]
//   BSR:   [crow, col, blocks, bias?, scales?, zeros?] [2, 0, 0, 0, 0]
constexpr int64_t kLinears = 4, kSlots = 6, kSpec = 5;
constexpr const char* kNames[kLinears] = {"qkv", "o", "gate_up", "down"};
enum Kind : int64_t { kDense = 0, kNM = 1, kBSR = 2 };

using OptTensor = std::optional<at::Tensor>;

struct Linear {
  Kind kind;
  const OptTensor* t;  // kSlots tensors
  int64_t n, m, group_size, act_block;
  int64_t out;
};

struct Block {
  Linear lin[kLinears];  // qkv, o, gate_up, down
  int64_t heads, kv_heads, inter;
};

std::string where(int64_t block, int64_t lin) { return "blocks[" + std::to_string(block) + "]." + kNames[lin]; }

// Re-raises a check's error with the block and linear named first, keeping its Python type.
template <typename F>
void named(const std::string& prefix, F check) {
  try {
    check();
  } catch (const c10::TypeError& e) {
    TORCH_CHECK_TYPE(false, prefix, ": ", e.msg());
  } catch (const c10::ValueError& e) {
    TORCH_CHECK_VALUE(false, prefix, ": ", e.msg());
  }
}

const at::Tensor& need(const OptTensor& t, const std::string& name) {
  TORCH_CHECK_TYPE(t.has_value() && t->defined(), name, ": expected torch.Tensor, got None");
  return *t;
}

void check_contiguous(const OptTensor& t, const std::string& name) {
  TORCH_CHECK_VALUE(!t || t->is_contiguous(), name, ": expected a contiguous tensor, got strides ",
                    py_shape(t->strides()));
}

// Checks one linear for an input x [rows, k] (the kernels' own checks, on a stand-in x that holds
// no data: `unit`, a [1, 1] tensor of the hidden states' dtype, expanded), and fills in its out
// features. Errors of the checks with x read "blocks[i].o on a [rows, k] input: ...".
Linear check_linear(const OptTensor* t, const int64_t* spec, int64_t rows, int64_t k, const at::Tensor& unit,
                    const std::string& lin_name) {
  Linear l{static_cast<Kind>(spec[0]), t, spec[1], spec[2], spec[3], spec[4], 0};
  const at::Tensor x = unit.expand({rows, k});
  const std::string name = lin_name + " on a [" + std::to_string(rows) + ", " + std::to_string(k) + "] input";
  if (l.kind == kDense) {
    TORCH_CHECK_VALUE(spec[1] == 0 && spec[2] == 0 && spec[3] == 0 && spec[4] == 0, lin_name,
                      ": specs of a dense linear must be [0, 0, 0, 0, 0], got [0, ", spec[1], ", ", spec[2], ", ",
                      spec[3], ", ", spec[4], "]");
    TORCH_CHECK_VALUE(!t[2] && !t[3] && !t[4] && !t[5], lin_name,
                      ": a dense linear takes [weight, bias?, None, None, None, None]");
    const at::Tensor& w = need(t[0], lin_name + ".weight");
    named(lin_name + ".weight", [&] { check_float("weight", w); });
    TORCH_CHECK_VALUE(w.dim() == 2, lin_name, ".weight: expected a 2-D [out, in] tensor, got shape ", py_shape(w.sizes()));
    l.out = w.size(0);
    named(name, [&] { check_linear_common(x, w, "weight", l.out, w.size(1), t[1]); });
  } else if (l.kind == kNM) {
    const at::Tensor& values = need(t[0], lin_name + ".values");
    const at::Tensor& meta = need(t[1], lin_name + ".meta");
    TORCH_CHECK_VALUE(!t[5], lin_name, ": an N:M linear takes [values, meta, bias?, scales?, zeros?, None]");
    named(name, [&] { check_nm_linear_args(x, values, meta, l.n, l.m, t[2], t[3], t[4], l.group_size, l.act_block); });
    l.out = values.size(0);
  } else if (l.kind == kBSR) {
    TORCH_CHECK_VALUE(spec[1] == 0 && spec[2] == 0 && spec[3] == 0 && spec[4] == 0, lin_name,
                      ": specs of a BSR linear must be [2, 0, 0, 0, 0]");
    TORCH_CHECK_VALUE(t[4] || !t[5], lin_name, ": a BSR linear takes [crow, col, blocks, bias?, scales?, zeros?]");
    const at::Tensor& crow = need(t[0], lin_name + ".crow");
    const at::Tensor& col = need(t[1], lin_name + ".col");
    const at::Tensor& blocks = need(t[2], lin_name + ".blocks");
    named(name, [&] { check_bsr_linear_args(x, crow, col, blocks, t[3], t[4], t[5]); });
    l.out = (crow.numel() - 1) * blocks.size(1);
  } else {
    TORCH_CHECK_VALUE(false, lin_name, ": specs[0] (kind) expected 0 (dense), 1 (N:M) or 2 (BSR), got ", spec[0]);
  }
  // The kernels read flat arrays (sparsekern/lean/native.py hands over contiguous tensors).
  static const char* nm_names[kSlots] = {"values", "meta", "bias", "scales", "zeros", "-"};
  static const char* bsr_names[kSlots] = {"crow", "col", "blocks", "bias", "scales", "zeros"};
  if (l.kind != kDense) {
    for (int64_t s = 0; s < kSlots; ++s) {
      check_contiguous(t[s], lin_name + "." + (l.kind == kNM ? nm_names[s] : bsr_names[s]));
    }
  }
  return l;
}

// Dense bf16 / fp32 linears of up to this many rows run gemv.h's kernels (weights read once per
// call; SmolLM2's layers, 1 row, hot: 960x576 bf16 16 vs 45 us for at::linear, fp32 32 vs 45);
// more rows: at::linear's GEMM.
constexpr int64_t kGemvMaxRows = 8;

at::Tensor run_linear(const Linear& l, const at::Tensor& x_in) {
  if (l.kind == kDense) {
    const at::Tensor& w = *l.t[0];
    const OptTensor& bias = l.t[1];
    const DType t = to_dtype(x_in.scalar_type());
    if (x_in.size(0) <= kGemvMaxRows && gemv_supported(t) && w.is_contiguous() && (!bias || bias->is_contiguous())) {
      const at::Tensor x = x_in.contiguous();
      at::Tensor y = new_output({x.size(0), l.out}, x.options());
      gemv(x.const_data_ptr(), x.size(0), x.size(1), w.const_data_ptr(), bias ? bias->const_data_ptr() : nullptr, l.out,
           w.size(1), y.data_ptr(), l.out, t, at::get_num_threads());
      return y;
    }
    return at::linear(x_in, w, bias);
  }
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = new_output({x.size(0), l.out}, x.options());
  if (l.kind == kNM) {
    const at::Tensor none;
    nm_linear_run(x, *l.t[0], *l.t[1], l.n, l.m, l.t[2], l.t[3] ? *l.t[3] : none, l.t[4] ? *l.t[4] : none, l.act_block,
                  y);
  } else {
    bsr_linear_run(x, *l.t[0], *l.t[1], *l.t[2], l.t[3], y, l.t[4], l.t[5]);
  }
  return y;
}

void expect_len(const char* name, int64_t got, int64_t want, const char* per) {
  TORCH_CHECK_VALUE(got == want, name, ": expected ", want, " entries (", per, "), got ", got);
}

at::Tensor lean_step_cpu(const at::Tensor& tokens, int64_t pos, const at::Tensor& embed, const at::Tensor& cos,
                         const at::Tensor& sin, at::TensorList norms, at::ArrayRef<double> eps,
                         const c10::List<OptTensor>& weights_list, at::IntArrayRef specs, at::TensorList k_cache,
                         at::TensorList v_cache, const at::Tensor& final_norm, double final_eps, double scale) {
  // -- checks: everything before anything is written -----------------------------------------
  const int64_t nb = static_cast<int64_t>(k_cache.size());
  expect_len("v_cache", v_cache.size(), nb, "one per block, as k_cache");
  expect_len("norms", norms.size(), 2 * nb, "2 per block");
  expect_len("eps", eps.size(), 2 * nb, "2 per block");
  expect_len("weights", weights_list.size(), kLinears * kSlots * nb, "qkv, o, gate_up, down x 6 per block");
  expect_len("specs", specs.size(), kLinears * kSpec * nb, "qkv, o, gate_up, down x 5 per block");

  check_float("embed", embed);
  TORCH_CHECK_VALUE(embed.device().is_cpu(), "embed: expected device cpu (a CPU kernel), got ", embed.device());
  TORCH_CHECK_VALUE(embed.dim() == 2, "embed: expected a 2-D [vocab, hidden] tensor, got shape ",
                    py_shape(embed.sizes()));
  const int64_t vocab = embed.size(0), dim = embed.size(1);
  check_tensor("tokens", tokens, {at::kLong});
  TORCH_CHECK_VALUE(tokens.device().is_cpu(), "tokens: expected device cpu, got ", tokens.device());
  TORCH_CHECK_VALUE(tokens.dim() == 1 && tokens.size(0) >= 1,
                    "tokens: expected a non-empty 1-D [batch] tensor, got shape ", py_shape(tokens.sizes()));
  const int64_t batch = tokens.size(0);
  {
    const at::Tensor tc = tokens.contiguous();
    const int64_t* ids = tc.data_ptr<int64_t>();
    for (int64_t i = 0; i < batch; ++i) {
      TORCH_CHECK_VALUE(0 <= ids[i] && ids[i] < vocab, "tokens: expected ids in [0, ", vocab, "), got ", ids[i],
                        " at row ", i);
    }
  }
  TORCH_CHECK_VALUE(cos.dim() == 2 && cos.size(1) >= 2 && cos.size(1) % 2 == 0,
                    "cos: expected a 2-D [positions, head_dim] tensor with an even head_dim, got shape ",
                    py_shape(cos.sizes()));
  const int64_t head_dim = cos.size(1);
  check_same("cos", cos, embed, "embed");
  check_same("sin", sin, embed, "embed");
  TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), "sin: expected shape ", py_shape(cos.sizes()), " (that of cos), got ",
                    py_shape(sin.sizes()));
  TORCH_CHECK_VALUE(0 <= pos && pos < cos.size(0), "pos: expected 0 <= pos < ", cos.size(0),
                    " (positions in cos / sin), got ", pos);
  check_same("final_norm", final_norm, embed, "embed");
  // The small-op loops read these as flat arrays.
  TORCH_CHECK_VALUE(cos.is_contiguous() && sin.is_contiguous() && final_norm.is_contiguous(),
                    "cos / sin / final_norm: expected contiguous tensors");
  TORCH_CHECK_VALUE(final_norm.dim() == 1 && final_norm.size(0) == dim, "final_norm: expected shape ",
                    py_shape({dim}), ", got ", py_shape(final_norm.sizes()));

  const std::vector<OptTensor> weights = weights_list.vec();
  const at::Tensor unit = at::empty({1, 1}, embed.options());
  std::vector<Block> blocks(nb);
  for (int64_t i = 0; i < nb; ++i) {
    for (int64_t j = 0; j < 2; ++j) {
      const std::string name = "norms[" + std::to_string(2 * i + j) + "]";
      named(name, [&] { check_same("weight", norms[2 * i + j], embed, "embed"); });
      TORCH_CHECK_VALUE(norms[2 * i + j].dim() == 1 && norms[2 * i + j].size(0) == dim, name, ": expected shape ",
                        py_shape({dim}), ", got ", py_shape(norms[2 * i + j].sizes()));
      TORCH_CHECK_VALUE(norms[2 * i + j].is_contiguous(), name, ": expected a contiguous tensor");
    }
    const at::Tensor &kc = k_cache[i], &vc = v_cache[i];
    const std::string kname = "k_cache[" + std::to_string(i) + "]", vname = "v_cache[" + std::to_string(i) + "]";
    named(kname, [&] { check_same("cache", kc, embed, "embed"); });
    named(vname, [&] { check_same("cache", vc, embed, "embed"); });
    TORCH_CHECK_VALUE(kc.dim() == 4 && kc.size(0) == batch && kc.size(1) >= 1 && kc.size(3) == head_dim, kname,
                      ": expected [batch=", batch, ", kv_heads, max_len, head_dim=", head_dim, "], got shape ",
                      py_shape(kc.sizes()));
    TORCH_CHECK_VALUE(vc.sizes() == kc.sizes(), vname, ": expected shape ", py_shape(kc.sizes()), " (that of ", kname,
                      "), got ", py_shape(vc.sizes()));
    TORCH_CHECK_VALUE(kc.is_contiguous() && vc.is_contiguous(), kname, " / ", vname, ": expected contiguous tensors");
    TORCH_CHECK_VALUE(pos < kc.size(2), "pos: expected 0 <= pos < ", kc.size(2), " (the length of ", kname,
                      "), got ", pos);
    Block& B = blocks[i];
    B.kv_heads = kc.size(1);
    const OptTensor* t = weights.data() + i * kLinears * kSlots;
    const int64_t* s = specs.data() + i * kLinears * kSpec;
    // qkv and gate_up read the hidden state; o and down read what they are handed.
    B.lin[0] = check_linear(t, s, batch, dim, unit, where(i, 0));
    const int64_t qkv_heads = B.lin[0].out / head_dim;
    TORCH_CHECK_VALUE(B.lin[0].out % head_dim == 0 && qkv_heads > 2 * B.kv_heads &&
                          (qkv_heads - 2 * B.kv_heads) % B.kv_heads == 0,
                      where(i, 0), ": expected (heads + 2 * ", B.kv_heads, ") * ", head_dim,
                      " outputs with heads a multiple of kv_heads=", B.kv_heads, " (from ", kname, "), got ",
                      B.lin[0].out);
    B.heads = qkv_heads - 2 * B.kv_heads;
    B.lin[1] = check_linear(t + kSlots, s + kSpec, batch, B.heads * head_dim, unit, where(i, 1));
    B.lin[2] = check_linear(t + 2 * kSlots, s + 2 * kSpec, batch, dim, unit, where(i, 2));
    TORCH_CHECK_VALUE(B.lin[2].out >= 2 && B.lin[2].out % 2 == 0, where(i, 2),
                      ": expected an even number of outputs (gate, up), got ", B.lin[2].out);
    B.inter = B.lin[2].out / 2;
    B.lin[3] = check_linear(t + 3 * kSlots, s + 3 * kSpec, batch, B.inter, unit, where(i, 3));
    for (int64_t j : {1, 3}) {
      TORCH_CHECK_VALUE(B.lin[j].out == dim, where(i, j), ": expected ", dim, " outputs (hidden size), got ",
                        B.lin[j].out);
    }
  }

  // -- the step (LeanDecoder.step's ops; the small ones as lean_kernels.h's loops) -------------
  const int64_t b = batch, d = head_dim, max_len = nb ? k_cache[0].size(2) : 0;
  const DType t = to_dtype(embed.scalar_type());
  int64_t widest = 0, widest_inter = 0;  // o's and down's inputs: the largest over blocks
  for (const Block& B : blocks) {
    widest = std::max(widest, B.heads * d);
    widest_inter = std::max(widest_inter, B.inter);
  }
  at::Tensor h = at::embedding(embed, tokens).contiguous();
  const at::Tensor xn = at::empty({b, dim}, embed.options());  // normed h: qkv's and gate_up's input
  const at::Tensor attn = at::empty({b, widest}, embed.options());
  const at::Tensor act_buf = at::empty({b, widest_inter}, embed.options());  // silu(gate) * up
  const int threads = at::get_num_threads();
  std::vector<float> q(b * widest), scratch(threads * (max_len + d));  // attention's, per thread
  at::Tensor y;  // the last linear's output, added to h by the next norm
  for (int64_t i = 0; i < nb; ++i) {
    const Block& B = blocks[i];
    const lean::AttnShape shape{b, B.heads, B.kv_heads, d, max_len, pos};
    lean::add_rms_norm(h.data_ptr(), y.defined() ? y.const_data_ptr() : nullptr, norms[2 * i].const_data_ptr(),
                       static_cast<float>(eps[2 * i]), b, dim, t, xn.data_ptr());
    const at::Tensor qkv = run_linear(B.lin[0], xn).contiguous();
    lean::rotary_kv(qkv.const_data_ptr(), cos.const_data_ptr(), sin.const_data_ptr(), shape, t, q.data(),
                    k_cache[i].data_ptr(), v_cache[i].data_ptr());
    const at::Tensor a = attn.view(-1).narrow(0, 0, b * B.heads * d).view({b, B.heads * d});
    // Threads by the work, as the linears' decode (parallel.h decode_threads).
    const int att_threads = decode_threads(threads, b * B.heads * (pos + 1) * d * 2);
    lean::attention(q.data(), k_cache[i].const_data_ptr(), v_cache[i].const_data_ptr(), shape,
                    static_cast<float>(scale), t, att_threads, scratch.data(), attn.data_ptr());
    y = run_linear(B.lin[1], a).contiguous();
    lean::add_rms_norm(h.data_ptr(), y.const_data_ptr(), norms[2 * i + 1].const_data_ptr(),
                       static_cast<float>(eps[2 * i + 1]), b, dim, t, xn.data_ptr());
    const at::Tensor gu = run_linear(B.lin[2], xn).contiguous();
    const at::Tensor act = act_buf.view(-1).narrow(0, 0, b * B.inter).view({b, B.inter});
    lean::silu_mul(gu.const_data_ptr(), b, B.inter, t, act.data_ptr());
    y = run_linear(B.lin[3], act).contiguous();
  }
  const at::Tensor out = at::empty({b, dim}, embed.options());
  lean::add_rms_norm(h.data_ptr(), y.defined() ? y.const_data_ptr() : nullptr, final_norm.const_data_ptr(),
                     static_cast<float>(final_eps), b, dim, t, out.data_ptr());
  return out;
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("_lean_step_cpu", &sparsekern::lean_step_cpu); }
