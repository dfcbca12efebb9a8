// The lean decode step's small ops (csrc/cpu/lean_step_op.cpp), for `rows` x one position, fp32
// math, element type t in and out. Torch-free. Attention's heads run on the kernels' thread pool
// (`threads`); the other ops take microseconds and run on the calling thread.
//
// Rounding follows sparsekern/lean/decoder.py's Python step (HF's modules) where it is cheap:
// values that the Python step holds in the dtype are rounded to it at the same points, so the two
// steps differ only by fp32 summation order and the odd ulp where ATen fuses differently.
#pragma once

#include <cstdint>

#include "cpu/dtype.h"

namespace sparsekern::lean {

// Shapes of one block's attention: q/k/v heads, head size, and the K/V caches [rows, kv_heads,
// max_len, head_dim] of which position `pos` is written and positions 0..pos are read.
struct AttnShape {
  int64_t rows, heads, kv_heads, head_dim, max_len, pos;
};

// h += y (rounded to t, as the Python step's in-place add; y null: no add), then out = rms_norm(h)
// * w as HF's LlamaRMSNorm (and decoder.py rms_norm): h in fp32 normalised, rounded to t, times w
// in t. h, y, out: [rows, dim]; w: [dim].
void add_rms_norm(void* h, const void* y, const void* w, float eps, int64_t rows, int64_t dim, DType t, void* out);

// Rotary on the q and k heads of qkv [rows, (heads + 2 * kv_heads) * head_dim] with the tables'
// row `pos` (cos, signed sin: q * cos + swap_halves(q) * sin, see LeanDecoder.rope_tables); the
// rotated q goes to q_out [rows, heads * head_dim] (as fp32 of t-rounded values), the rotated k
// and the v heads into the caches at `pos`.
void rotary_kv(const void* qkv, const void* cos, const void* sin, const AttnShape& s, DType t, float* q_out,
               void* k_cache, void* v_cache);

// Single-query attention of q [rows, heads * head_dim] (fp32) over cache positions 0..pos, GQA
// (heads / kv_heads query heads per KV head), fp32 scores and softmax; out [rows, heads *
// head_dim] in t. The rows x heads query heads are split over `threads`; scratch: at least
// threads * (pos + 1 + head_dim) floats.
void attention(const float* q, const void* k_cache, const void* v_cache, const AttnShape& s, float scale, DType t,
               int threads, float* scratch, void* out);

// out = silu(gate) * up for gu [rows, 2 * inter] = [gate | up]; out [rows, inter]. silu(gate) is
// rounded to t before the product (the Python step's two ops).
void silu_mul(const void* gu, int64_t rows, int64_t inter, DType t, void* out);

}  // namespace sparsekern::lean
