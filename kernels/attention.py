"""Triton ``pruned_attention`` / ``token_scores`` (GPU; CPU tensors under ``TRITON_INTERPRET=1``).

Two kernels, both gathering kept K/V rows by index straight from the source tensors:

- ``_attn_fwd_kernel``: one program per (query tile, batch*head); flash-style online softmax over
  blocks of kept keys, ``tl.dot`` for QK^T and PV. Writes the output (``WITH_V``) and/or each
  query row's base-2 log-sum-exp (``WRITE_LSE``) for the scores pass.
- ``_key_scores_kernel``: one program per (key block, batch*head); recomputes QK^T over all
  queries and accumulates ``exp2(s - lse)`` per key: the attention mass each key receives,
  without an [Sq, Sk] matrix in memory.

``token_scores`` = fwd (LSE only, every key) + key scores; ``pruned_attention_with_scores`` = fwd
(output + LSE) + key scores over the kept keys. Wrappers: check shapes, allocate, launch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparsekern.kernels._common import dot_precision
from sparsekern.ops import new_output

LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd_kernel(
    q_ptr,  # (B, H, Sq, D) strided, head dim contiguous
    k_ptr,  # (B, H, Sk, D)
    v_ptr,  # (B, H, Sk, D), unused unless WITH_V
    keep_ptr,  # (B*H, KEPT) int64, unused unless GATHER
    out_ptr,  # (B, H, Sq, D) contiguous
    lse_ptr,  # (B*H, Sq) fp32, unused unless WRITE_LSE
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    H, SQ, SK, KEPT, D,
    qk_scale,  # scale * log2(e)
    CAUSAL: tl.constexpr, GATHER: tl.constexpr, WITH_V: tl.constexpr, WRITE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: batch * stride_b (and a row * stride_s of big or strided inputs) passes 2**31.
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < SQ
    d_ok = offs_d < D
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qs + offs_d[None, :],
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    qpos = offs_m + (SK - SQ)  # absolute position of each query (causal)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, KEPT, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < KEPT
        if GATHER:
            idx = tl.load(keep_ptr + bh.to(tl.int64) * KEPT + offs_n, mask=n_ok, other=0)
        else:
            idx = offs_n.to(tl.int64)
        k = tl.load(
            k_ptr + b * stride_kb + h * stride_kh + idx[:, None] * stride_ks + offs_d[None, :],
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        ok = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            ok = ok & (idx[None, :] <= qpos[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: p = 0, not NaN
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if WITH_V:
            v = tl.load(
                v_ptr + b * stride_vb + h * stride_vh + idx[:, None] * stride_vs + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    seen = l_i > 0.0  # a query that sees no kept key: zero row, lse +inf (scores 0)
    if WITH_V:
        o = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
        tl.store(
            out_ptr + (bh.to(tl.int64) * SQ + offs_m[:, None]) * D + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=m_ok[:, None] & d_ok[None, :],
        )
    if WRITE_LSE:
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
        tl.store(lse_ptr + bh.to(tl.int64) * SQ + offs_m, lse, mask=m_ok)


@triton.jit
def _key_scores_kernel(
    q_ptr,  # (B, H, Sq, D)
    k_ptr,  # (B, H, Sk, D)
    keep_ptr,  # (B*H, KEPT) int64, unused unless GATHER
    lse_ptr,  # (B*H, Sq) fp32 base-2 log-sum-exp per query
    out_ptr,  # (B*H, KEPT) fp32
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    H, SQ, SK, KEPT, D,
    qk_scale, inv_sq,
    CAUSAL: tl.constexpr, GATHER: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: batch * stride_b (and a row * stride_s of big or strided inputs) passes 2**31.
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < KEPT
    d_ok = offs_d < D
    if GATHER:
        idx = tl.load(keep_ptr + bh.to(tl.int64) * KEPT + offs_n, mask=n_ok, other=0)
    else:
        idx = offs_n.to(tl.int64)
    k = tl.load(
        k_ptr + b * stride_kb + h * stride_kh + idx[:, None] * stride_ks + offs_d[None, :],
        mask=n_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    col = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, SQ, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < SQ
        q = tl.load(
            q_ptr + b * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qs + offs_d[None, :],
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        lse = tl.load(lse_ptr + bh.to(tl.int64) * SQ + offs_m, mask=m_ok, other=float("inf"))
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        ok = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            ok = ok & (idx[None, :] <= (offs_m + (SK - SQ))[:, None])
        col += tl.sum(tl.where(ok, tl.exp2(s - lse[:, None]), 0.0), 0)
    tl.store(out_ptr + bh.to(tl.int64) * KEPT + offs_n, col * inv_sq, mask=n_ok)


def _config(d: int, dtype: torch.dtype, cc: int) -> dict:
    """Tiles and launch shape for head dim ``d`` on ``sm_<cc>``: BLOCK_*, num_warps, num_stages.

    tl.dot needs every dimension >= 16. NOTE: the gathered K/V tiles carry one 64-bit address
    per element, which is what fills the registers. AOT with 4 warps and 64x64 tiles spilled
    ~1 KB at D=128 bf16 and 640 B at D=64 fp32 (tf32x3 splits each operand in two); 8 warps with
    BLOCK_N=32 compile clean on sm_90 (228 / 216 registers) but still spilled 12 B at D=128 on
    sm_80, where BLOCK_M=32 (no warpgroup MMA to feed there) removes it.
    """
    block_d = max(16, triton.next_power_of_2(d))
    if block_d >= 128 or dtype == torch.float32:
        block_m = 32 if cc < 90 and block_d >= 128 else 64
        return dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_D=block_d, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, num_warps=4, num_stages=2)


def _cc(t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        return 90  # interpreter: any config runs
    major, minor = torch.cuda.get_device_capability(t.device)
    return major * 10 + minor


def _fwd(q, k, v, keep_idx, causal, scale, with_v, write_lse):
    b, h, sq, d = q.shape
    sk = k.shape[2]
    kept = keep_idx.shape[2] if keep_idx is not None else sk
    cfg = _config(d, q.dtype, _cc(q))
    out = new_output((b, h, sq, d), q) if with_v else q.new_empty(1)
    lse = torch.empty((b * h, sq), device=q.device, dtype=torch.float32) if write_lse else q.new_empty(1)
    keep = keep_idx.contiguous() if keep_idx is not None else q.new_empty(1, dtype=torch.int64)
    vv = v if with_v else k
    _attn_fwd_kernel[(triton.cdiv(sq, cfg["BLOCK_M"]), b * h)](
        q, k, vv, keep, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        vv.stride(0), vv.stride(1), vv.stride(2),
        h, sq, sk, kept, d, scale * LOG2E,
        CAUSAL=causal, GATHER=keep_idx is not None, WITH_V=with_v, WRITE_LSE=write_lse,
        DOT_PRECISION=dot_precision(q.dtype), **cfg,
    )  # fmt: skip
    return out, lse


def _key_scores(q, k, keep_idx, lse, causal, scale):
    b, h, sq, d = q.shape
    sk = k.shape[2]
    kept = keep_idx.shape[2] if keep_idx is not None else sk
    cfg = _config(d, q.dtype, _cc(q))
    out = new_output((b, h, kept), q, dtype=torch.float32)
    keep = keep_idx.contiguous() if keep_idx is not None else q.new_empty(1, dtype=torch.int64)
    _key_scores_kernel[(triton.cdiv(kept, cfg["BLOCK_N"]), b * h)](
        q, k, keep, lse, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        h, sq, sk, kept, d, scale * LOG2E, 1.0 / sq,
        CAUSAL=causal, GATHER=keep_idx is not None, DOT_PRECISION=dot_precision(q.dtype), **cfg,
    )  # fmt: skip
    return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def pruned_attention(q, k, v, keep_idx, causal=False, scale=None):
    q, k, v = _rows(q), _rows(k), _rows(v)
    return _fwd(q, k, v, keep_idx, causal, _scale(q, scale), True, False)[0]


def pruned_attention_with_scores(q, k, v, keep_idx, causal=False, scale=None):
    q, k, v = _rows(q), _rows(k), _rows(v)
    sc = _scale(q, scale)
    out, lse = _fwd(q, k, v, keep_idx, causal, sc, True, True)
    return out, _key_scores(q, k, keep_idx, lse, causal, sc)


def token_scores(q, k, causal=False, scale=None, cls_only=False):
    q, k = _rows(q), _rows(k)
    if cls_only:
        q, causal = q[:, :, :1], False
    sc = _scale(q, scale)
    _, lse = _fwd(q, k, None, None, causal, sc, False, True)
    return _key_scores(q, k, None, lse, causal, sc)
