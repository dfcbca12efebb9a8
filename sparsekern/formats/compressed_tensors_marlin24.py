"""compressed-tensors' ``marlin-24`` layers (2:4 + W4A16 / W8A16), read back exactly as N:M.

``marlin-24`` is the format llm-compressor (up to 0.10, compressed-tensors up to 0.14) picks by
default for a 2:4 model with weight-only int4/int8 channel or group-128 symmetric
quantization. compressed-tensors only writes it (``Marlin24Compressor.decompress`` raises
NotImplementedError); this module inverts the writer. Facts relied on, from
vllm-project/compressed-tensors 0.14.0.1, ``src/compressed_tensors/``
``compressors/sparse_quantized_compressors/marlin_24.py``, ``utils/permutations_24.py`` and
``utils/semi_structured_conversions.py``:

- Per layer ``weight_packed`` (int32), ``scale_packed`` (fp16) and ``meta`` (int16); no shape
  tensor, no zero point (symmetric only), no ``weight_g_idx`` (dropped).
- The quantized weight ``q [out, K]`` (signed, in fp16) is compressed by CUTLASS'
  ``sparse_semi_structured_from_dense_cutlass``: per group of 4 two positions ``i0 < i1``
  (nibble ``i0 | i1 << 2``), their values ``[out, K/2]`` in group order; four nibbles per int16,
  group ``4c + t`` at bits ``4t``; the ``[out, K/16]`` int16 matrix is then scattered into the
  CUTLASS ``ColumnMajorInterleaved<2>`` order and stored reshaped to ``[K/32, 2*out]``.
- The values are transposed to ``[K/2, out]``, offset by ``2**(bits-1)`` (unsigned), cut into
  16x16 tiles (``reshape(K/32, 16, out/16, 16).permute(0, 2, 1, 3)``), each run of 1024 permuted
  by ``get_permutations_24(bits)`` and packed ``32 // bits`` per int32, column ``w*per + i`` of
  a row in bits ``bits*i`` of word ``w``: ``[K/32, out*16/per]``.
- Scales (cast to fp16) are transposed to ``[groups, out]``; runs of 64 are permuted by
  ``scale_perm`` when the strategy is ``group`` and ``group_size < K/2`` (``K/2`` is the
  writer's ``size_k``, the transposed compressed width), by the identity otherwise.
"""

from __future__ import annotations

import functools

import torch

from sparsekern.formats import quant as q
from sparsekern.formats.nm import NMSparseWeight, pack_meta

TILE = 16
PERM_RUN = 1024  # entries of one weight permutation
SCALE_RUN = 64


