"""Block-sparse weights (BSR): only the non-zero (bm, bk) blocks of a ``[out, K]`` weight.

- ``crow_indices`` ``int32 [out/bm + 1]``: block row r owns entries ``crow[r]:crow[r+1]``.
- ``col_indices`` ``int32 [nnz]``: block column of each stored block, strictly increasing
  within a block row.
- ``blocks`` ``[nnz, bm, bk]``: the block values.

Block sides run from 8 to 128, need not be square, and must divide the weight's shape.

Quantized blocks (int8, int4; docs/DESIGN.md "Quantized values"): ``blocks`` holds integers,
``int8 [nnz, bm, bk]`` or ``uint8 [nnz, bm, bk / 2]`` (int4: column 2j of a block row in the low
nibble, 2j + 1 in the high one, unsigned), with ``scales [nnz, bm, bk / group_size]`` in the
weight's floating dtype and ``zeros int8`` of the same shape or ``None`` (symmetric: zero 0 for
int8, 8 for int4). A weight is ``(q - zero) * scale``; each stored block row's ``bk`` weights
are cut into runs of ``group_size`` columns, one scale each. The scales follow the blocks, so a
kernel reads them in the same stream and pruned blocks carry none (scales indexed by dense
column, as N:M's, would cost a 90%-sparse int4 weight a third more bytes).

Stacked experts (``bsr_grouped_linear``, :func:`stack_bsr`): E weights of one shape and block
size share one ``col [nnz_total]`` and ``blocks [nnz_total, bm, bk]``, expert after expert, and
``crow int32 [E, out/bm + 1]`` holds global indices: expert e's block row r owns entries
``crow[e, r]:crow[e, r+1]``, so ``crow[0, 0] == 0``, ``crow[e, 0] == crow[e-1, -1]`` (the blocks
of the experts before e), ``crow[E-1, -1] == nnz_total``, each row non-decreasing. Expert e alone
is ``BlockSparseWeight(crow[e] - crow[e, 0], col[lo:hi], blocks[lo:hi])`` with
``lo, hi = crow[e, 0], crow[e, -1]``: the kernels offset pointers, nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsekern.formats import quant as q
from sparsekern.formats.nm import check_dtype

MIN_BLOCK, MAX_BLOCK = 8, 128
GROUP_STEP = 8  # a quantized block row's scale groups: multiples of 8 columns that divide bk


def check_block(block) -> tuple[int, int]:
    if (
        not isinstance(block, (tuple, list))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in block)
    ):
        raise TypeError(f"block: expected a (bm, bk) pair of ints, got {block!r}")
    bm, bk = block
    if not (MIN_BLOCK <= bm <= MAX_BLOCK and MIN_BLOCK <= bk <= MAX_BLOCK):
        raise ValueError(f"block: expected sides in {MIN_BLOCK}..{MAX_BLOCK}, got {tuple(block)}")
    return bm, bk


def block_width(blocks: torch.Tensor) -> int:
    """``bk`` of ``blocks [nnz, bm, bk]`` (``bk / 2`` bytes a row when int4-packed)."""
    return blocks.shape[2] * (2 if blocks.dtype == torch.uint8 else 1)


def check_group_size(group_size, bk: int) -> int:
    """Scale groups per block row for ``group_size`` columns (0: one per block row); checks it."""
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size: expected int, got {type(group_size).__name__}")
    if group_size == 0:
        return 1
    if group_size < 0 or group_size % GROUP_STEP or bk % group_size:
        raise ValueError(
            f"group_size: expected 0 (one scale per block row) or a multiple of {GROUP_STEP} that divides the "
            f"block width {bk}, got {group_size}"
        )
    return bk // group_size


def check_quant_blocks(blocks: torch.Tensor, scales, zeros, bk: int | None = None) -> None:
    """Shapes and dtypes of quantized blocks' parts (no data read): ``scales`` / ``zeros``
    ``[nnz, bm, bk / group_size]`` for a group size that :func:`check_group_size` accepts."""
    nnz, bm = blocks.shape[:2]
    bk = block_width(blocks) if bk is None else bk
    if not isinstance(scales, torch.Tensor):
        raise TypeError(f"scales: expected torch.Tensor for {q.quant_of(blocks)} blocks, got {type(scales).__name__}")
    groups = scales.shape[2] if scales.dim() == 3 else 0
    if (
        scales.dim() != 3
        or tuple(scales.shape[:2]) != (nnz, bm)
        or not groups
        or bk % groups
        or bk // groups % GROUP_STEP
    ):
        raise ValueError(
            f"scales: expected shape ({nnz}, {bm}, groups) with groups dividing the block width {bk} into runs "
            f"of a multiple of 8 columns, got {tuple(scales.shape)}"
        )  # csrc/cpu/op_checks.h check_bsr_quant_args: the same words
    # The dtype and device of the scales, as formats/quant.py checks an N:M weight's.
    q.check_parts(
        blocks.reshape(nnz * bm, blocks.shape[2]), scales.reshape(nnz * bm, groups), None, nnz * bm, bk, groups
    )
    if zeros is not None:
        if not isinstance(zeros, torch.Tensor) or zeros.dtype != torch.int8:
            got = zeros.dtype if isinstance(zeros, torch.Tensor) else type(zeros).__name__
            raise TypeError(f"zeros: expected an int8 tensor, got {got}")
        if tuple(zeros.shape) != tuple(scales.shape) or zeros.device != blocks.device:
            raise ValueError(
                f"zeros: expected shape {tuple(scales.shape)} (that of scales) on {blocks.device}, "
                f"got {tuple(zeros.shape)} on {zeros.device}"
            )


def dequantize_blocks(blocks: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """``[nnz, bm, bk]`` float blocks in ``scales.dtype`` (computed in fp32, rounded once)."""
    nnz, bm, groups = scales.shape
    z = None if zeros is None else zeros.reshape(nnz * bm, groups)
    w = q.dequantize(blocks.reshape(nnz * bm, blocks.shape[2]), scales.reshape(nnz * bm, groups), z)
    return w.reshape(nnz, bm, block_width(blocks))


def bsr_to_dense(crow: torch.Tensor, col: torch.Tensor, blocks: torch.Tensor, k: int) -> torch.Tensor:
    """Dense ``[out, k]`` tensor from BSR parts."""
    nnz, bm, bk = blocks.shape
    rows = crow.numel() - 1
    dense = torch.zeros(rows, k // bk, bm, bk, dtype=blocks.dtype, device=blocks.device)
    row_of = torch.repeat_interleave(torch.arange(rows, device=crow.device), (crow[1:] - crow[:-1]).long())
    dense[row_of, col.long()] = blocks
    return dense.permute(0, 2, 1, 3).reshape(rows * bm, k)


def check_bsr_indices(
    crow: torch.Tensor, col: torch.Tensor, nnz: int, kb: int, names: tuple[str, str] = ("crow_indices", "col_indices")
) -> None:
    """``crow`` starts at 0, never decreases and ends at ``nnz``; every ``col`` lies in
    ``0..kb-1`` and increases strictly within a block row. The C++ ops run the same checks in the
    same order and words (csrc/cpu/op_checks.h), so every backend names the same first bad entry.
    ``names``: what the caller calls the two tensors (``crow``/``col`` in the ops)."""
    crow_name, col_name = names
    crow, col = crow.long(), col.long()
    if int(crow[0]) != 0 or int(crow[-1]) != nnz:
        raise ValueError(
            f"{crow_name}: expected to start at 0 and end at nnz={nnz}, got {int(crow[0])}..{int(crow[-1])}"
        )
    step = crow[1:] - crow[:-1]
    if (step < 0).any():
        raise ValueError(f"{crow_name}: decreases at block row {int((step < 0).nonzero()[0])}")
    _check_block_cols(col, step, kb, col_name, lambda r: f"block row {r}")


def _check_block_cols(col: torch.Tensor, step: torch.Tensor, kb: int, col_name: str, row_name) -> None:
    """Every ``col`` (int64) in ``0..kb-1``, strictly increasing within each block row; ``step``:
    each block row's block count (crow already checked); ``row_name(r)`` names block row r."""
    if not col.numel():
        return
    bad = ((col < 0) | (col >= kb)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"{col_name}: entry {i} is {int(col[i])}, out of range 0..{kb - 1}")
    row_of = torch.repeat_interleave(torch.arange(step.numel(), device=col.device), step)
    bad = ((row_of[1:] == row_of[:-1]) & (col[1:] <= col[:-1])).nonzero()
    if bad.numel():
        i = int(bad[0]) + 1
        raise ValueError(f"{col_name}: {row_name(int(row_of[i]))} has columns out of order or repeated at entry {i}")


