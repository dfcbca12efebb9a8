"""Triton kernel for ``bsr_linear``: ``y = x @ W.T + bias`` with W block-sparse (BSR).

One program owns one block row of W (``bm`` outputs) and ``BLOCK_M`` rows of x, and walks only
that block row's stored blocks (``crow[r]:crow[r+1]``): per block it loads the x columns the
block covers and the ``bm x bk`` block, and accumulates ``x_tile @ block.T`` with ``tl.dot`` in
fp32 (tensor cores: ``mma`` on sm_80, ``wgmma`` on sm_90 when ``BLOCK_M >= 64``). Block sides
that are not powers of two (8..128, e.g. 48) are padded to the next power of two (at least 16,
the smallest ``tl.dot`` tile) and masked.

Decode uses the same kernel with ``BLOCK_M = 16``; a block row's blocks are then split across
programs (split-K) when there are too few block rows to fill the GPU.

Quantized blocks (``formats/bsr.py``: int8, or int4 two per byte with column 2j in the low
nibble; ``scales`` / ``zeros`` per run of ``GROUP`` columns of a stored block row) are read as
stored. Two routes (:func:`scales_after_dot` picks one; ``QBITS`` (0 / 8 / 4), ``HAS_ZEROS`` and
the route are constexprs, so float blocks compile as before):
  - one scale per block row: the integers ``q - zero`` go to ``tl.dot`` in x's dtype (exact) and
    the fp32 row scale multiplies the partial product: no rounding of the weight, so the result
    is closer to the exact product than the reference op's (weight rounded to the scales' dtype);
  - several: the block is dequantized in registers, ``(q - zero) * scale`` in fp32 by
    ``nm_linear``'s :func:`_kept_values` (one definition of the nibble order and zero points),
    then rounded to x's dtype for ``tl.dot`` as the reference rounds it.
Measured on an H200 (bench/results/gpu-h200-2026-11-27-quant.md): the first route ran 1.2-2.2x
faster than the second at 64x64 blocks, about the float blocks' time at decode.

Index safety: blocks are visited only up to ``nnz`` whatever ``crow`` holds, and x columns are
masked to ``0..K-1`` whatever ``col`` holds, so corrupt indices give wrong numbers, never a fault.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekern.formats.bsr import block_width
from sparsekern.kernels._common import (
    Fixed,
    autotune,
    dot_precision,
    rows_bucket,
    splitk_reduce,
    splits_for,
    store_tile,
)
from sparsekern.kernels.nm_linear import _kept_values
from sparsekern.kernels.nonfinite import bsr_nonfinite_
from sparsekern.ops import new_output

# Shared memory per pipeline stage is kept under this so every config fits sm_80's 164 KB and
# sm_90's 228 KB with room for the layout conversions Triton adds.
_SMEM_BUDGET = 96 * 1024


def padded(side: int) -> int:
    """Tile side for a block side: next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(side))


def scales_after_dot(qbits: int, group: int, bk: int) -> bool:
    """Whether quantized blocks go to ``tl.dot`` as integers, scaled after it: one scale per
    stored block row (``group == bk``), int8, or int4 with a padded width of at least 32. Else
    each block is dequantized in registers first. On the H200 (Triton 3.6) the integer route ran
    int8 / int4 blocks 1.2-2.2x faster; int4 blocks 16 wide came out wrong there (8 bytes a row
    through ``tl.interleave``), so they stay on the dequantized route."""
    return qbits != 0 and group == bk and (qbits == 8 or padded(bk) >= 32)


