"""Magnitude pruning: keep the largest |w|. Also per-layer ratios for global pruning (LAMP).

LAMP (Lee et al., 2021, "Layer-adaptive sparsity for the magnitude-based pruning") scores a
weight u of a layer as ``w_u^2 / sum_{v: |w_v| >= |w_u|} w_v^2``: its share of the energy of
the weights at least as large as it in the same layer. One global threshold on that score
gives each layer its own sparsity, and never empties a layer (its largest weight scores 1).
"""

from __future__ import annotations

import torch

from sparsekern.prune.patterns import Pattern, block_mask, layer_mask, nm_mask, tile_view


def magnitude_mask(weight: torch.Tensor, pattern: Pattern, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Mask keeping the largest ``scores`` (default ``|weight|``) under ``pattern``.

    Blocks are ranked by the L2 norm of their scores (for ``|w|``: the block's Frobenius norm,
    as ``BlockSparseWeight.from_dense`` does); unstructured sparsity is global over the layer.
    """
    s = weight.detach().float().abs() if scores is None else scores.float()
    if pattern.kind == "nm":
        return nm_mask(s, pattern.n, pattern.m)
    if pattern.kind == "block":
        return block_mask(tile_view(s, pattern.block).norm(dim=-1), pattern.block, pattern.sparsity)
    return layer_mask(s, pattern.sparsity)


def _lamp_scores(w: torch.Tensor) -> torch.Tensor:
    sq = w.detach().double().flatten() ** 2
    sq_sorted, order = torch.sort(sq, stable=True)
    # Suffix sums: the energy of this weight and every larger one.
    suffix = sq_sorted.flip(0).cumsum(0).flip(0)
    scores = torch.empty_like(sq)
    scores[order] = sq_sorted / suffix.clamp_min(torch.finfo(torch.float64).tiny)
    return scores


def layer_sparsity_ratios(weights: dict[str, torch.Tensor], target: float, method: str = "lamp") -> dict[str, float]:
    """Per-layer unstructured sparsity so that ``target`` of all weights together are removed.

    ``method="lamp"``: one threshold on LAMP scores; ``method="global"``: one threshold on |w|.
    Feed each layer's ratio to ``prune_weight(w, f"unstructured:{ratio}")``; the counts add up to
    ``round(target * total)`` exactly (up to each layer's own rounding of its ratio).
    """
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"weights: expected a non-empty dict of name -> tensor, got {type(weights).__name__}")
    if not isinstance(target, (int, float)) or not 0.0 <= target < 1.0:
        raise ValueError(f"target: expected a fraction in [0, 1), got {target!r}")
    if method not in ("lamp", "global"):
        raise ValueError(f"method: expected 'lamp' or 'global', got {method!r}")
    for name, w in weights.items():
        if not isinstance(w, torch.Tensor) or w.numel() == 0:
            raise ValueError(f"weights[{name!r}]: expected a non-empty tensor, got {type(w).__name__}")
    names = list(weights)
    per_layer = [
        _lamp_scores(weights[n]) if method == "lamp" else weights[n].detach().double().abs().flatten() for n in names
    ]
    sizes = [s.numel() for s in per_layer]
    flat = torch.cat([s.cpu() for s in per_layer])
    owner = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(sizes))
    pruned = torch.sort(flat, stable=True).indices[: round(target * flat.numel())]
    counts = torch.bincount(owner[pruned], minlength=len(names))
    return {n: int(c) / size for n, c, size in zip(names, counts.tolist(), sizes)}
