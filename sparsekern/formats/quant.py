"""Quantized kept values of an N:M weight: int8 and int4, with per-group scales.

A quantized :class:`~sparsekern.formats.nm.NMSparseWeight` keeps ``meta`` as it is and stores
the kept weights as integers (docs/DESIGN.md, "Quantized values"):

- ``int8``: ``values int8 [out, kept]``, ``w = (q - zero) * scale`` (zero 0 when symmetric).
- ``int4``: ``values uint8 [out, kept / 2]``, two kept weights per byte, slot ``2j`` in the low
  nibble and ``2j + 1`` in the high one; nibbles are unsigned, ``w = (q - zero) * scale`` with
  ``zero = 8`` when symmetric.
- ``scales [out, groups]`` in the weight's floating dtype (what ``to_dense`` returns and what x
  must be), ``zeros int8 [out, groups]`` or ``None`` (symmetric).
- ``group_size``: dense columns per scale (a multiple of m that divides K); 0 means one scale
  per output row. A group of ``group_size`` columns holds ``group_size * n / m`` kept weights,
  consecutive in ``values``: groups follow the columns, whatever was pruned.
"""

from __future__ import annotations

import torch

QUANTS = ("int8", "int4")
INT4_ZERO = 8  # the zero point of a symmetric int4 weight: nibbles 0..15 hold -8..7
_RANGE = {"int8": (-128, 127), "int4": (0, 15)}


def quant_of(values: torch.Tensor) -> str | None:
    """``"int8"`` / ``"int4"`` for quantized values (int8 / packed uint8), None for floating ones."""
    return {torch.int8: "int8", torch.uint8: "int4"}.get(values.dtype)


def check_quant(quant) -> None:
    if quant not in QUANTS:
        raise ValueError(f"quant: expected one of {QUANTS}, got {quant!r}")


def groups_of(group_size: int, k: int, m: int) -> int:
    """Scale groups per row for ``group_size`` dense columns (0: one per row); checks it."""
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size: expected int, got {type(group_size).__name__}")
    if group_size == 0:
        return 1
    if group_size < 0 or group_size % m or k % group_size:
        raise ValueError(
            f"group_size: expected 0 (one scale per row) or a multiple of m={m} that divides "
            f"in_features {k}, got {group_size}"
        )
    return k // group_size


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``[rows, kept]`` nibbles (0..15) -> ``uint8 [rows, kept / 2]``, slot 2j in the low nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [rows, 2 * bytes]``."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], 2 * packed.shape[1])


def integers(values: torch.Tensor) -> torch.Tensor:
    """The stored integers of quantized values, ``int32 [rows, kept]``."""
    return (unpack_int4(values) if values.dtype == torch.uint8 else values).to(torch.int32)


def zero_points(values: torch.Tensor, zeros: torch.Tensor | None, groups: int) -> torch.Tensor:
    """``int32 [rows, groups]``: the stored zeros, or the symmetric default of the type."""
    if zeros is not None:
        return zeros.to(torch.int32)
    default = INT4_ZERO if values.dtype == torch.uint8 else 0
    return torch.full((values.shape[0], groups), default, dtype=torch.int32, device=values.device)


