"""Triton kernels for ``nm_linear``: ``y = x @ W.T + bias`` with W in N:M form.

W is read straight from the storage format (``sparsekern/formats/nm.py``): ``values
[out, K*N/M]`` and ``meta`` int32 words of ``log2(M)``-bit in-group indices, ``32 // log2(M)``
per word, least significant first. Kept value ``j`` of a row sits in group ``j // N``, so its
column is ``(j // N) * M + index_j``. Indices are masked to ``log2(M)`` bits, so the column
stays inside its group and no meta word, valid or not, can send a load out of bounds.

Two regimes:

- decode (``rows <= GEMV_MAX_ROWS``), :func:`_nm_gemv_kernel`: memory-bound. Streams values and
  meta once, coalesced along the kept dimension, and gathers the matching x columns (x is a
  few KB and stays in L1/L2) instead of expanding W: the work per weight byte is a shift, a
  mask, a gather and an FMA in fp32. Split-K when the output tiles cannot fill the GPU.
- prefill, :func:`_nm_gemm_kernel`: tiled GEMM. The W tile ``[BLOCK_N, BLOCK_K]`` is expanded
  in registers from its ``BLOCK_K/M`` groups (one select per kept slot) and fed to ``tl.dot``,
  which runs on the tensor cores (``mma`` on sm_80, ``wgmma`` on sm_90 with the operand staged
  through shared memory). Also used for 5..16 rows with ``BLOCK_M = 16`` plus split-K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekern.formats.nm import meta_bits, meta_per_word
from sparsekern.kernels._common import (
    Fixed,
    autotune,
    dot_precision,
    rows_bucket,
    splitk_reduce,
    splits_for,
    store_tile,
)
from sparsekern.kernels.nonfinite import nm_nonfinite_
from sparsekern.ops import new_output

# NOTE: unmeasured guess (no GPU yet): the gather costs one L1 access per kept weight per row,
# so past ~4 rows the tensor-core path should win. bench/bench_linear_gpu.py measures both.
GEMV_MAX_ROWS = 4


# -- decode: gather x, stream W once ---------------------------------------------------------


def nm_gemv_configs(rows_bucket: int) -> list[triton.Config]:
    """Configs for :func:`_nm_gemv_kernel`; BLOCK_R * BLOCK_N * BLOCK_J <= 16 fp32 per thread.

    NOTE: at 32 per thread ptxas used 121-167 registers and spilled 16 B at 4 rows on sm_90.
    """
    per_row = 2048 // rows_bucket
    return [
        triton.Config({"BLOCK_N": 32, "BLOCK_J": per_row // 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 16, "BLOCK_J": per_row // 16}, num_warps=4, num_stages=4),
        # Narrow tiles: twice to four times the programs. Fastest of 9 configs at 1 row on an H200
        # (bench/gpu_sweep.py, 2026-11-27): 20-46 us against 28-80 us for the two above.
        triton.Config({"BLOCK_N": 8, "BLOCK_J": per_row // 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 8, "BLOCK_J": per_row // 16}, num_warps=2, num_stages=3),
    ]


@triton.jit
def _kept_values(v_rows, s_rows, z_rows, j, mask, group_kept, QBITS: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """Kept weights ``j`` of the rows at ``v_rows`` as fp32: floats as stored, or quantized
    integers (int8; int4 two per byte, slot 2j low) as ``(q - zero) * scale`` of their group."""
    if QBITS == 0:
        return tl.load(v_rows[:, None] + j[None, :], mask=mask, other=0.0).to(tl.float32)
    if QBITS == 8:
        q = tl.load(v_rows[:, None] + j[None, :], mask=mask, other=0).to(tl.int32)
    else:
        b = tl.load(v_rows[:, None] + (j // 2)[None, :], mask=mask, other=0).to(tl.int32)
        q = (b >> ((j % 2) * 4)[None, :]) & 15
    g = (j // group_kept)[None, :]
    scale = tl.load(s_rows[:, None] + g, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(z_rows[:, None] + g, mask=mask, other=0).to(tl.int32)
    else:
        zero = 8 if QBITS == 4 else 0
    return (q - zero).to(tl.float32) * scale


@triton.jit
def _nm_gemv_kernel(
    x_ptr,  # (rows, K)
    values_ptr,  # (out, K*N/M); int8 (out, kept) / uint8 (out, kept/2) when quantized
    meta_ptr,  # (out, words) int32
    bias_ptr,  # (out,) or unused
    y_ptr,  # (rows, out) dtype of x; fp32 (n_splits, rows, out) when PARTIAL
    scales_ptr,  # (out, groups) when QBITS, else unused
    zeros_ptr,  # (out, groups) int8 when HAS_ZEROS, else unused
    rows,
    out_features,
    kept,  # K*N/M
    group_kept,  # kept weights per scale group (QBITS)
    stride_xr,
    stride_vr,
    stride_mr,
    stride_sr,  # row stride of scales / zeros
    stride_ys,  # split stride of y (0 unless PARTIAL)
    n_splits,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    N: tl.constexpr,
    M: tl.constexpr,
    BITS: tl.constexpr,
    PER_WORD: tl.constexpr,
    QBITS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask = offs_n < out_features
    r_mask = offs_r < rows
    j_tiles = tl.cdiv(kept, BLOCK_J)
    per_split = tl.cdiv(j_tiles, n_splits)
    j_lo = pid_s * per_split
    j_hi = tl.minimum(j_lo + per_split, j_tiles)
    # Row bases as 64-bit pointers (rows * stride passes 2**31 on big or strided inputs); the
    # offsets added inside the loop stay below K or kept.
    x_rows = x_ptr + offs_r.to(tl.int64) * stride_xr
    v_rows = values_ptr + offs_n.to(tl.int64) * stride_vr
    m_rows = meta_ptr + offs_n.to(tl.int64) * stride_mr
    s_rows = scales_ptr + offs_n.to(tl.int64) * stride_sr
    z_rows = zeros_ptr + offs_n.to(tl.int64) * stride_sr
    acc = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
    for jt in range(j_lo, j_hi):
        offs_j = jt * BLOCK_J + tl.arange(0, BLOCK_J)
        w_mask = n_mask[:, None] & (offs_j < kept)[None, :]
        v = _kept_values(v_rows, s_rows, z_rows, offs_j, w_mask, group_kept, QBITS, HAS_ZEROS)
        word = tl.load(m_rows[:, None] + (offs_j // PER_WORD)[None, :], mask=w_mask, other=0)
        idx = (word >> ((offs_j % PER_WORD) * BITS)[None, :]) & (M - 1)
        col = (offs_j // N * M)[None, :] + idx  # (BLOCK_N, BLOCK_J), < K wherever w_mask holds
        x_mask = r_mask[:, None, None] & w_mask[None, :, :]
        xg = tl.load(x_rows[:, None, None] + col[None, :, :], mask=x_mask, other=0.0)
        acc += tl.sum(xg.to(tl.float32) * v[None, :, :], axis=2)
    store_tile(acc, y_ptr, bias_ptr, offs_r, r_mask, offs_n, n_mask, out_features, pid_s, stride_ys, HAS_BIAS, PARTIAL)


# -- prefill: expand the W tile in registers, tensor-core dot --------------------------------


def nm_gemm_configs(rows_bucket: int, elem_bytes: int = 2) -> list[triton.Config]:
    """Configs for :func:`_nm_gemm_kernel`, keyed on the row bucket (BLOCK_M follows the rows).

    NOTE: the W tile is expanded in registers, so BLOCK_N * BLOCK_K / threads <= 32: at 64
    (128x64 tile, 4 warps) ptxas spilled 108-484 B per thread on sm_80/sm_90
    (tests/test_triton_compile.py). fp32 doubles the W tile and runs three products per dot
    ("tf32x3", see _common.dot_precision), so it gets small tiles.
    """

    def cfg(bm, bn, bk, warps, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)

    if elem_bytes == 4:
        return [cfg(16, 64, 32, 4, 2)] if rows_bucket <= 16 else [cfg(32, 64, 32, 4, 2), cfg(64, 64, 32, 8, 2)]
    if rows_bucket <= 16:
        return [cfg(16, 64, 64, 4, 3), cfg(16, 128, 32, 4, 4)]
    if rows_bucket <= 64:
        return [cfg(64, 64, 64, 4, 3), cfg(32, 128, 32, 4, 4)]
    return [cfg(128, 128, 64, 8, 3), cfg(128, 64, 64, 4, 4), cfg(64, 128, 64, 8, 3)]


@triton.jit
def _nm_w_tile(
    v_rows,  # (BLOCK_N,) pointers to the rows of values
    m_rows,  # (BLOCK_N,) pointers to the rows of meta
    s_rows,  # (BLOCK_N,) pointers to the rows of scales (QBITS), else unused
    z_rows,  # (BLOCK_N,) pointers to the rows of zeros (HAS_ZEROS), else unused
    n_mask,  # (BLOCK_N,) rows that exist
    kt,  # K tile index
    K,
    group_kept,
    dtype: tl.constexpr,
    N: tl.constexpr,
    M: tl.constexpr,
    BITS: tl.constexpr,
    PER_WORD: tl.constexpr,
    QBITS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The dense W tile ``(BLOCK_N, BLOCK_K)`` of K tile ``kt`` in ``dtype``, expanded in registers
    from its ``BLOCK_K / M`` groups (zero past K and past the last row)."""
    G: tl.constexpr = BLOCK_K // M  # groups per K tile
    grp = kt * G + tl.arange(0, G)
    offs_p = tl.arange(0, M)
    w_mask = n_mask[:, None] & (grp < K // M)[None, :]
    # W tile as (BLOCK_N, G, M): slot s of each group lands on its in-group position.
    w = tl.zeros((BLOCK_N, G, M), dtype)
    for s in tl.static_range(N):
        j = grp * N + s
        v = _kept_values(v_rows, s_rows, z_rows, j, w_mask, group_kept, QBITS, HAS_ZEROS)
        word = tl.load(m_rows[:, None] + (j // PER_WORD)[None, :], mask=w_mask, other=0)
        idx = (word >> ((j % PER_WORD) * BITS)[None, :]) & (M - 1)
        w += tl.where(idx[:, :, None] == offs_p[None, None, :], v.to(w.dtype)[:, :, None], 0.0)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def nm_tile_product(
    x_rows,  # (BLOCK_M,) pointers to the rows of x
    m_mask,  # (BLOCK_M,) rows of x that exist
    v_rows,  # (BLOCK_N,) pointers to the rows of values
    m_rows,  # (BLOCK_N,) pointers to the rows of meta
    s_rows,  # (BLOCK_N,) pointers to the rows of scales (QBITS), else unused
    z_rows,  # (BLOCK_N,) pointers to the rows of zeros (HAS_ZEROS), else unused
    n_mask,  # (BLOCK_N,) rows of W that exist
    K,
    group_kept,
    pid_s,
    n_splits,
    N: tl.constexpr,
    M: tl.constexpr,
    BITS: tl.constexpr,
    PER_WORD: tl.constexpr,
    QBITS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 ``(BLOCK_M, BLOCK_N)``: x rows times the W rows, over split ``pid_s`` of ``n_splits``
    of the K tiles; each W tile expanded in registers and fed to ``tl.dot``."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, n_splits)
    k_lo = pid_s * per_split
    k_hi = tl.minimum(k_lo + per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kt in range(k_lo, k_hi):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        x_mask = m_mask[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_rows[:, None] + offs_k[None, :], mask=x_mask, other=0.0)
        w = _nm_w_tile(v_rows, m_rows, s_rows, z_rows, n_mask, kt, K, group_kept, x.dtype,
                       N, M, BITS, PER_WORD, QBITS, HAS_ZEROS, BLOCK_N, BLOCK_K)  # fmt: skip
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _nm_gemm_kernel(
    x_ptr,  # (rows, K)
    values_ptr,  # (out, K*N/M); int8 (out, kept) / uint8 (out, kept/2) when quantized
    meta_ptr,  # (out, words) int32
    bias_ptr,  # (out,) or unused
    y_ptr,  # (rows, out) dtype of x; fp32 (n_splits, rows, out) when PARTIAL
    scales_ptr,  # (out, groups) when QBITS, else unused
    zeros_ptr,  # (out, groups) int8 when HAS_ZEROS, else unused
    rows,
    out_features,
    K,
    group_kept,  # kept weights per scale group (QBITS)
    stride_xr,
    stride_vr,
    stride_mr,
    stride_sr,  # row stride of scales / zeros
    stride_ys,  # split stride of y (0 unless PARTIAL)
    n_splits,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    N: tl.constexpr,
    M: tl.constexpr,
    BITS: tl.constexpr,
    PER_WORD: tl.constexpr,
    QBITS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < rows
    n_mask = offs_n < out_features
    # 64-bit row bases, as in _nm_gemv_kernel.
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xr
    v_rows = values_ptr + offs_n.to(tl.int64) * stride_vr
    m_rows = meta_ptr + offs_n.to(tl.int64) * stride_mr
    s_rows = scales_ptr + offs_n.to(tl.int64) * stride_sr
    z_rows = zeros_ptr + offs_n.to(tl.int64) * stride_sr
    acc = nm_tile_product(x_rows, m_mask, v_rows, m_rows, s_rows, z_rows, n_mask, K, group_kept, pid_s, n_splits,
                          N, M, BITS, PER_WORD, QBITS, HAS_ZEROS, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    store_tile(acc, y_ptr, bias_ptr, offs_m, m_mask, offs_n, n_mask, out_features, pid_s, stride_ys, HAS_BIAS, PARTIAL)


# -- wrapper: check shapes, allocate, launch ---------------------------------------------------

_tuned: dict[tuple[str, int, int], object] = {}


def _tuner(kind: str, bucket: int, elem_bytes: int):
    key = (kind, bucket, elem_bytes)
    if key not in _tuned:
        if kind == "gemv":
            _tuned[key] = autotune(_nm_gemv_kernel, nm_gemv_configs(bucket), ["out_features", "kept", "n_splits"])
        else:
            configs = nm_gemm_configs(bucket, elem_bytes)
            _tuned[key] = autotune(_nm_gemm_kernel, configs, ["out_features", "K", "n_splits"])
    return _tuned[key]


def nm_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    n: int,
    m: int,
    bias=None,
    scales=None,
    zeros=None,
    group_size: int = 0,
    act_block: int = 0,
    config=None,
):
    """``x [rows, K] @ W.T + bias`` for arguments already checked by ``ops.check_nm_linear``.

    Quantized values (``scales`` given) are dequantized in the kernels. ``act_block``: x is first
    rounded as ``reference.quantize_x`` does and the kernel runs in fp32 (output in x's dtype).
    ``config`` pins one config of :func:`nm_gemv_configs` (rows <= GEMV_MAX_ROWS) or
    :func:`nm_gemm_configs` instead of autotuning (tests, benchmarks).
    """
    if act_block:
        from sparsekern.reference import quantize_x

        fp32_bias = None if bias is None else bias.float()
        y = nm_linear(quantize_x(x, act_block), values, meta, n, m, fp32_bias, scales, zeros, group_size, 0, config)
        return y.to(x.dtype)
    rows, k = x.shape
    qbits = 0 if scales is None else 4 if values.dtype == torch.uint8 else 8
    out_features, kept = values.shape[0], values.shape[1] * (2 if qbits == 4 else 1)
    if x.stride(-1) != 1:
        x = x.contiguous()
    values, meta = values.contiguous(), meta.contiguous()
    y = new_output((rows, out_features), x)
    if rows == 0 or out_features == 0:
        return y
    if k == 0:
        return y.copy_(bias.expand_as(y) if bias is not None else torch.zeros_like(y))
    bucket = rows_bucket(rows)
    gemv = rows <= GEMV_MAX_ROWS
    # Split estimate from a nominal 64-wide output tile; any split count is correct for any config.
    if gemv:
        programs, tiles = triton.cdiv(out_features, 64), triton.cdiv(kept, 256)
    else:
        programs = triton.cdiv(out_features, 64) * triton.cdiv(rows, min(bucket, 128))
        tiles = triton.cdiv(k, 64)
    n_splits = splits_for(programs, tiles, x.device)
    partial = n_splits > 1
    dst = torch.empty((n_splits, rows, out_features), dtype=torch.float32, device=x.device) if partial else y
    stride_ys = rows * out_features if partial else 0
    common = dict(HAS_BIAS=bias is not None, PARTIAL=partial, N=n, M=m, BITS=meta_bits(m), PER_WORD=meta_per_word(m))
    common.update(QBITS=qbits, HAS_ZEROS=zeros is not None)
    bias_arg = bias if bias is not None else x
    scales_arg = scales.contiguous() if scales is not None else x
    zeros_arg = zeros.contiguous() if zeros is not None else x
    group_kept = kept // scales.shape[1] if scales is not None else 1
    stride_sr = scales_arg.stride(0) if scales is not None else 0
    if gemv:
        grid = lambda meta_: (triton.cdiv(out_features, meta_["BLOCK_N"]), n_splits)  # noqa: E731
        launcher = Fixed(_nm_gemv_kernel, config) if config is not None else _tuner("gemv", bucket, x.element_size())
        launcher[grid](
            x, values, meta, bias_arg, dst, scales_arg, zeros_arg, rows, out_features, kept, group_kept,
            x.stride(0), values.stride(0), meta.stride(0), stride_sr, stride_ys, n_splits,
            BLOCK_R=bucket, **common,
        )  # fmt: skip
    else:
        grid = lambda meta_: (  # noqa: E731
            triton.cdiv(rows, meta_["BLOCK_M"]),
            triton.cdiv(out_features, meta_["BLOCK_N"]),
            n_splits,
        )
        launcher = (
            Fixed(_nm_gemm_kernel, config)
            if config is not None
            else _tuner("gemm", min(bucket, 4096), x.element_size())
        )
        launcher[grid](
            x, values, meta, bias_arg, dst, scales_arg, zeros_arg, rows, out_features, k, group_kept,
            x.stride(0), values.stride(0), meta.stride(0), stride_sr, stride_ys, n_splits,
            DOT_PRECISION=dot_precision(x.dtype), **common,
        )  # fmt: skip
    y = splitk_reduce(dst, bias, y) if partial else y
    return nm_nonfinite_(x, meta, n, m, y)  # NaN/Inf in x as in the dense op (kernels/nonfinite.py)
