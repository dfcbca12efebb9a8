"""2:4 weights in the order the sparse tensor cores read them (``mma.sp``, sm_80+), and exact
conversions to and from PyTorch's ``to_sparse_semi_structured`` CUTLASS layout.

Both are derived from an :class:`NMSparseWeight` (n=2, m=4) once, at load time.

Values. ``mma.sp`` takes a compressed 16x16 tile of A whose column ``c`` is kept weight
``c % 2`` of group ``c // 2``: exactly our ``values`` rows (kept weights in column order), so
values need no reordering, only padding.

Metadata. One 4-bit nibble per group of 4 (``idx0 | idx1 << 2``, idx0 < idx1), four nibbles
(16 K columns of one row) per 16-bit half. For every K step of 32 columns and every block of
32 rows there are 32 words, one per lane of the warp that runs the two 16-row MMAs of the
block; lane ``4b + a`` holds:

- a = 0: row b (low half) and row b+8 (high half), columns 0-15 of the step
- a = 1: the same rows, columns 16-31       (lanes a=0,1: sparsity selector 0, rows 0-15)
- a = 2, 3: the same for rows 16+b and 24+b (sparsity selector 1, rows 16-31)

This is also CUTLASS's order (``ColumnMajorInterleaved<2>`` of its reordered int16 meta; for
int8, int32 meta and 16-row blocks), which is why the conversions below are reshapes.

The kernel's layout (``csrc/cuda/nm24_mma.cuh``) is these words as int32 ``[K_pad/32, N_pad]``
with values ``[N_pad, K_pad/2]``, N padded to a multiple of :data:`HW_ROWS` and K to
:data:`HW_COLS` with zero values and indices (0, 1), so the kernel reads W unpredicated and
never sees the invalid metadata nibble 0.
"""

from __future__ import annotations

import torch

from sparsekern.formats.nm import NMSparseWeight, pack_meta, unpack_meta

HW_ROWS = 128  # kBM in nm24_mma.cuh
HW_COLS = 64  # kBK in nm24_mma.cuh
HW_DTYPES = (torch.float16, torch.bfloat16)
# CUTLASS meta element per value dtype, and its row block (rows per 32 lanes of meta words).
_CUTLASS_META = {torch.float16: (torch.int16, 32), torch.bfloat16: (torch.int16, 32), torch.int8: (torch.int32, 16)}


def _check_24(weight: NMSparseWeight, dtypes=HW_DTYPES) -> None:
    if not isinstance(weight, NMSparseWeight):
        raise TypeError(f"weight: expected NMSparseWeight, got {type(weight).__name__}")
    if (weight.n, weight.m) != (2, 4):
        raise ValueError(f"weight: expected the 2:4 pattern, got {weight.pattern}")
    if weight.dtype not in dtypes:
        raise TypeError(f"weight: expected dtype in {[str(d) for d in dtypes]}, got {weight.dtype}")


