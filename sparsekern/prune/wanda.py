"""Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs").

A weight's importance is ``|W_ij| * ||X_j||_2``: its magnitude times the L2 norm of its input
feature over the calibration tokens. Unstructured sparsity is compared within each output row
(the paper's choice: per-output groups beat a layer-wide threshold for LLMs); N:M keeps the
top-N per group, and blocks keep the largest summed score.
"""

from __future__ import annotations

import torch

from sparsekern.prune.patterns import Pattern, block_mask, nm_mask, row_mask, tile_view


def check_act_norm(act_norm, in_features: int) -> torch.Tensor:
    if act_norm is None:
        raise ValueError(
            "act_norm: method 'wanda' needs the L2 norm of the layer's input activations, shape "
            f"[{in_features}] (collect it with sparsekern.prune.collect_stats), got None"
        )
    if not isinstance(act_norm, torch.Tensor):
        raise TypeError(f"act_norm: expected torch.Tensor, got {type(act_norm).__name__}")
    if act_norm.shape != (in_features,):
        raise ValueError(f"act_norm: expected shape [{in_features}] (in_features), got {list(act_norm.shape)}")
    if not torch.isfinite(act_norm).all() or (act_norm < 0).any():
        raise ValueError("act_norm: expected finite non-negative norms, got negative, NaN or Inf entries")
    return act_norm


def wanda_scores(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs() * act_norm.to(device=weight.device, dtype=torch.float32).unsqueeze(0)


def wanda_mask(weight: torch.Tensor, pattern: Pattern, act_norm: torch.Tensor) -> torch.Tensor:
    s = wanda_scores(weight, check_act_norm(act_norm, weight.shape[1]))
    if pattern.kind == "nm":
        return nm_mask(s, pattern.n, pattern.m)
    if pattern.kind == "block":
        return block_mask(tile_view(s, pattern.block).sum(-1), pattern.block, pattern.sparsity)
    return row_mask(s, pattern.sparsity)
