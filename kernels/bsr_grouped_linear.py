"""Triton kernel for ``bsr_grouped_linear``: one block-sparse linear per expert (mixture of experts).

The grouped form of ``bsr_linear``'s kernel, laid out as ``nm_grouped_linear``'s: the rows of x
are sorted by expert and the host cuts every expert's rows into blocks of ``BLOCK_M``
(:func:`block_schedule`, from the CPU ``offsets``), so each row block belongs to one expert;
experts without rows get no block. The grid is (block row of W, row block, K split); a program
reads its row block's expert and row range and runs ``bsr_linear``'s product
(:func:`bsr_tile_product`) over that expert's stored blocks of its block row: ``crow`` holds
global indices into the shared ``col`` / ``blocks`` (``formats.bsr.stack_bsr``), so expert e's
block row r is ``crow[e, r]:crow[e, r+1]``. Split-K when the programs cannot fill the GPU, as at
decode, where 1-2 rows hit each of top-k experts.

Index safety as ``bsr_linear``: blocks are visited only up to ``nnz`` and x columns are masked
to ``0..K-1`` whatever ``crow`` / ``col`` hold.

NOTE: unmeasured (no GPU yet); decode pays a 16-row tile for 1-2 rows, as the N:M grouped kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekern.kernels._common import Fixed, autotune, dot_precision, splitk_reduce, splits_for, store_tile
from sparsekern.kernels.bsr_linear import bsr_configs, bsr_tile_product
from sparsekern.kernels.nm_grouped_linear import block_m_for, block_schedule
from sparsekern.kernels.nonfinite import bsr_nonfinite_
from sparsekern.ops import new_output


def grouped_bsr_configs(block_m: int, bm: int, bk: int, elem_bytes: int) -> list[triton.Config]:
    """``bsr_linear``'s config for a row tile of ``block_m`` (fixed here by the host's schedule)."""
    return [c for c in bsr_configs(block_m, bm, bk, elem_bytes) if c.kwargs["BLOCK_M"] == block_m]


@triton.jit
def _bsr_grouped_kernel(
    x_ptr,  # (T, K), rows sorted by expert
    crow_ptr,  # (E, out/bm + 1) int32, global indices into col / blocks
    col_ptr,  # (nnz,) int32
    blocks_ptr,  # (nnz, BM, BK)
    sched_ptr,  # (3, blocks) int32: expert, first row, end row of each row block
    y_ptr,  # (T, out) dtype of x; fp32 (n_splits, T, out) when PARTIAL
    n_blocks,
    out_features,
    K,
    nnz,
    stride_xr,
    stride_ce,  # expert stride of crow
    stride_ys,  # split stride of y (0 unless PARTIAL)
    n_splits,
    PARTIAL: tl.constexpr,
    BM: tl.constexpr,  # block height
    BK: tl.constexpr,  # block width
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # padded(BM)
    BLOCK_K: tl.constexpr,  # padded(BK)
):
    rb = tl.program_id(0)  # block row: neighbours share x rows in L2
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    expert = tl.load(sched_ptr + pid_m).to(tl.int64)
    row0 = tl.load(sched_ptr + n_blocks + pid_m)
    row_end = tl.load(sched_ptr + 2 * n_blocks + pid_m)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_end
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xr  # 64-bit: T * K passes 2**31 on large layers
    acc = bsr_tile_product(x_rows, m_mask, crow_ptr + expert * stride_ce + rb, col_ptr, blocks_ptr, nnz, K,
                           pid_s, n_splits, BM, BK, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    offs_i = tl.arange(0, BLOCK_N)
    offs_n = rb * BM + offs_i
    n_mask = (offs_i < BM) & (offs_n < out_features)
    store_tile(acc, y_ptr, y_ptr, offs_m, m_mask, offs_n, n_mask, out_features, pid_s, stride_ys, False, PARTIAL)


_tuned: dict[tuple, object] = {}


def _tuner(block_m: int, bm: int, bk: int, elem_bytes: int):
    key = (block_m, bm, bk, elem_bytes)
    if key not in _tuned:
        configs = grouped_bsr_configs(block_m, bm, bk, elem_bytes)
        _tuned[key] = autotune(_bsr_grouped_kernel, configs, ["out_features", "K", "nnz", "n_splits"])
    return _tuned[key]


def bsr_grouped_linear(x, crow, col, blocks, offsets, config=None) -> torch.Tensor:
    """``x [T, K]`` through expert e's BSR weight for rows ``offsets[e]:offsets[e+1]``, arguments
    already checked by ``ops_moe``. ``config`` pins one of :func:`grouped_bsr_configs` (tests)."""
    tokens, k = x.shape
    nnz, bm, bk = blocks.shape
    n_experts, block_rows = crow.shape[0], crow.shape[1] - 1
    out_features = block_rows * bm
    if x.stride(-1) != 1:
        x = x.contiguous()
    crow, col, blocks = crow.contiguous(), col.contiguous(), blocks.contiguous()
    y = new_output((tokens, out_features), x)
    if tokens == 0 or out_features == 0:
        return y
    if k == 0:
        return y.zero_()
    bounds = offsets.tolist()
    rows = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
    block_m = block_m_for(max(rows)) if config is None else config.kwargs["BLOCK_M"]
    sched = block_schedule(bounds, block_m, x.device)
    n_blocks = sched.shape[1]
    per_row = triton.cdiv(nnz, max(1, n_experts * block_rows))  # stored blocks per block row, on average
    n_splits = splits_for(n_blocks * block_rows, per_row, x.device)
    partial = n_splits > 1
    dst = torch.empty((n_splits, tokens, out_features), dtype=torch.float32, device=x.device) if partial else y
    grid = (block_rows, n_blocks, n_splits)
    launcher = Fixed(_bsr_grouped_kernel, config) if config is not None else _tuner(block_m, bm, bk, x.element_size())
    launcher[grid](
        x, crow, col, blocks, sched, dst, n_blocks, out_features, k, nnz,
        x.stride(0), crow.stride(0), tokens * out_features if partial else 0, n_splits,
        PARTIAL=partial, BM=bm, BK=bk, DOT_PRECISION=dot_precision(x.dtype),
    )  # fmt: skip
    if partial:
        splitk_reduce(dst, None, y)
    # NaN/Inf in x as in the dense op, per expert (kernels/nonfinite.py; no host sync): expert e's
    # crow row indexes the shared col directly.
    for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi > lo:
            bsr_nonfinite_(x[lo:hi], crow[e], col, (bm, bk), y[lo:hi])
    return y