@functools.cache
def tile_perm(bits: int) -> torch.Tensor:
    """The writer's 1024-entry weight permutation for ``bits`` (the tensor-core fragment order)."""
    perm = []
    for i in range(32):
        col = i // 4
        rows = (2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4 + 4), 2 * (i % 4 + 4) + 1)
        base = [16 * r + (col // 2) * 256 + 8 * (col % 2) + 4 * block for block in (0, 1) for r in rows]
        perm += [p + j for j in range(4) for p in base]
    interleave = [0, 2, 4, 6, 1, 3, 5, 7] if bits == 4 else [0, 2, 1, 3]
    return torch.tensor(perm).view(-1, len(interleave))[:, interleave].reshape(-1)


SCALE_PERM = torch.tensor([8 * i + j for i in range(8) for j in (0, 4, 1, 5, 2, 6, 3, 7)])


def meta_offsets(rows: int, cols: int) -> torch.Tensor:
    """Where element ``i`` of a row-major ``[rows, cols]`` int16 meta matrix lands in CUTLASS'
    interleaved order (``rows % 64 == 0``, ``cols`` even)."""
    r = torch.arange(rows).unsqueeze(1).expand(rows, cols)
    c = torch.arange(cols).unsqueeze(0).expand(rows, cols)
    r = r // 64 * 64 + (r % 2) * 2 + (r % 8) // 4 + (r % 4) // 2 * 32 + (r % 64) // 8 * 4
    swap = ((r % 2 == 0) & (c % 2 == 1)).long() - ((r % 2 == 1) & (c % 2 == 0)).long()
    r, c = r + swap, c - swap
    return ((c // 2) * rows * 2 + r * 2 + c % 2).reshape(-1)


def unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[rows, n]`` -> unsigned fields ``int32 [rows, n * 32 // bits]``, low bits first."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    fields = (words.to(torch.int64).unsqueeze(-1) & 0xFFFFFFFF) >> shifts & ((1 << bits) - 1)
    return fields.reshape(words.shape[0], -1).to(torch.int32)


def marlin24_to_nm(
    weight_packed: torch.Tensor,
    scale_packed: torch.Tensor,
    meta: torch.Tensor,
    bits: int,
    group_size: int | None,
    name: str,
) -> NMSparseWeight:
    """One ``marlin-24`` layer as an exact 2:4 quantized :class:`NMSparseWeight`.

    ``group_size``: that of the config's ``group`` strategy, None for ``channel``. ``ValueError``
    naming ``name.<tensor>`` for anything inconsistent.
    """
    per = 32 // bits
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2:
        raise ValueError(
            f"{name}.weight_packed: expected a 2-D int32 tensor, got {weight_packed.dtype} {tuple(weight_packed.shape)}"
        )
    k32, width = weight_packed.shape
    k, out = 32 * k32, width * per // TILE
    if out < 64 or out % 64 or width * per % TILE or (k // 2 * out) % PERM_RUN:
        raise ValueError(
            f"{name}.weight_packed: shape {tuple(weight_packed.shape)} is not a marlin-24 {bits}-bit layout "
            "([K/32, out*16*bits/32] with out a multiple of 64)"
        )
    if meta.dtype != torch.int16 or tuple(meta.shape) != (k32, 2 * out):
        raise ValueError(f"{name}.meta: expected int16 of shape {(k32, 2 * out)}, got {meta.dtype} {tuple(meta.shape)}")
    if not scale_packed.is_floating_point() or scale_packed.dim() != 2 or scale_packed.shape[1] != out:
        raise ValueError(
            f"{name}.scale_packed: expected a floating [groups, {out}] tensor, got {scale_packed.dtype} {tuple(scale_packed.shape)}"
        )
    groups = scale_packed.shape[0]
    grouped = group_size is not None and group_size < k // 2  # the writer's test, on its transposed size_k
    if groups < 1 or k % groups or (grouped and groups * out % SCALE_RUN):
        raise ValueError(f"{name}.scale_packed: {groups} groups do not divide in_features {k}")

    fields = unpack_words(weight_packed, bits).reshape(-1, PERM_RUN)
    tiled = torch.empty_like(fields)
    tiled[:, tile_perm(bits)] = fields
    kept = tiled.reshape(k // 2 // TILE, out // TILE, TILE, TILE).permute(0, 2, 1, 3).reshape(k // 2, out).t()

    words = meta.reshape(-1)[meta_offsets(out, k // 16)].view(out, k // 16).to(torch.int32) & 0xFFFF
    nibbles = (words.unsqueeze(-1) >> torch.tensor([0, 4, 8, 12], dtype=torch.int32)) & 15
    idx = torch.stack((nibbles & 3, nibbles >> 2), dim=-1).reshape(out, k // 2)

    scales = scale_packed
    if grouped:
        scales = torch.empty_like(scale_packed.reshape(-1, SCALE_RUN))
        scales[:, SCALE_PERM] = scale_packed.reshape(-1, SCALE_RUN)
    scales = scales.reshape(groups, out).t().contiguous()

    if bits == 4:  # the writer's unsigned nibble is our nibble: q + 8
        values = q.pack_int4(kept)
    else:
        values = (kept - 128).to(torch.int8).contiguous()
    weight = NMSparseWeight(values, pack_meta(idx, 4), 2, 4, (out, k), scales, None, 0 if groups == 1 else k // groups)
    try:
        return weight.validate()
    except ValueError as exc:  # name the stored tensor the bad data came from
        msg = str(exc)
        msg = "scale_packed" + msg.removeprefix("scales") if msg.startswith("scales") else msg
        raise ValueError(f"{name}.{msg}") from None