def dequantize(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """Kept weights ``[rows, kept]`` in ``scales.dtype`` (computed in fp32, rounded once)."""
    q = integers(values)
    rows, groups = scales.shape
    z = zero_points(values, zeros, groups)
    w = (q.view(rows, groups, q.shape[1] // groups) - z.unsqueeze(-1)).float() * scales.float().unsqueeze(-1)
    return w.reshape(rows, q.shape[1]).to(scales.dtype)


def scale_zero(
    w: torch.Tensor, quant: str, symmetric: bool, dtype: torch.dtype, shrink: tuple[float, ...] = (1.0,)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest parameters of each run ``w [..., run]``: ``(scale, zero)`` as fp32, the
    scale already rounded to ``dtype`` (what is stored). An all-zero run gets scale 1.

    ``shrink``: candidate fractions of the run's range; each run takes the one whose rounding
    leaves the least squared error (clipping a few outliers can buy a finer step for the rest)."""
    w = w.float()
    best = best_err = None
    for p in shrink:
        scale, zero = _range_params(w, quant, symmetric, dtype, p)
        if len(shrink) == 1:
            return scale, zero
        q = to_integers(w, scale, zero, quant)
        err = ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1) - w).square().sum(-1)
        if best is None:
            best, best_err = (scale, zero), err
            continue
        better = err < best_err
        best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]))
        best_err = torch.minimum(err, best_err)
    return best


def _range_params(w, quant: str, symmetric: bool, dtype: torch.dtype, p: float):
    lo_q, hi_q = _RANGE[quant]
    if symmetric:
        scale = p * w.abs().amax(-1) / (127.0 if quant == "int8" else 7.0)
        zero = torch.full_like(scale, 0 if quant == "int8" else INT4_ZERO)
    else:
        lo, hi = p * w.amin(-1).clamp(max=0), p * w.amax(-1).clamp(min=0)
        scale = (hi - lo) / (hi_q - lo_q)
        zero = (lo_q - lo / torch.where(scale > 0, scale, 1.0)).round().clamp(lo_q, hi_q)
    scale = torch.where(scale > 0, scale, 1.0).to(dtype).float()
    return scale, zero


def to_integers(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, quant: str) -> torch.Tensor:
    """``w [..., run]`` on the grid of ``scale``/``zero [...]``: int32 in the type's range."""
    lo_q, hi_q = _RANGE[quant]
    q = (w.float() / scale.unsqueeze(-1)).round() + zero.unsqueeze(-1)
    return q.clamp(lo_q, hi_q).to(torch.int32)


def quantize(
    kept: torch.Tensor,
    quant: str,
    groups: int,
    symmetric: bool = True,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest quantization of kept weights ``[rows, kept]`` in ``groups`` equal runs.

    Returns ``(values, scales, zeros)`` in the stored form (int4 packed), scales in
    ``kept.dtype``. ``scale``/``zero`` (fp32 ``[rows, groups]``): use these instead of the runs'
    own range (a pruner that rounded onto a grid as it went, :mod:`sparsekern.prune.sparsegpt`).
    """
    check_quant(quant)
    rows = kept.shape[0]
    w = kept.detach().float().reshape(rows, groups, kept.shape[1] // groups)
    if scale is None:
        scale, zero = scale_zero(w, quant, symmetric, kept.dtype)
    q = to_integers(w, scale, zero, quant).reshape(rows, kept.shape[1])
    values = pack_int4(q) if quant == "int4" else q.to(torch.int8)
    zeros = None if symmetric else zero.to(torch.int8).contiguous()
    return values.contiguous(), scale.to(kept.dtype).contiguous(), zeros


def check_act_block(act_block, k: int) -> None:
    """``act_block``: 0 (x as it is) or a block of columns that divides ``k``."""
    if not isinstance(act_block, int) or isinstance(act_block, bool):
        raise TypeError(f"act_block: expected int, got {type(act_block).__name__}")
    if act_block < 0 or (act_block and k % act_block):
        raise ValueError(
            f"act_block: expected 0 (x as it is) or a block size that divides in_features {k}, got {act_block}"
        )


def check_parts(values: torch.Tensor, scales, zeros, rows: int, kept: int, groups: int) -> None:
    """Shapes and dtypes of quantized parts (no data read)."""
    quant = quant_of(values)
    width = kept // 2 if quant == "int4" else kept
    if quant == "int4" and kept % 2:
        raise ValueError(f"values: int4 packs two kept weights per byte; expected an even count per row, got {kept}")
    if tuple(values.shape) != (rows, width):
        raise ValueError(f"values: expected {quant} shape {(rows, width)}, got {tuple(values.shape)}")
    if not isinstance(scales, torch.Tensor):
        raise TypeError(f"scales: expected torch.Tensor for {quant} values, got {type(scales).__name__}")
    if scales.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"scales: expected dtype float32, float16 or bfloat16, got {scales.dtype}")
    if tuple(scales.shape) != (rows, groups):
        raise ValueError(f"scales: expected shape {(rows, groups)} (rows, groups), got {tuple(scales.shape)}")
    if scales.device != values.device:
        raise ValueError(f"scales: expected device {values.device} (that of values), got {scales.device}")
    if zeros is not None:
        if not isinstance(zeros, torch.Tensor) or zeros.dtype != torch.int8:
            got = zeros.dtype if isinstance(zeros, torch.Tensor) else type(zeros).__name__
            raise TypeError(f"zeros: expected an int8 tensor, got {got}")
        if tuple(zeros.shape) != (rows, groups) or zeros.device != values.device:
            raise ValueError(
                f"zeros: expected shape {(rows, groups)} on {values.device}, got {tuple(zeros.shape)} on {zeros.device}"
            )


def check_values(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, row_name=None) -> None:
    """Data checks (they read the tensors): scales finite and > 0, zeros in the type's range.
    ``row_name(r)``: how a message names row r (default ``"row r"``)."""
    name = row_name or (lambda r: f"row {r}")
    bad = ~(torch.isfinite(scales) & (scales > 0))
    if bad.any():
        r, g = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"scales: expected finite values > 0, got {float(scales[r, g])} at {name(r)}, group {g}")
    if zeros is not None:
        lo, hi = _RANGE[quant_of(values)]
        out = (zeros < lo) | (zeros > hi)
        if out.any():
            r, g = (int(v) for v in out.nonzero()[0])
            raise ValueError(f"zeros: expected values in {lo}..{hi}, got {int(zeros[r, g])} at {name(r)}, group {g}")
