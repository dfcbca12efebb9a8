"""Pure-torch ground truth of every sparsekern op.

Each function is the definition of its op: decompress, then the dense computation. Every
backend is tested against these, and they run wherever nothing faster is available. They take
the raw tensors of the op schemas (see ``sparsekern/ops.py``), already checked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparsekern.formats.bsr import bsr_to_dense, dequantize_blocks
from sparsekern.formats.nm import nm_to_dense
from sparsekern.formats.quant import dequantize


def nm_linear(x, values, meta, n: int, m: int, bias=None, scales=None, zeros=None, group_size=0, act_block=0):
    """``x @ W.T + bias`` for the N:M weight ``W`` held as ``values``/``meta``; quantized values
    are dequantized first (``(q - zero) * scale`` per group, in the dtype of ``scales``). With
    ``act_block``, x is first rounded to int8 per block (:func:`quantize_x`) and the product is
    taken in fp32, then cast to x's dtype."""
    if not act_block:
        kept = values if scales is None else dequantize(values, scales, zeros)
        return F.linear(x, nm_to_dense(kept, meta, n, m), bias)
    w = nm_to_dense(dequantize(values, scales.float(), zeros), meta, n, m)  # fp32, as the kernels
    return linear_a8(x, w, bias, act_block)


def nm_grouped_linear(x, values, meta, offsets, n: int, m: int):
    """One N:M linear per expert: rows ``offsets[e]:offsets[e+1]`` of ``x [T, K]`` times
    ``W_e.T``, ``W_e`` held as ``values[e]``/``meta[e]``; ``[T, out]`` in x's dtype."""
    bounds = offsets.tolist()
    parts = [x.new_empty((0, values.shape[1]))]
    for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi > lo:
            parts.append(F.linear(x[lo:hi], nm_to_dense(values[e], meta[e], n, m)))
    return torch.cat(parts)


def bsr_grouped_linear(x, crow, col, blocks, offsets):
    """One block-sparse linear per expert: rows ``offsets[e]:offsets[e+1]`` of ``x [T, K]`` times
    ``W_e.T``, ``W_e`` the blocks ``crow[e, 0]:crow[e, -1]`` (global indices, ``stack_bsr``)."""
    bounds = offsets.tolist()
    parts = [x.new_empty((0, (crow.shape[1] - 1) * blocks.shape[1]))]
    for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi > lo:
            b0, b1 = int(crow[e, 0]), int(crow[e, -1])
            w = bsr_to_dense(crow[e] - b0, col[b0:b1], blocks[b0:b1], x.shape[1])
            parts.append(F.linear(x[lo:hi], w))
    return torch.cat(parts)


def linear_a8(x, w32, bias, act_block: int):
    """The int8-activation product: x rounded by :func:`quantize_x`, times the fp32 dense weight
    ``w32``, plus bias, in fp32; the result in x's dtype."""
    return F.linear(quantize_x(x, act_block), w32, None if bias is None else bias.float()).to(x.dtype)


def quant_linear(x, values, scales, bias=None, act_block: int = 32):
    """``x @ (values * scales).T + bias`` for a dense int8 weight (one scale per output row), x
    rounded by :func:`quantize_x` first; fp32 product, the result in x's dtype."""
    return linear_a8(x, values.float() * scales.float()[:, None], bias, act_block)


def quantize_x(x, block: int):
    """x rounded to int8 per ``block`` columns and back, in fp32: scale = max |x| / 127 per block
    (1 for an all-zero block), ``round(x / scale)`` to nearest even, times the scale."""
    xs = x.float().reshape(*x.shape[:-1], -1, block)
    amax = xs.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return (torch.round(xs / scale).clamp(-127, 127) * scale).reshape(x.shape)


def bsr_linear(x, crow, col, blocks, bias=None, scales=None, zeros=None):
    """``x @ W.T + bias`` for the block-sparse weight ``W`` (K is ``x.shape[-1]``); quantized
    blocks are dequantized first (``(q - zero) * scale`` per group, in the dtype of ``scales``)."""
    w = blocks if scales is None else dequantize_blocks(blocks, scales, zeros)
    return F.linear(x, bsr_to_dense(crow, col, w, x.shape[-1]), bias)


def _scores_logits(q, k, causal: bool, scale):
    """fp32 logits ``[B, H, Sq, Sk]`` with the causal mask applied as -inf."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        sq, sk = q.shape[-2], k.shape[-2]
        qpos = torch.arange(sq, device=q.device).unsqueeze(-1) + (sk - sq)
        kpos = torch.arange(sk, device=q.device)
        logits = logits.masked_fill(kpos > qpos, float("-inf"))
    return logits


def token_scores(q, k, causal: bool = False, scale=None, cls_only: bool = False):
    """Attention mass each key receives: softmax over keys, averaged over queries.

    ``q [B, H, Sq, D]``, ``k [B, H, Sk, D]`` -> fp32 ``[B, H, Sk]``. With ``cls_only`` only the
    first query (the CLS token) counts. Causal positions follow ``pruned_attention``.
    """
    if cls_only:
        q = q[:, :, :1]
        causal = False
    logits = _scores_logits(q, k, causal, scale)
    probs = torch.softmax(logits, dim=-1)
    if causal:  # with Sq > Sk the first queries see no key: they contribute zeros, as in pruned_attention
        probs = probs.masked_fill(torch.isneginf(logits).all(-1, keepdim=True), 0.0)
    return probs.mean(dim=-2)


def pruned_attention(q, k, v, keep_idx, causal: bool = False, scale=None, _with_scores: bool = False):
    """Attention of every query over only the kept keys/values.

    ``q [B, H, Sq, D]``, ``k``/``v [B, H, Sk, D]``, ``keep_idx int64 [B, H, kept]`` (original key
    positions). With ``causal``, query i (absolute position Sk-Sq+i) sees kept key j only if
    j <= Sk-Sq+i; a query that sees no kept key gets a zero output row.
    """
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    idx = keep_idx.unsqueeze(-1).expand(-1, -1, -1, d)
    kk = torch.gather(k, 2, idx).float()
    vv = torch.gather(v, 2, idx).float()
    logits = torch.matmul(q.float(), kk.transpose(-1, -2)) * scale
    probs_mask = None
    if causal:
        sq, sk = q.shape[-2], k.shape[-2]
        qpos = torch.arange(sq, device=q.device).view(1, 1, sq, 1) + (sk - sq)
        hidden = keep_idx.unsqueeze(-2) > qpos
        logits = logits.masked_fill(hidden, float("-inf"))
        probs_mask = hidden.all(-1, keepdim=True)  # rows that see no kept key
    probs = torch.softmax(logits, dim=-1)
    if probs_mask is not None:
        probs = probs.masked_fill(probs_mask, 0.0)
    out = torch.matmul(probs, vv).to(q.dtype)
    return (out, probs.mean(dim=-2)) if _with_scores else out


def pruned_attention_with_scores(q, k, v, keep_idx, causal: bool = False, scale=None):
    """``pruned_attention`` plus fp32 ``[B, H, kept]``: each kept key's probability averaged over
    queries (a query that sees no kept key counts as zeros)."""
    return pruned_attention(q, k, v, keep_idx, causal, scale, _with_scores=True)