def check_bsr_grouped_indices(crow: torch.Tensor, col: torch.Tensor, nnz: int, kb: int) -> None:
    """Stacked experts' indices (module docstring): ``crow [E, block_rows + 1]`` runs from 0 to
    ``nnz`` without a gap or step back between experts, and every block row's ``col`` lies in
    ``0..kb-1`` and increases strictly. Same checks, order and words as the C++ op
    (csrc/cpu/op_checks.h ``check_bsr_grouped_indices``), so both name the same first bad entry."""
    crow, col = crow.long(), col.long()
    if int(crow[0, 0]) != 0 or int(crow[-1, -1]) != nnz:
        raise ValueError(
            f"crow: expected to start at 0 and end at nnz={nnz}, got {int(crow[0, 0])}..{int(crow[-1, -1])}"
        )
    gap = (crow[1:, 0] != crow[:-1, -1]).nonzero()
    if gap.numel():
        e = int(gap[0]) + 1
        raise ValueError(
            f"crow: expert {e} starts at {int(crow[e, 0])}, expected {int(crow[e - 1, -1])} (where expert {e - 1} ends)"
        )
    block_rows = crow.shape[1] - 1
    down = (crow[:, 1:] < crow[:, :-1]).flatten().nonzero()
    if down.numel():
        e, r = divmod(int(down[0]), block_rows)
        raise ValueError(f"crow: decreases at expert {e} block row {r}")
    # Every expert's block rows, end to end, are one weight's block rows over the shared col.
    step = (crow[:, 1:] - crow[:, :-1]).flatten()
    _check_block_cols(col, step, kb, "col", lambda r: "expert {} block row {}".format(*divmod(r, block_rows)))


