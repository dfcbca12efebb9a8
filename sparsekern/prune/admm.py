"""ADMM weight update for pruned layers (after Boza, 2024, "Fast and Effective Weight Update for
Pruned Large Language Models").

For a layer ``Y = X W^T`` with Gram matrix ``H = X^T X`` (the SparseGPT Hessian) the pruned weight
should minimise ``tr((W - W0) H (W - W0)^T)`` subject to the sparsity pattern. ADMM splits this
into a dense least-squares variable ``W``, a pattern-constrained copy ``Z`` and a scaled dual
``U``:

    W <- (W0 H + rho (Z - U)) (H + rho I)^-1      # exact ridge solve, one matmul per iteration
    Z <- project(W + U)                             # top-N of every M (or blocks, or per row)
    U <- U + W - Z

with ``rho`` growing geometrically so ``W`` and ``Z`` meet. Work happens in coordinates scaled by
``d_j = ||X_j||`` (``H`` gets a unit diagonal), where ``|w_ij| d_j`` is Wanda's score: the first
projection is Wanda's mask, and later projections move the mask where the reconstruction says
(the paper's mask update; ``mask=...`` pins it instead). The result is refined on the final mask
by batched conjugate gradient on the kept weights (each row's least-squares problem restricted to
its kept inputs), which the ADMM iterate only approaches. All math is fp32.
"""

from __future__ import annotations

import torch

from sparsekern.prune.patterns import Pattern, block_mask, nm_mask, row_mask, tile_view
from sparsekern.prune.sparsegpt import check_hessian


def _project(v: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep-mask of the pattern closest to ``v`` in L2 (largest |v| under the pattern)."""
    s = v.abs()
    if pattern.kind == "nm":
        return nm_mask(s, pattern.n, pattern.m)
    if pattern.kind == "block":
        return block_mask(tile_view(s * s, pattern.block).sum(-1), pattern.block, pattern.sparsity)
    return row_mask(s, pattern.sparsity)


def _ridge_inverse(h: torch.Tensor, rho: float) -> torch.Tensor:
    a = h.clone()
    a.diagonal().add_(rho)
    return torch.cholesky_inverse(torch.linalg.cholesky(a))


def _refit(w: torch.Tensor, w0h: torch.Tensor, h: torch.Tensor, keep: torch.Tensor, steps: int) -> torch.Tensor:
    """Conjugate gradient on ``min tr((W - W0) H (W - W0)^T)`` over the kept entries, all rows at once.

    ``w0h = W0 H``. Rows are independent problems; each carries its own step sizes.
    """
    keep_f = keep.to(w.dtype)
    r = (w0h - w @ h) * keep_f  # minus the gradient, restricted to the kept entries
    p = r.clone()
    rr = (r * r).sum(1)
    tiny = torch.finfo(w.dtype).tiny
    for _ in range(steps):
        hp = (p @ h) * keep_f
        alpha = rr / (p * hp).sum(1).clamp_min(tiny)
        w = w + alpha.unsqueeze(1) * p
        r = r - alpha.unsqueeze(1) * hp
        rr_new = (r * r).sum(1)
        p = r + (rr_new / rr.clamp_min(tiny)).unsqueeze(1) * p
        rr = rr_new
    return w * keep_f


def admm_prune(
    weight: torch.Tensor,
    pattern: Pattern,
    hessian: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    iters: int = 20,
    rho: float = 0.3,
    rho_growth: float = 1.3,
    update_mask_until: float = 0.5,
    refit_steps: int = 10,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pruned and refitted weight, keep mask)``; see the module docstring.

    ``mask`` (bool, True = keep) fixes the mask; otherwise it starts as Wanda's and may change
    during the first ``update_mask_until`` fraction of the iterations. ``rho`` is relative to the
    unit diagonal of the scaled Gram matrix; it is multiplied by ``rho_growth`` every iteration.
    """
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters: expected a positive int, got {iters!r}")
    if not isinstance(rho, (int, float)) or not rho > 0 or not isinstance(rho_growth, (int, float)) or rho_growth < 1:
        raise ValueError(f"rho, rho_growth: expected rho > 0 and rho_growth >= 1, got {rho!r}, {rho_growth!r}")
    if not isinstance(refit_steps, int) or refit_steps < 0:
        raise ValueError(f"refit_steps: expected a non-negative int, got {refit_steps!r}")
    rows, cols = weight.shape
    check_hessian(hessian, cols, "admm")
    if mask is not None and (
        not isinstance(mask, torch.Tensor) or mask.shape != weight.shape or mask.dtype != torch.bool
    ):
        raise ValueError(
            f"mask: expected a bool tensor of shape {list(weight.shape)}, got {getattr(mask, 'shape', mask)}"
        )

    h = hessian.to(device=weight.device, dtype=torch.float32)
    d = h.diagonal().clamp_min(0).sqrt()
    dead = d == 0
    # A feature that is always zero carries no information: its weights go at no cost.
    d = torch.where(dead, torch.ones_like(d), d)
    h = h / d.unsqueeze(0) / d.unsqueeze(1)
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h.diagonal().add_(percdamp)  # the same relative dampening SparseGPT uses, on a unit diagonal
    w0 = weight.detach().float() * d.unsqueeze(0)
    w0[:, dead] = 0.0
    w0h = w0 @ h

    keep = _project(w0, pattern) if mask is None else mask.to(w0.device)
    z = w0 * keep
    u = torch.zeros_like(w0)
    target, cur = float(rho), float(rho)
    inv = _ridge_inverse(h, cur)
    for it in range(iters):
        if target >= 2 * cur:
            # Re-factor only once rho has doubled (a Cholesky costs about one iteration); the scaled
            # dual U = Lambda / rho is rescaled with it.
            u *= cur / target
            cur = target
            inv = _ridge_inverse(h, cur)
        w = (w0h + cur * (z - u)) @ inv
        if mask is None and it < update_mask_until * iters:
            keep = _project(w + u, pattern)
        z = (w + u) * keep
        u = u + w - z
        target *= rho_growth
    out = _refit(z, w0h, h, keep, refit_steps) if refit_steps else z
    out = out / d.unsqueeze(0)
    out = torch.where(keep, out, torch.zeros_like(out))
    return out.to(weight.dtype), keep


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - W') H (W - W')^T)``: the squared output error over the calibration tokens."""
    delta = weight.detach().float() - pruned.float()
    return float(((delta @ hessian.float()) * delta).sum())
