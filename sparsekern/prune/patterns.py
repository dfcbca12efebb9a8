"""Sparsity patterns ("2:4", "block32x32:0.9", "unstructured:0.5") and mask selection by score.

A mask is a bool tensor shaped like the ``[out, in]`` weight, True where the weight is kept.
Every selector here keeps the highest scores; ties go to the lower index (stable sort), the
same rule as ``NMSparseWeight.from_dense(prune=True)`` and ``BlockSparseWeight.from_dense``,
so a mask made here and the formats' own pruning agree on magnitude scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from sparsekern.formats.bsr import check_block
from sparsekern.formats.nm import check_nm

ACCEPTED = '"N:M" (e.g. "2:4", "1:4", "4:8"), "blockRxC:S" (e.g. "block32x32:0.9") or "unstructured:S" (0 <= S < 1)'
_NM = re.compile(r"^(\d+):(\d+)$")
_BLOCK = re.compile(r"^block(\d+)x(\d+):([0-9.eE+-]+)$")
_UNSTRUCTURED = re.compile(r"^unstructured:([0-9.eE+-]+)$")


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern; ``sparsity`` is the fraction of weights removed."""

    kind: str  # "nm" | "block" | "unstructured"
    n: int = 0
    m: int = 0
    block: tuple[int, int] | None = None
    sparsity: float = 0.0

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block{self.block[0]}x{self.block[1]}:{self.sparsity!r}"
        return f"unstructured:{self.sparsity!r}"


def _fraction(text: str, spec: str) -> float:
    try:
        s = float(text)
    except ValueError:
        s = float("nan")
    if not 0.0 <= s < 1.0:  # also refuses NaN
        raise ValueError(f"pattern: sparsity in {spec!r} must be a fraction in [0, 1), got {text!r}")
    return s


def parse_pattern(p: str | Pattern) -> Pattern:
    """Parse a pattern string (a ``Pattern`` passes through). ``ValueError`` names the accepted forms."""
    if isinstance(p, Pattern):
        return p
    if not isinstance(p, str):
        raise TypeError(f"pattern: expected a str or Pattern, got {type(p).__name__} ({p!r})")
    spec = p.strip().lower()
    if mt := _NM.match(spec):
        n, m = int(mt[1]), int(mt[2])
        try:
            check_nm(n, m)
        except ValueError as exc:
            raise ValueError(f"pattern: {p!r} is not a supported N:M pattern ({exc})") from None
        return Pattern("nm", n=n, m=m, sparsity=1.0 - n / m)
    if mt := _BLOCK.match(spec):
        try:
            block = check_block((int(mt[1]), int(mt[2])))
        except ValueError as exc:
            raise ValueError(f"pattern: {p!r} has an unsupported block shape ({exc})") from None
        return Pattern("block", block=block, sparsity=_fraction(mt[3], p))
    if mt := _UNSTRUCTURED.match(spec):
        return Pattern("unstructured", sparsity=_fraction(mt[1], p))
    raise ValueError(f"pattern: cannot parse {p!r}; expected {ACCEPTED}")


def check_weight(weight) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [out_features, in_features] tensor, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight: expected a floating-point dtype, got {weight.dtype}")


def check_divisible(shape: tuple[int, int], pattern: Pattern) -> None:
    """The pattern must tile the weight: K % M == 0 for N:M, both sides for blocks."""
    out, k = shape
    if pattern.kind == "nm" and k % pattern.m:
        raise ValueError(
            f"weight: in_features={k} is not divisible by m={pattern.m} of pattern {str(pattern)!r} (shape {shape})"
        )
    if pattern.kind == "block" and (out % pattern.block[0] or k % pattern.block[1]):
        raise ValueError(f"weight: shape {shape} is not divisible by the block {pattern.block} of {str(pattern)!r}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the top-``n`` scores of every ``m`` consecutive columns of each row."""
    rows, k = scores.shape
    groups = scores.float().reshape(rows, k // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(rows, k)


def n_kept_blocks(n_blocks: int, sparsity: float) -> int:
    # Same count as BlockSparseWeight.from_dense(sparsity=...): at least one block survives.
    return max(1, round((1.0 - sparsity) * n_blocks))


def block_mask(block_scores: torch.Tensor, block: tuple[int, int], sparsity: float) -> torch.Tensor:
    """Keep the top blocks of ``block_scores [out/bm, in/bk]`` over the whole layer; expand to elements."""
    flat = block_scores.float().flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[: n_kept_blocks(flat.numel(), sparsity)]] = True
    keep = keep.view(block_scores.shape)
    return keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)


def tile_view(t: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``[out, in]`` -> ``[out/bm, in/bk, bm*bk]`` (one row per block)."""
    out, k = t.shape
    bm, bk = block
    return t.reshape(out // bm, bm, k // bk, bk).permute(0, 2, 1, 3).reshape(out // bm, k // bk, bm * bk)


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``round(sparsity * numel)`` lowest scores of the whole layer."""
    flat = scores.float().flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[: round(sparsity * flat.numel())]] = False
    return keep.view(scores.shape)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``round(sparsity * in_features)`` lowest scores of every row (Wanda's comparison group)."""
    order = torch.sort(scores.float(), dim=1, stable=True).indices
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order[:, : round(sparsity * scores.shape[1])], False)
    return keep


def check_mask(mask: torch.Tensor, pattern: str | Pattern, *, per_row: bool = False) -> None:
    """Raise ``ValueError`` unless ``mask`` satisfies ``pattern`` exactly (used by tests and callers)."""
    pattern = parse_pattern(pattern)
    out, k = mask.shape
    check_divisible((out, k), pattern)
    if pattern.kind == "nm":
        counts = mask.reshape(out, k // pattern.m, pattern.m).sum(-1)
        if (counts != pattern.n).any():
            r, g = (int(v) for v in (counts != pattern.n).nonzero()[0])
            raise ValueError(f"mask: row {r}, group {g} keeps {int(counts[r, g])}, expected {pattern.n} of {pattern.m}")
    elif pattern.kind == "block":
        tiles = tile_view(mask, pattern.block)
        if not (tiles.all(-1) | ~tiles.any(-1)).all():
            raise ValueError(f"mask: some {pattern.block} block is partly kept")
        kept, want = int(tiles.all(-1).sum()), n_kept_blocks(tiles.shape[0] * tiles.shape[1], pattern.sparsity)
        if kept != want:
            raise ValueError(f"mask: {kept} blocks kept, expected {want}")
    elif per_row:
        pruned, want = (~mask).sum(1), round(pattern.sparsity * k)
        if (pruned != want).any():
            raise ValueError(f"mask: rows prune {pruned.unique().tolist()} weights, expected {want} each")
    else:
        pruned, want = int((~mask).sum()), round(pattern.sparsity * mask.numel())
        if pruned != want:
            raise ValueError(f"mask: {pruned} weights pruned, expected {want}")