def bsr_configs(rows_bucket: int, bm: int, bk: int, elem_bytes: int) -> list[triton.Config]:
    """Configs for :func:`_bsr_kernel`; BLOCK_N/BLOCK_K are fixed by the block shape."""
    bn_p, bk_p = padded(bm), padded(bk)
    if rows_bucket <= 16:
        shapes = [(16, 4)]
    elif rows_bucket <= 64:
        shapes = [(64, 4), (32, 4)]
    else:
        shapes = [(128, 8 if bn_p >= 64 else 4), (64, 4)]
    configs = []
    for block_m, warps in shapes:
        stage = (block_m + bn_p) * bk_p * elem_bytes
        stages = max(2, min(4, _SMEM_BUDGET // stage))
        configs.append(
            triton.Config({"BLOCK_M": block_m, "BLOCK_N": bn_p, "BLOCK_K": bk_p}, num_warps=warps, num_stages=stages)
        )
    return configs


@triton.jit
def _block_tile(
    blocks_ptr,  # (nnz, BM, BK); int8 (nnz, BM, BK) / uint8 (nnz, BM, BK/2) when QBITS
    scales_ptr,  # (nnz, BM, BK/GROUP) when QBITS, else unused
    zeros_ptr,  # (nnz, BM, BK/GROUP) int8 when HAS_ZEROS, else unused
    b,  # int64 block index
    offs_i,
    offs_t,
    w_mask,
    dtype: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    GROUP: tl.constexpr,
    QBITS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
):
    """Block ``b`` as a ``(BLOCK_N, BLOCK_K)`` tile: floats as stored (zero in the padding), or
    the quantized block dequantized in fp32 and rounded once to ``dtype``."""
    if QBITS == 0:
        blk_ptr = blocks_ptr + b * (BM * BK)
        return tl.load(blk_ptr + offs_i[:, None] * BK + offs_t[None, :], mask=w_mask, other=0.0)
    ROW: tl.constexpr = BK if QBITS == 8 else BK // 2  # bytes per stored block row
    GROUPS: tl.constexpr = BK // GROUP
    v_rows = blocks_ptr + b * (BM * ROW) + offs_i * ROW
    s_rows = scales_ptr + b * (BM * GROUPS) + offs_i * GROUPS
    z_rows = zeros_ptr + b * (BM * GROUPS) + offs_i * GROUPS
    return _kept_values(v_rows, s_rows, z_rows, offs_t, w_mask, GROUP, QBITS, HAS_ZEROS).to(dtype)


@triton.jit
def _block_ints(
    blocks_ptr,  # int8 (nnz, BM, BK) / uint8 (nnz, BM, BK/2)
    scales_ptr,  # (nnz, BM, 1): one scale per stored block row
    zeros_ptr,  # (nnz, BM, 1) int8 when HAS_ZEROS, else unused
    b,  # int64 block index
    offs_i,
    offs_t,
    i_mask,
    w_mask,
    dtype: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    QBITS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """A block with one scale per row as ``(q - zero)`` in ``dtype`` (small integers: exact in
    fp16 / bf16) and its fp32 row scales: the product is scaled after ``tl.dot``. Loads run along
    the stored bytes (int4: one byte for two columns, split by ``tl.interleave``)."""
    scale = tl.load(scales_ptr + b * BM + offs_i, mask=i_mask, other=0.0).to(tl.float32)
    if QBITS == 8:
        q = tl.load(blocks_ptr + b * (BM * BK) + offs_i[:, None] * BK + offs_t[None, :], mask=w_mask, other=0)
        q = q.to(tl.int32)
    else:
        HALF: tl.constexpr = BLOCK_K // 2
        offs_h = tl.arange(0, HALF)
        h_mask = i_mask[:, None] & (offs_h < BK // 2)[None, :]
        byte = tl.load(blocks_ptr + b * (BM * (BK // 2)) + offs_i[:, None] * (BK // 2) + offs_h[None, :],
                       mask=h_mask, other=0).to(tl.int32)  # fmt: skip
        q = tl.interleave(byte & 15, byte >> 4)  # column 2j: low nibble
    if HAS_ZEROS:
        q = q - tl.load(zeros_ptr + b * BM + offs_i, mask=i_mask, other=0).to(tl.int32)[:, None]
    elif QBITS == 4:
        q = q - 8
    return q.to(dtype), scale


@triton.jit
def bsr_tile_product_quant(
    x_rows,  # (BLOCK_M,) pointers to the x rows
    m_mask,
    crow_row,  # pointer to the block row's crow entry (begin; end next to it)
    col_ptr,  # (nnz,) int32
    blocks_ptr,  # (nnz, BM, BK); int8 (nnz, BM, BK) / uint8 (nnz, BM, BK/2) when QBITS
    scales_ptr,  # (nnz, BM, BK/GROUP) when QBITS, else unused
    zeros_ptr,  # (nnz, BM, BK/GROUP) int8 when HAS_ZEROS, else unused
    nnz,
    K,
    pid_s,
    n_splits,
    BM: tl.constexpr,
    BK: tl.constexpr,
    GROUP: tl.constexpr,  # columns per scale (QBITS)
    QBITS: tl.constexpr,  # 0 (float blocks), 8 or 4
    HAS_ZEROS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INT_DOT: tl.constexpr,  # scales_after_dot(QBITS, GROUP, BK)
):
    """fp32 ``(BLOCK_M, BLOCK_N)``: the x rows times the block row's stored blocks (this split's
    share: every ``n_splits``-th block from ``pid_s``), transposed; quantized blocks dequantized."""
    offs_i = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_K)
    i_mask = offs_i < BM
    t_mask = offs_t < BK
    w_mask = i_mask[:, None] & t_mask[None, :]
    # int64 block index: b * BM * BK passes 2**31 on large weights.
    lo = tl.maximum(tl.load(crow_row).to(tl.int64), 0)
    hi = tl.minimum(tl.load(crow_row + 1).to(tl.int64), nnz)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for b in range(lo + pid_s, hi, n_splits):
        cols = tl.load(col_ptr + b) * BK + offs_t
        x_mask = m_mask[:, None] & (t_mask & (cols >= 0) & (cols < K))[None, :]
        x = tl.load(x_rows[:, None] + cols[None, :], mask=x_mask, other=0.0)
        if INT_DOT:
            q, scale = _block_ints(blocks_ptr, scales_ptr, zeros_ptr, b, offs_i, offs_t, i_mask, w_mask, x.dtype,
                                   BM, BK, QBITS, HAS_ZEROS, BLOCK_K)  # fmt: skip
            acc += tl.dot(x, tl.trans(q), input_precision=DOT_PRECISION) * scale[None, :]
        else:
            blk = _block_tile(blocks_ptr, scales_ptr, zeros_ptr, b, offs_i, offs_t, w_mask, x.dtype,
                              BM, BK, GROUP, QBITS, HAS_ZEROS)  # fmt: skip
            acc = tl.dot(x, tl.trans(blk), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def bsr_tile_product(
    x_rows,  # (BLOCK_M,) pointers to the x rows
    m_mask,
    crow_row,  # pointer to the block row's crow entry (begin; end next to it)
    col_ptr,  # (nnz,) int32
    blocks_ptr,  # (nnz, BM, BK) float
    nnz,
    K,
    pid_s,
    n_splits,
    BM: tl.constexpr,
    BK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """:func:`bsr_tile_product_quant` for float blocks: the grouped (MoE) kernel's product."""
    return bsr_tile_product_quant(x_rows, m_mask, crow_row, col_ptr, blocks_ptr, blocks_ptr, blocks_ptr, nnz, K,
                                  pid_s, n_splits, BM, BK, BK, 0, False, DOT_PRECISION,
                                  BLOCK_M, BLOCK_N, BLOCK_K, False)  # fmt: skip


@triton.jit
def _bsr_kernel(
    x_ptr,  # (rows, K)
    crow_ptr,  # (out/bm + 1,) int32
    col_ptr,  # (nnz,) int32
    blocks_ptr,  # (nnz, bm, bk); int8 (nnz, bm, bk) / uint8 (nnz, bm, bk/2) when QBITS
    bias_ptr,  # (out,) or unused
    y_ptr,  # (rows, out) dtype of x; fp32 (n_splits, rows, out) when PARTIAL
    scales_ptr,  # (nnz, bm, bk/GROUP) dtype of x when QBITS, else unused
    zeros_ptr,  # (nnz, bm, bk/GROUP) int8 when HAS_ZEROS, else unused
    rows,
    out_features,
    K,
    nnz,
    stride_xr,
    stride_ys,  # split stride of y (0 unless PARTIAL)
    n_splits,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    BM: tl.constexpr,  # block height
    BK: tl.constexpr,  # block width
    GROUP: tl.constexpr,  # columns per scale (QBITS)
    QBITS: tl.constexpr,  # 0 (float blocks), 8 or 4
    HAS_ZEROS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INT_DOT: tl.constexpr,  # scales_after_dot(QBITS, GROUP, BK)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # padded(BM)
    BLOCK_K: tl.constexpr,  # padded(BK)
):
    rb = tl.program_id(0)  # block row: neighbours share x rows in L2
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < rows
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xr  # 64-bit: rows * stride passes 2**31
    acc = bsr_tile_product_quant(x_rows, m_mask, crow_ptr + rb, col_ptr, blocks_ptr, scales_ptr, zeros_ptr, nnz, K,
                                 pid_s, n_splits, BM, BK, GROUP, QBITS, HAS_ZEROS, DOT_PRECISION,
                                 BLOCK_M, BLOCK_N, BLOCK_K, INT_DOT)  # fmt: skip
    offs_i = tl.arange(0, BLOCK_N)
    offs_n = rb * BM + offs_i
    n_mask = (offs_i < BM) & (offs_n < out_features)
    store_tile(acc, y_ptr, bias_ptr, offs_m, m_mask, offs_n, n_mask, out_features, pid_s, stride_ys, HAS_BIAS, PARTIAL)


# -- wrapper: check shapes, allocate, launch ---------------------------------------------------

_tuned: dict[tuple, object] = {}


def _tuner(bucket: int, bm: int, bk: int, elem_bytes: int, qbits: int):
    # qbits in the key: quantized and float blocks of one shape keep separate tuning choices.
    key = (bucket, bm, bk, elem_bytes, qbits)
    if key not in _tuned:
        configs = bsr_configs(bucket, bm, bk, elem_bytes)
        _tuned[key] = autotune(_bsr_kernel, configs, ["out_features", "K", "nnz", "n_splits"])
    return _tuned[key]


def bsr_linear(
    x: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    blocks: torch.Tensor,
    bias=None,
    scales=None,
    zeros=None,
    config=None,
):
    """``x [rows, K] @ W.T + bias`` for arguments already checked by ``ops.check_bsr_linear``.

    Quantized blocks (``scales`` given; ``zeros`` or None) are dequantized in the kernel.
    ``config`` pins one config of :func:`bsr_configs` instead of autotuning (tests, benchmarks).
    """
    rows, k = x.shape
    nnz, bm, bk = blocks.shape[0], blocks.shape[1], block_width(blocks)
    qbits = 0 if scales is None else 4 if blocks.dtype == torch.uint8 else 8
    block_rows = crow.numel() - 1
    out_features = block_rows * bm
    if x.stride(-1) != 1:
        x = x.contiguous()
    crow, col, blocks = crow.contiguous(), col.contiguous(), blocks.contiguous()
    scales = scales.contiguous() if scales is not None else None
    zeros = zeros.contiguous() if zeros is not None else None
    y = new_output((rows, out_features), x)
    if rows == 0 or out_features == 0:
        return y
    bucket = min(rows_bucket(rows), 4096)
    row_tile = 16 if bucket <= 16 else 64
    programs = block_rows * triton.cdiv(rows, row_tile)
    n_splits = splits_for(programs, triton.cdiv(nnz, max(block_rows, 1)), x.device)
    partial = n_splits > 1
    dst = torch.empty((n_splits, rows, out_features), dtype=torch.float32, device=x.device) if partial else y
    grid = lambda meta_: (block_rows, triton.cdiv(rows, meta_["BLOCK_M"]), n_splits)  # noqa: E731
    group = bk // scales.shape[2] if qbits else bk
    launcher = Fixed(_bsr_kernel, config) if config is not None else _tuner(bucket, bm, bk, x.element_size(), qbits)
    launcher[grid](
        x, crow, col, blocks, bias if bias is not None else x, dst,
        scales if scales is not None else x, zeros if zeros is not None else x,
        rows, out_features, k, nnz, x.stride(0), rows * out_features if partial else 0, n_splits,
        HAS_BIAS=bias is not None, PARTIAL=partial, BM=bm, BK=bk,
        GROUP=group, QBITS=qbits, HAS_ZEROS=zeros is not None,
        DOT_PRECISION=dot_precision(x.dtype), INT_DOT=scales_after_dot(qbits, group, bk),
    )  # fmt: skip
    y = splitk_reduce(dst, bias, y) if partial else y
    return bsr_nonfinite_(x, crow, col, (bm, bk), y)  # NaN/Inf in x as in the dense op