def _wrap(v: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Unsigned ``bits``-wide values (int64) as two's complement ``dtype``."""
    return torch.where(v >= 2 ** (bits - 1), v - 2**bits, v).to(dtype)


def _unsigned(t: torch.Tensor) -> torch.Tensor:
    bits = t.element_size() * 8
    return t.to(torch.int64) & ((1 << bits) - 1)


def _elements_from_indices(idx: torch.Tensor, per: int) -> torch.Tensor:
    """In-group indices ``[rows, groups, 2]`` -> meta elements ``int64 [rows, groups/per]``."""
    rows, groups, _ = idx.shape
    nib = (idx[..., 0] | (idx[..., 1] << 2)).view(rows, groups // per, per)
    return (nib << (4 * torch.arange(per, device=idx.device))).sum(-1)


def _indices_from_elements(el: torch.Tensor, per: int) -> torch.Tensor:
    """Inverse of :func:`_elements_from_indices`, checking every nibble is a valid pair."""
    rows = el.shape[0]
    nib = (el.unsqueeze(-1) >> (4 * torch.arange(per, device=el.device))) & 0xF
    idx = torch.stack((nib & 3, nib >> 2), -1).view(rows, -1, 2)
    bad = (idx[..., 0] >= idx[..., 1]).nonzero()
    if bad.numel():
        r, g = (int(v) for v in bad[0])
        raise ValueError(
            f"meta: row {r}, group {g} encodes indices {idx[r, g].tolist()}; expected two increasing indices in 0..3"
        )
    return idx


def _to_lane_order(el: torch.Tensor, block: int) -> torch.Tensor:
    """Meta elements ``[rows, cols]`` (row-major) -> flat, in lane order (module docstring)."""
    rows, cols = el.shape
    # (row block, 16-row tile, high half, row b, K step j, column x) -> (j, block, b, tile, x, half)
    v = el.view(rows // block, block // 16, 2, 8, cols // 2, 2)
    return v.permute(4, 0, 3, 1, 5, 2).reshape(-1)


def _from_lane_order(flat: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    v = flat.reshape(cols // 2, rows // block, 8, block // 16, 2, 2)
    return v.permute(1, 3, 5, 2, 0, 4).reshape(rows, cols)


def _check_cutlass_shape(rows: int, k: int, dtype: torch.dtype) -> tuple[torch.dtype, int, int]:
    if dtype not in _CUTLASS_META:
        raise TypeError(
            f"dtype: expected one of {[str(d) for d in _CUTLASS_META]} for the 2:4 CUTLASS layout, got {dtype}"
        )
    meta_dtype, block = _CUTLASS_META[dtype]
    per = meta_dtype.itemsize * 2  # nibbles (groups of 4) per meta element
    if rows % block or k % (8 * per):
        raise ValueError(
            f"shape: the CUTLASS layout for {dtype} needs rows % {block} == 0 and K % {8 * per} == 0, got ({rows}, {k})"
        )
    return meta_dtype, block, per


# -- CUTLASS (torch.sparse.to_sparse_semi_structured) layout ---------------------------------


def cutlass_meta_from_indices(idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """In-group indices ``[rows, K/4, 2]`` of a ``dtype`` weight -> CUTLASS reordered meta."""
    rows, groups, _ = idx.shape
    meta_dtype, block, per = _check_cutlass_shape(rows, groups * 4, dtype)
    el = _elements_from_indices(idx.to(torch.int64), per)
    flat = _to_lane_order(el, block)
    return _wrap(flat, meta_dtype.itemsize * 8, meta_dtype).view(rows, -1)


def indices_from_cutlass_meta(meta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`cutlass_meta_from_indices`: ``int64 [rows, K/4, 2]``."""
    rows, cols = meta.shape
    meta_dtype, block, per = _check_cutlass_shape(rows, cols * _cols_per_element(meta.dtype), dtype)
    if meta.dtype != meta_dtype:
        raise TypeError(f"meta: expected dtype {meta_dtype} for values of dtype {dtype}, got {meta.dtype}")
    el = _from_lane_order(_unsigned(meta.reshape(-1)), rows, cols, block)
    return _indices_from_elements(el, per)


def _cols_per_element(meta_dtype: torch.dtype) -> int:
    """K columns covered by one CUTLASS meta element."""
    return meta_dtype.itemsize * 8


def nm_to_cutlass(weight: NMSparseWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, meta)`` exactly as ``sparse_semi_structured_from_dense_cutlass`` lays them out."""
    _check_24(weight)
    rows, k = weight.shape
    idx = unpack_meta(weight.meta, 4, weight.values.shape[1]).view(rows, k // 4, 2)
    return weight.values.contiguous(), cutlass_meta_from_indices(idx, weight.dtype)


def cutlass_to_nm(packed: torch.Tensor, meta: torch.Tensor) -> NMSparseWeight:
    """A CUTLASS-layout 2:4 weight (``packed [rows, K/2]``, reordered ``meta``) as NMSparseWeight."""
    if packed.dtype not in HW_DTYPES:
        raise TypeError(f"packed: expected dtype float16 or bfloat16, got {packed.dtype}")
    rows, kept = packed.shape
    idx = indices_from_cutlass_meta(meta, packed.dtype)
    if idx.shape[1] * 2 != kept:
        raise ValueError(f"meta: shape {tuple(meta.shape)} does not match packed {tuple(packed.shape)}")
    return NMSparseWeight(packed.contiguous(), pack_meta(idx.view(rows, -1), 4), 2, 4, (rows, kept * 2))


# -- the kernel's layout ------------------------------------------------------------------------


def hw_padded_shape(shape: tuple[int, int]) -> tuple[int, int]:
    rows, k = shape
    return -(-rows // HW_ROWS) * HW_ROWS, -(-k // HW_COLS) * HW_COLS


def hw_layout(weight: NMSparseWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values_hw [N_pad, K_pad/2], meta_hw int32 [K_pad/32, N_pad])`` for nm24_mma.

    Without padding (N % 128 == 0 and K % 64 == 0, true of most LLM shapes) ``values_hw`` is
    ``weight.values`` itself, not a copy.
    """
    _check_24(weight)
    rows, k = weight.shape
    n_pad, k_pad = hw_padded_shape(weight.shape)
    idx = unpack_meta(weight.meta, 4, weight.values.shape[1]).view(rows, k // 4, 2)
    values = weight.values.contiguous()
    if (n_pad, k_pad) != (rows, k):
        # Padding groups keep indices (0, 1): nibble 0x4, the smallest valid one.
        pad = torch.tensor([0, 1], device=idx.device).expand(n_pad, k_pad // 4, 2).clone()
        pad[:rows, : k // 4] = idx
        idx = pad
        padded = values.new_zeros(n_pad, k_pad // 2)
        padded[:rows, : k // 2] = values
        values = padded
    halves = _to_lane_order(_elements_from_indices(idx, 4), 32).view(-1, 2)
    words = halves[:, 0] | (halves[:, 1] << 16)
    return values, _wrap(words, 32, torch.int32).view(k_pad // 32, n_pad)


def hw_to_nm(values_hw: torch.Tensor, meta_hw: torch.Tensor, shape: tuple[int, int]) -> NMSparseWeight:
    """Inverse of :func:`hw_layout` for a weight of ``shape`` (the padding is dropped)."""
    rows, k = shape
    n_pad, k_pad = hw_padded_shape(shape)
    if tuple(values_hw.shape) != (n_pad, k_pad // 2) or tuple(meta_hw.shape) != (k_pad // 32, n_pad):
        raise ValueError(
            f"values_hw/meta_hw: expected shapes {(n_pad, k_pad // 2)} / {(k_pad // 32, n_pad)} for a {shape} weight, "
            f"got {tuple(values_hw.shape)} / {tuple(meta_hw.shape)}"
        )
    words = _unsigned(meta_hw.reshape(-1))
    halves = torch.stack((words & 0xFFFF, words >> 16), -1).reshape(-1)
    idx = _indices_from_elements(_from_lane_order(halves, n_pad, k_pad // 16, 32), 4)[:rows, : k // 4]
    meta = pack_meta(idx.reshape(rows, -1), 4)
    return NMSparseWeight(values_hw[:rows, : k // 2].contiguous(), meta, 2, 4, (rows, k))


def cutlass_to_hw(packed: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CUTLASS layout -> the kernel's layout (same word order; only padding differs)."""
    return hw_layout(cutlass_to_nm(packed, meta))


def hw_to_cutlass(values_hw: torch.Tensor, meta_hw: torch.Tensor, shape: tuple[int, int]):
    return nm_to_cutlass(hw_to_nm(values_hw, meta_hw, shape))
