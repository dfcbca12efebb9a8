"""NaN/Inf in x after a sparse linear kernel, exactly as the dense op, without a host sync.

A sparse kernel skips pruned weights, but dense ``F.linear`` computes ``0 * inf = nan`` there: an
output ``y[r, o]`` is NaN in the dense op whenever row ``r`` of x holds a NaN/Inf at a column that
row ``o`` of W prunes (kept columns propagate by themselves, stored zeros included). These
kernels run after the GPU linears (Triton and CUDA) and write NaN at exactly those outputs.

One program per tile of x rows and chunk of about ``CHUNK_COLS`` columns (whole N:M groups /
BSR blocks). It first counts the non-finite x of its rows in its chunk (together the programs read
x once: the common, all-finite case costs that read and one launch, no sync). Only when a row holds
some does it walk the weight's indices in its chunk and count, per output, the non-finite x at kept
columns: fewer than in the chunk means one sits at a pruned column, and that output becomes NaN
(programs of other chunks may write the same NaN). That walk gathers like a scalar GEMM, which is
fine for inputs that are broken anyway.

Chunks, not one program per row tile: at decode one program read all of x alone, 4096-11008
columns in a dependent chain of loads, 7-18 us on an H200 (bench/gpu_sweep.py, 2026-11-27) where
the 64x64 90 % block kernel itself took 6-7 us. Fusing the count into the linear kernels would
also save the launch; this keeps the hot kernels and their register budgets untouched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekern.formats.nm import meta_bits, meta_per_word

BLOCK_M = 16  # x rows per program
BLOCK_K = 256  # columns per step of the count
BLOCK_N = 16  # outputs per step of the exact walk
BLOCK_J = 16  # kept slots per step of the exact walk
CHUNK_COLS = 256  # columns per program, rounded to whole groups / blocks (tests lower it)


@triton.jit
def _nonfinite(v):
    """int32 1 where ``v`` is NaN or +-Inf."""
    v = v.to(tl.float32)
    return ((v != v) | (tl.abs(v) == float("inf"))).to(tl.int32)


@triton.jit
def _row_counts(x_rows, m_mask, k_lo, k_hi, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Non-finite elements of each row in columns ``[k_lo, k_hi)``, ``int32 [BLOCK_M]``."""
    tot = tl.zeros((BLOCK_M,), tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_rows[:, None] + offs_k[None, :], mask=m_mask[:, None] & (offs_k < k_hi)[None, :], other=0.0)
        tot += tl.sum(_nonfinite(xv), 1)
    return tot


