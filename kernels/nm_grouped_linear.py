"""Triton kernel for ``nm_grouped_linear``: one N:M linear per expert (mixture of experts).

A grouped GEMM as MoE layers run them: the rows of x are already sorted by expert, and the host
cuts every expert's rows into blocks of ``BLOCK_M`` (:func:`block_schedule`, from the CPU
``offsets``), so each row block belongs to one expert; experts without rows get no block. The
grid is (row block, out tile, K split); a program reads its block's expert id and row range and
runs ``nm_linear``'s prefill product on that expert's weights (:func:`nm_tile_product`: W tiles
expanded in registers, ``tl.dot`` on the tensor cores). Split-K (``_common.splits_for``) when the
blocks and out tiles cannot fill the GPU, as at decode, where 1-2 rows hit each of top-k experts.

NOTE: unmeasured (no GPU yet). Decode pays a 16-row tile for 1-2 rows; a gemv variant like
``nm_linear``'s (gather x, stream W once) may win there and is the next thing to measure.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekern.formats.nm import meta_bits, meta_per_word
from sparsekern.kernels._common import Fixed, autotune, dot_precision, splitk_reduce, splits_for, store_tile
from sparsekern.kernels.nm_linear import nm_tile_product
from sparsekern.kernels.nonfinite import nm_nonfinite_
from sparsekern.ops import new_output


def block_m_for(most_rows: int) -> int:
    """Rows per block for experts of at most ``most_rows`` rows (16: the smallest ``tl.dot`` tile)."""
    return 16 if most_rows <= 16 else 32 if most_rows <= 32 else 64


def grouped_configs(block_m: int, elem_bytes: int = 2) -> list[triton.Config]:
    """Out and K tiles for a row block of ``block_m``; the W tile stays within ``nm_gemm_configs``'
    register budget (BLOCK_N * BLOCK_K / threads <= 32), fp32 with the small tiles."""

    def cfg(bn, bk, warps, stages):
        return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)

    if elem_bytes == 4:
        # NOTE: 4 warps spilled 8 B (BLOCK_M=32) and 76 B (BLOCK_M=64) on sm_90.
        return [cfg(64, 32, 4 if block_m <= 16 else 8, 2)]
    if block_m <= 16:
        return [cfg(64, 64, 4, 3), cfg(128, 32, 4, 4)]
    return [cfg(64, 64, 4, 3), cfg(128, 64, 8, 3)]


def block_schedule(bounds: list[int], block_m: int, device: torch.device) -> torch.Tensor:
    """int32 ``(3, blocks)``: per row block its expert, first row and the end of its expert's rows."""
    sched = [
        (e, r0, hi)
        for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))
        for r0 in range(lo, hi, block_m)
    ]  # fmt: skip
    return torch.tensor(sched, dtype=torch.int32).T.contiguous().to(device)


@triton.jit
def _nm_grouped_kernel(
    x_ptr,  # (T, K), rows sorted by expert
    values_ptr,  # (E, out, K*N/M)
    meta_ptr,  # (E, out, words) int32
    sched_ptr,  # (3, blocks) int32: expert, first row, end row of each row block
    y_ptr,  # (T, out) dtype of x; fp32 (n_splits, T, out) when PARTIAL
    n_blocks,
    out_features,
    K,
    stride_xr,
    stride_ve,  # expert stride of values
    stride_vr,
    stride_me,  # expert stride of meta
    stride_mr,
    stride_ys,  # split stride of y (0 unless PARTIAL)
    n_splits,
    PARTIAL: tl.constexpr,
    N: tl.constexpr,
    M: tl.constexpr,
    BITS: tl.constexpr,
    PER_WORD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    expert = tl.load(sched_ptr + pid_m).to(tl.int64)
    row0 = tl.load(sched_ptr + n_blocks + pid_m)
    row_end = tl.load(sched_ptr + 2 * n_blocks + pid_m)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < row_end
    n_mask = offs_n < out_features
    # 64-bit bases: E * out * kept and T * K pass 2**31 on large MoE layers.
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xr
    v_rows = values_ptr + expert * stride_ve + offs_n.to(tl.int64) * stride_vr
    m_rows = meta_ptr + expert * stride_me + offs_n.to(tl.int64) * stride_mr
    # Float values only: no scales or zeros (their row pointers are placeholders, never read).
    acc = nm_tile_product(x_rows, m_mask, v_rows, m_rows, v_rows, v_rows, n_mask, K, 1, pid_s, n_splits,
                          N, M, BITS, PER_WORD, 0, False, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    store_tile(acc, y_ptr, y_ptr, offs_m, m_mask, offs_n, n_mask, out_features, pid_s, stride_ys, False, PARTIAL)


_tuned: dict[tuple[int, int], object] = {}


def _tuner(block_m: int, elem_bytes: int):
    key = (block_m, elem_bytes)
    if key not in _tuned:
        configs = grouped_configs(block_m, elem_bytes)
        _tuned[key] = autotune(_nm_grouped_kernel, configs, ["out_features", "K", "n_splits"])
    return _tuned[key]


def nm_grouped_linear(x, values, meta, offsets, n: int, m: int, config=None) -> torch.Tensor:
    """``x [T, K]`` through expert e's N:M weight for rows ``offsets[e]:offsets[e+1]``, arguments
    already checked by ``ops_moe``. ``config`` pins one of :func:`grouped_configs` (tests)."""
    tokens, k = x.shape
    n_experts, out_features, kept = values.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    values, meta = values.contiguous(), meta.contiguous()
    y = new_output((tokens, out_features), x)
    if tokens == 0 or out_features == 0:
        return y
    if k == 0:
        return y.zero_()
    bounds = offsets.tolist()
    rows = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
    block_m = block_m_for(max(rows))
    sched = block_schedule(bounds, block_m, x.device)
    n_blocks = sched.shape[1]
    n_splits = splits_for(n_blocks * triton.cdiv(out_features, 64), triton.cdiv(k, 64), x.device)
    partial = n_splits > 1
    dst = torch.empty((n_splits, tokens, out_features), dtype=torch.float32, device=x.device) if partial else y
    grid = lambda meta_: (n_blocks, triton.cdiv(out_features, meta_["BLOCK_N"]), n_splits)  # noqa: E731
    launcher = Fixed(_nm_grouped_kernel, config) if config is not None else _tuner(block_m, x.element_size())
    launcher[grid](
        x, values, meta, sched, dst, n_blocks, out_features, k,
        x.stride(0), values.stride(0), values.stride(1), meta.stride(0), meta.stride(1),
        tokens * out_features if partial else 0, n_splits,
        PARTIAL=partial, N=n, M=m, BITS=meta_bits(m), PER_WORD=meta_per_word(m),
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=block_m,
    )  # fmt: skip
    if partial:
        splitk_reduce(dst, None, y)
    # NaN/Inf in x as in the dense op, per expert (kernels/nonfinite.py; no host sync).
    for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi > lo:
            nm_nonfinite_(x[lo:hi], meta[e], n, m, y[lo:hi])
    return y