@dataclass(frozen=True, eq=False)
class BlockSparseWeight:
    """A ``[out_features, in_features]`` weight stored as its non-zero blocks (quantized: with
    ``scales`` and optional ``zeros``, see the module docstring)."""

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    blocks: torch.Tensor
    shape: tuple[int, int]
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("crow_indices", "col_indices", "blocks"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"{name}: expected torch.Tensor, got {type(getattr(self, name)).__name__}")
        if self.blocks.dim() != 3:
            raise ValueError(f"blocks: expected [nnz, bm, bk], got shape {tuple(self.blocks.shape)}")
        if q.quant_of(self.blocks) is None:
            check_dtype("blocks", self.blocks)
            if self.scales is not None or self.zeros is not None:
                raise ValueError(
                    f"scales/zeros: only quantized (int8 / uint8) blocks take them, got blocks of {self.blocks.dtype}"
                )
        bm, bk = check_block(self.block)
        if q.quant_of(self.blocks) is not None:
            check_quant_blocks(self.blocks, self.scales, self.zeros, bk)
        out, k = self.shape
        if out % bm or k % bk:
            raise ValueError(f"block: {(bm, bk)} does not divide the weight shape {self.shape}")
        for name in ("crow_indices", "col_indices"):
            t = getattr(self, name)
            if t.dtype != torch.int32 or t.dim() != 1:
                raise TypeError(f"{name}: expected a 1-D int32 tensor, got {t.dtype} of shape {tuple(t.shape)}")
            if t.device != self.blocks.device:
                raise ValueError(f"{name}: expected device {self.blocks.device} (that of blocks), got {t.device}")
        if self.crow_indices.numel() != out // bm + 1:
            raise ValueError(f"crow_indices: expected {out // bm + 1} entries, got {self.crow_indices.numel()}")
        if self.col_indices.numel() != self.blocks.shape[0]:
            raise ValueError(
                f"col_indices: expected {self.blocks.shape[0]} entries (one per block), got {self.col_indices.numel()}"
            )

    @classmethod
    def from_dense(
        cls,
        dense: torch.Tensor,
        block=(32, 32),
        sparsity: float | None = None,
        quant: str | None = None,
        group_size: int = 0,
        symmetric: bool = True,
    ) -> BlockSparseWeight:
        """Keep the non-zero blocks, or with ``sparsity`` the top ``1 - sparsity`` blocks by norm.
        With ``quant`` (``"int8"``/``"int4"``) the kept blocks are then quantized (:meth:`quantize`)."""
        if not isinstance(dense, torch.Tensor):
            raise TypeError(f"dense: expected torch.Tensor, got {type(dense).__name__}")
        check_dtype("dense", dense)
        if dense.dim() != 2:
            raise ValueError(
                f"dense: expected a 2-D [out_features, in_features] tensor, got shape {tuple(dense.shape)}"
            )
        bm, bk = check_block(block)
        out, k = dense.shape
        if out % bm or k % bk:
            raise ValueError(f"block: {(bm, bk)} does not divide the weight shape {(out, k)}")
        if quant is not None:  # before any work: a bad quant / group_size is the caller's first error
            q.check_quant(quant)
            check_group_size(group_size, bk)
        tiles = dense.detach().reshape(out // bm, bm, k // bk, bk).permute(0, 2, 1, 3)
        if sparsity is None:
            keep = (tiles != 0).flatten(2).any(-1)
        else:
            if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
                raise ValueError(f"sparsity: expected a fraction in [0, 1), got {sparsity!r}")
            norms = tiles.float().flatten(2).norm(dim=-1).flatten()
            n_keep = max(1, round((1.0 - sparsity) * norms.numel()))
            keep = torch.zeros_like(norms, dtype=torch.bool)
            keep[torch.sort(norms, descending=True, stable=True).indices[:n_keep]] = True
            keep = keep.view(out // bm, k // bk)
        counts = keep.sum(1)
        crow = torch.zeros(out // bm + 1, dtype=torch.int32, device=dense.device)
        crow[1:] = counts.cumsum(0)
        rows, cols = keep.nonzero(as_tuple=True)
        blocks = tiles[rows, cols].contiguous()
        weight = cls(crow, cols.to(torch.int32), blocks, (out, k))
        return weight if quant is None else weight.quantize(quant, group_size, symmetric)

    def quantize(
        self, quant: str, group_size: int = 0, symmetric: bool = True, *, scale=None, zero=None
    ) -> BlockSparseWeight:
        """This weight with its blocks rounded to ``quant`` (round to nearest), one scale per
        ``group_size`` columns of each stored block row (0: one per block row), in the blocks' dtype.
        ``scale`` / ``zero`` (fp32 ``[nnz, bm, groups]``): round onto this grid instead of each
        group's own range (blocks already on it come back exactly)."""
        q.check_quant(quant)
        if self.quant is not None:
            raise ValueError(f"quant: this weight is already {self.quant}")
        nnz, bm, bk = self.blocks.shape
        groups = check_group_size(group_size, bk)
        if scale is not None:
            scale, zero = scale.reshape(nnz * bm, groups), zero.reshape(nnz * bm, groups)
        values, scales, zeros = q.quantize(self.blocks.reshape(nnz * bm, bk), quant, groups, symmetric, scale, zero)
        return BlockSparseWeight(
            self.crow_indices, self.col_indices, values.view(nnz, bm, values.shape[1]), self.shape,
            scales.view(nnz, bm, groups), None if zeros is None else zeros.view(nnz, bm, groups),
        )  # fmt: skip

    def validate(self) -> BlockSparseWeight:
        """Check the index structure (monotone rows, in-range and increasing block columns) and,
        when quantized, the scales (finite, > 0) and zeros (in the type's range)."""
        kb = self.shape[1] // self.block[1]
        check_bsr_indices(self.crow_indices, self.col_indices, self.blocks.shape[0], kb)
        if self.scales is not None:
            g = self.scales.shape[2]
            z = None if self.zeros is None else self.zeros.reshape(-1, g)
            bm = self.blocks.shape[1]
            q.check_values(self.blocks.reshape(-1, self.blocks.shape[2]), self.scales.reshape(-1, g), z,
                           lambda r: f"block {r // bm}, row {r % bm}")  # fmt: skip
        return self

    def to_dense(self) -> torch.Tensor:
        """The dense ``[out, K]`` weight (dequantized, in :attr:`dtype`, when quantized)."""
        return bsr_to_dense(self.crow_indices, self.col_indices, self.float_values(), self.shape[1])

    def float_values(self) -> torch.Tensor:
        """The stored blocks ``[nnz, bm, bk]`` as floats (dequantized when quantized)."""
        return self.blocks if self.scales is None else dequantize_blocks(self.blocks, self.scales, self.zeros)

    def to(self, *args, **kwargs) -> BlockSparseWeight:
        """Like ``Tensor.to``: moves all tensors; a dtype applies to the floating one (``blocks``,
        or ``scales`` when quantized)."""
        if self.scales is None:
            blocks = self.blocks.to(*args, **kwargs)
            check_dtype("dtype", blocks)
            dev = blocks.device
            return BlockSparseWeight(self.crow_indices.to(dev), self.col_indices.to(dev), blocks, self.shape)
        scales = self.scales.to(*args, **kwargs)
        check_dtype("dtype", scales)
        dev = scales.device
        zeros = None if self.zeros is None else self.zeros.to(device=dev)
        return BlockSparseWeight(
            self.crow_indices.to(dev), self.col_indices.to(dev), self.blocks.to(device=dev), self.shape, scales, zeros
        )

    @property
    def block(self) -> tuple[int, int]:
        return (self.blocks.shape[1], block_width(self.blocks))

    @property
    def quant(self) -> str | None:
        """``"int8"``, ``"int4"`` or None (floating blocks)."""
        return q.quant_of(self.blocks)

    @property
    def group_size(self) -> int:
        """Columns per scale of a quantized block row (0 for floating blocks)."""
        return 0 if self.scales is None else self.block[1] // self.scales.shape[2]

    @property
    def nnz_blocks(self) -> int:
        return self.blocks.shape[0]

    @property
    def density(self) -> float:
        bm, bk = self.block
        return self.nnz_blocks * bm * bk / (self.shape[0] * self.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the weight: that of ``blocks``, or of ``scales`` when quantized."""
        return self.blocks.dtype if self.scales is None else self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def pattern(self) -> str:
        bm, bk = self.block
        return f"block{bm}x{bk}:{1 - self.density:.2f}"

    def quant_args(self) -> tuple:
        """The op's trailing arguments ``(scales, zeros)`` (None when floating)."""
        return (self.scales, self.zeros)

    def nbytes(self) -> int:
        parts = (self.blocks, self.scales, self.zeros)
        return sum(t.numel() * t.element_size() for t in parts if t is not None) + 4 * (
            self.crow_indices.numel() + self.col_indices.numel()
        )

    def __repr__(self) -> str:
        qs = "" if self.scales is None else f", quant={self.quant}, group_size={self.group_size}"
        return (
            f"BlockSparseWeight(block={self.block}, shape={self.shape}, density={self.density:.3f}, "
            f"dtype={self.dtype}{qs}, device={self.device})"
        )


def stack_bsr(
    weights: torch.Tensor | list[BlockSparseWeight], block=(32, 32), sparsity: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(crow int32 [E, out/bm + 1], col int32 [nnz_total], blocks [nnz_total, bm, bk])`` for
    ``bsr_grouped_linear``: E expert weights stacked as the module docstring lays out.

    ``weights`` is a dense ``[E, out, K]`` tensor (each expert compressed with ``block`` and
    ``sparsity`` as in :meth:`BlockSparseWeight.from_dense`) or a list of BlockSparseWeight of one
    shape, block size, dtype and device (``block`` and ``sparsity`` are then ignored).
    """
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 3:
            raise ValueError(f"weights: expected a 3-D [experts, out, in] tensor, got shape {tuple(weights.shape)}")
        weights = [BlockSparseWeight.from_dense(w, block=block, sparsity=sparsity) for w in weights]
    if not isinstance(weights, (list, tuple)) or not weights:
        raise TypeError(f"weights: expected a 3-D tensor or a non-empty list of BlockSparseWeight, got {weights!r:.80}")
    first = weights[0]
    for i, w in enumerate(weights):
        if not isinstance(w, BlockSparseWeight):
            raise TypeError(f"weights[{i}]: expected BlockSparseWeight, got {type(w).__name__}")
        if w.quant is not None:
            raise ValueError(
                f"weights[{i}]: expected float blocks, got {w.quant} (quantized experts: not supported yet)"
            )
        got, want = (w.block, w.shape, w.dtype, w.device), (first.block, first.shape, first.dtype, first.device)
        if got != want:
            raise ValueError(f"weights[{i}]: expected (block, shape, dtype, device) {want} like weights[0], got {got}")
    starts = torch.tensor([0, *[w.nnz_blocks for w in weights]], dtype=torch.int64).cumsum(0)[:-1]
    crow = torch.stack([w.crow_indices.long() + int(s) for w, s in zip(weights, starts)]).to(torch.int32)
    return crow, torch.cat([w.col_indices for w in weights]), torch.cat([w.blocks for w in weights])