@triton.jit
def _nm_nonfinite_kernel(
    x_ptr, meta_ptr, y_ptr,
    rows, out_features, K, kept, chunk,
    stride_xr, stride_mr, stride_yr,
    N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, PER_WORD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < rows
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xr
    k_lo = tl.program_id(1) * chunk  # chunk: whole groups of M columns
    k_hi = tl.minimum(k_lo + chunk, K)
    tot = _row_counts(x_rows, m_mask, k_lo, k_hi, BLOCK_M, BLOCK_K)
    if tl.max(tot, 0) > 0:
        j_lo = k_lo // M * N  # the kept slots of this chunk's groups
        j_hi = tl.minimum(tl.cdiv(k_hi, M) * N, kept)
        y_rows = y_ptr + offs_m.to(tl.int64) * stride_yr
        for n0 in range(0, out_features, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < out_features
            m_rows = meta_ptr + offs_n.to(tl.int64) * stride_mr
            hit = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
            for j0 in range(j_lo, j_hi, BLOCK_J):
                offs_j = j0 + tl.arange(0, BLOCK_J)
                w_mask = n_mask[:, None] & (offs_j < j_hi)[None, :]
                word = tl.load(m_rows[:, None] + (offs_j // PER_WORD)[None, :], mask=w_mask, other=0)
                idx = (word >> ((offs_j % PER_WORD) * BITS)[None, :]) & (M - 1)
                col = (offs_j // N * M)[None, :] + idx
                x_mask = m_mask[:, None, None] & w_mask[None, :, :]
                xg = tl.load(x_rows[:, None, None] + col[None, :, :], mask=x_mask, other=0.0)
                hit += tl.sum(_nonfinite(xg), 2)
            bad = m_mask[:, None] & n_mask[None, :] & (tot[:, None] > hit)
            tl.store(y_rows[:, None] + offs_n[None, :], tl.full((BLOCK_M, BLOCK_N), float("nan"), tl.float32), mask=bad)


@triton.jit
def _bsr_nonfinite_kernel(
    x_ptr, crow_ptr, col_ptr, y_ptr,
    rows, block_rows, K, nnz, chunk,
    stride_xr, stride_yr,
    BM: tl.constexpr, BK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < rows
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xr
    k_lo = tl.program_id(1) * chunk  # chunk: whole blocks of BK columns
    k_hi = tl.minimum(k_lo + chunk, K)
    tot = _row_counts(x_rows, m_mask, k_lo, k_hi, BLOCK_M, BLOCK_K)
    if tl.max(tot, 0) > 0:
        c_lo = k_lo // BK  # the block columns of this chunk
        c_hi = tl.cdiv(k_hi, BK)
        y_rows = y_ptr + offs_m.to(tl.int64) * stride_yr
        offs_i = tl.arange(0, BLOCK_I)
        offs_t = tl.arange(0, BLOCK_T)
        for rb in range(0, block_rows):
            # Columns a block row stores are kept for all its BM outputs alike; indices are
            # bounded as in _bsr_kernel (corrupt ones give wrong numbers, never a fault).
            lo = tl.maximum(tl.load(crow_ptr + rb), 0)
            hi = tl.minimum(tl.load(crow_ptr + rb + 1), nnz)
            hit = tl.zeros((BLOCK_M,), tl.int32)
            for b in range(lo, hi):
                c = tl.load(col_ptr + b)
                c = tl.where((c >= c_lo) & (c < c_hi), c, -1)  # another chunk's block: all masked
                cols = c * BK + offs_t
                c_ok = (offs_t < BK) & (cols >= 0) & (cols < K)
                xv = tl.load(x_rows[:, None] + cols[None, :], mask=m_mask[:, None] & c_ok[None, :], other=0.0)
                hit += tl.sum(_nonfinite(xv), 1)
            bad = (m_mask & (tot > hit))[:, None] & (offs_i < BM)[None, :]
            nan = tl.full((BLOCK_M, BLOCK_I), float("nan"), tl.float32)
            tl.store(y_rows[:, None] + (rb * BM + offs_i)[None, :], nan, mask=bad)


def _chunk(unit: int, k: int) -> int:
    """Columns per program: whole ``unit``s (N:M groups, BSR blocks), about CHUNK_COLS, at most k."""
    return min(unit * max(1, CHUNK_COLS // unit), max(k, 1))


def _rows_ok(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def nm_nonfinite_(x: torch.Tensor, meta: torch.Tensor, n: int, m: int, y: torch.Tensor) -> torch.Tensor:
    """Write NaN into ``y [rows, out]`` (row stride free, unit column stride) where dense would."""
    rows, k = x.shape
    if rows == 0 or y.shape[1] == 0 or k == 0:
        return y
    x, meta = _rows_ok(x), meta.contiguous()
    chunk = _chunk(m, k)
    _nm_nonfinite_kernel[(triton.cdiv(rows, BLOCK_M), triton.cdiv(k, chunk))](
        x, meta, y, rows, y.shape[1], k, k // m * n, chunk, x.stride(0), meta.stride(0), y.stride(0),
        N=n, M=m, BITS=meta_bits(m), PER_WORD=meta_per_word(m),
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N, BLOCK_J=BLOCK_J,
    )  # fmt: skip
    return y


def bsr_nonfinite_(
    x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, block: tuple[int, int], y: torch.Tensor
) -> torch.Tensor:
    """Write NaN into ``y [rows, out]`` where dense ``F.linear`` on the BSR weight would."""
    rows, k = x.shape
    bm, bk = block
    if rows == 0 or y.shape[1] == 0 or k == 0:
        return y
    x, crow, col = _rows_ok(x), crow.contiguous(), col.contiguous()
    chunk = _chunk(bk, k)
    _bsr_nonfinite_kernel[(triton.cdiv(rows, BLOCK_M), triton.cdiv(k, chunk))](
        x, crow, col, y, rows, crow.numel() - 1, k, col.numel(), chunk, x.stride(0), y.stride(0),
        BM=bm, BK=bk, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
        BLOCK_I=max(16, triton.next_power_of_2(bm)), BLOCK_T=max(16, triton.next_power_of_2(bk)),
    )  # fmt: skip
    return y
