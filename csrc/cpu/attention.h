// Token-pruned attention and token scores on the CPU (torch-free; torch glue in attention_op.cpp).
//
// pruned_attention: every query attends only to the keys/values at keep_idx, flash-style (online
// softmax over key blocks, no [Sq, Sk] matrix) with the gather fused into the per-block packing
// (kept K/V rows are read straight from the source tensors, never copied as a whole).
// token_scores: attention mass each key receives, from each query row's log-sum-exp (pass 1)
// and a second pass that accumulates exp(s - lse) per key.
#pragma once

#include <cstdint>

#include "cpu/dtype.h"

namespace sparsekern {

// A [B, H, S, D] tensor: element (b, h, s, d) at data + b*sb + h*sh + s*ss + d (elements; the
// head dimension is contiguous, so transposed [B, S, H, D] views work without a copy).
struct View4 {
  const void* data = nullptr;
  int64_t sb = 0, sh = 0, ss = 0;
};

struct AttnProblem {
  DType dtype = DType::kF32;
  int64_t B = 0, H = 0, Sq = 0, Sk = 0, D = 0;
  View4 q, k, v;                       // v.data is null for token_scores
  const int64_t* keep_idx = nullptr;   // [B, H, kept] contiguous; null: every key, in order
  int64_t kept = 0;                    // keys per (b, h): keep_idx.size(2), or Sk
  bool causal = false;                 // query i sits at Sk - Sq + i and sees keys at <= that
  float scale = 1.0f;                  // logits = scale * q.k
};

// out: [B, H, Sq, D] contiguous in p.dtype. key_scores (optional, fp32 [B, H, kept]): mean over
// queries of the probability each kept key receives (a query that sees no kept key counts 0).
void pruned_attention(const AttnProblem& p, void* out, float* key_scores);

// out: fp32 [B, H, Sk], softmax over all keys averaged over queries; cls_only: query 0 only,
// not causal. Ignores p.keep_idx.
void token_scores(const AttnProblem& p, bool cls_only, float* out);

}  // namespace sparsekern
