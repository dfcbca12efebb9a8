"""Mask selection for N:M, block and unstructured sparsity (magnitude, Wanda, SparseGPT, ADMM),
calibration statistics, and structured pruning that shrinks models (heads, MLP channels, layers).

``compute_mask`` and ``prune_weight`` work on one ``[out_features, in_features]`` weight (an
``nn.Linear`` weight; transpose a GPT-2 ``Conv1D`` weight first). Masks are True where kept.
"""

from __future__ import annotations

import torch

from sparsekern.prune.admm import admm_prune, reconstruction_error
from sparsekern.prune.calibration import ActivationStats, collect_stats
from sparsekern.prune.experts import ExpertStats, drop_experts, prune_experts
from sparsekern.prune.magnitude import layer_sparsity_ratios, magnitude_mask
from sparsekern.prune.patterns import Pattern, check_divisible, check_mask, check_weight, parse_pattern
from sparsekern.prune.sparsegpt import sparsegpt_prune
from sparsekern.prune.structured import drop_layers, prune_heads, prune_mlp_channels
from sparsekern.prune.wanda import wanda_mask

METHODS = ("magnitude", "wanda", "sparsegpt", "admm")


def _prepare(weight, pattern, method) -> Pattern:
    check_weight(weight)
    pattern = parse_pattern(pattern)
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    check_divisible(tuple(weight.shape), pattern)
    return pattern


def compute_mask(
    weight: torch.Tensor,
    pattern: str | Pattern,
    method: str = "magnitude",
    *,
    act_norm: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """Bool keep-mask ``[out, in]`` satisfying ``pattern`` exactly.

    ``scores`` (same shape as ``weight``) overrides the method's importance: the largest are kept,
    with magnitude's grouping (N:M groups, block L2 norms, layer-wide unstructured). ``sparsegpt``
    needs ``hessian``; its mask depends on the reconstruction, so this runs the full prune.
    """
    pattern = _prepare(weight, pattern, method)
    if scores is not None:
        if not isinstance(scores, torch.Tensor) or scores.shape != weight.shape:
            got = list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"scores: expected a tensor of the weight's shape {list(weight.shape)}, got {got}")
        return magnitude_mask(weight, pattern, scores=scores.to(weight.device))
    if method == "magnitude":
        return magnitude_mask(weight, pattern)
    if method == "wanda":
        return wanda_mask(weight, pattern, act_norm)
    if method == "admm":
        return admm_prune(weight, pattern, hessian)[1]
    return sparsegpt_prune(weight, pattern, hessian, blocksize=blocksize, percdamp=percdamp)[1]


def prune_weight(
    weight: torch.Tensor,
    pattern: str | Pattern,
    method: str = "magnitude",
    *,
    act_norm: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new_weight, mask)``: zeros where pruned, same dtype and device as ``weight``.

    For ``magnitude`` and ``wanda``, ``new_weight == weight * mask``. For ``sparsegpt`` (OBS
    reconstruction) and ``admm`` (Wanda-initialised mask, ADMM refit; both need ``hessian``) the
    kept weights are also updated, so in general they differ from ``weight``.
    """
    pattern = _prepare(weight, pattern, method)
    if method == "admm":
        return admm_prune(weight, pattern, hessian, percdamp=percdamp)
    if method == "sparsegpt":
        return sparsegpt_prune(weight, pattern, hessian, blocksize=blocksize, percdamp=percdamp)
    mask = compute_mask(weight, pattern, method, act_norm=act_norm)
    return torch.where(mask, weight.detach(), torch.zeros((), dtype=weight.dtype, device=weight.device)), mask


def prune_quantized(
    weight: torch.Tensor,
    pattern: str | Pattern,
    method: str,
    quant: str,
    group_size: int = 0,
    symmetric: bool = True,
    *,
    act_norm: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
):
    """Prune ``weight`` to an N:M or block ``pattern`` and quantize the kept weights: an
    :class:`~sparsekern.formats.nm.NMSparseWeight` with int8 / int4 values or a
    :class:`~sparsekern.formats.bsr.BlockSparseWeight` with int8 / int4 blocks. SparseGPT rounds
    inside its sweep (pruning and rounding errors compensated together, see
    :mod:`sparsekern.prune.sparsegpt`); the other methods prune, then round to nearest."""
    from sparsekern.formats import quant as qfmt
    from sparsekern.formats.bsr import BlockSparseWeight, check_group_size
    from sparsekern.formats.nm import NMSparseWeight

    pattern = _prepare(weight, pattern, method)
    qfmt.check_quant(quant)
    if pattern.kind not in ("nm", "block"):
        raise ValueError(f"quant: int8/int4 values are implemented for N:M and block patterns, got {str(pattern)!r}")
    if pattern.kind == "block":
        check_group_size(group_size, pattern.block[1])
    if method != "sparsegpt":
        pruned, _ = prune_weight(weight, pattern, method, act_norm=act_norm, hessian=hessian, percdamp=percdamp)
        if pattern.kind == "block":
            return BlockSparseWeight.from_dense(pruned, tuple(pattern.block), quant=quant, group_size=group_size,
                                                symmetric=symmetric)  # fmt: skip
        return NMSparseWeight.from_dense(pruned, pattern.n, pattern.m).quantize(quant, group_size, symmetric)
    grid = (quant, group_size, symmetric)
    pruned, _, scale, zero = sparsegpt_prune(
        weight, pattern, hessian, blocksize=blocksize, percdamp=percdamp, quant=grid
    )
    # The kept weights already lie on the grid: their integers are recovered exactly.
    if pattern.kind == "block":
        sparse = BlockSparseWeight.from_dense(pruned, tuple(pattern.block))
        return sparse.quantize(
            quant, group_size, symmetric, scale=_of_blocks(sparse, scale), zero=_of_blocks(sparse, zero)
        )
    sparse = NMSparseWeight.from_dense(pruned, pattern.n, pattern.m)
    return sparse.quantize(quant, group_size, symmetric, scale=scale, zero=zero)


def _of_blocks(sparse, grid: torch.Tensor) -> torch.Tensor:
    """A dense-column grid ``[out, K / group]`` (groups inside blocks) cut to the stored blocks'
    ``[nnz, bm, bk / group]``, the layout of their scales."""
    (bm, bk), (out, k) = sparse.block, sparse.shape
    per = bk // (k // grid.shape[1])  # groups per block row
    crow = sparse.crow_indices.long()
    rb = torch.repeat_interleave(torch.arange(out // bm, device=grid.device), crow[1:] - crow[:-1])
    return grid.reshape(out // bm, bm, k // bk, per)[rb, :, sparse.col_indices.long()]


__all__ = [
    "drop_experts",
    "ExpertStats",
    "prune_experts",
    "prune_quantized",
    "ActivationStats",
    "METHODS",
    "admm_prune",
    "Pattern",
    "check_mask",
    "collect_stats",
    "compute_mask",
    "drop_layers",
    "layer_sparsity_ratios",
    "parse_pattern",
    "prune_heads",
    "prune_mlp_channels",
    "prune_weight",
    "reconstruction_error",
]
