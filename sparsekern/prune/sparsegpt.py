"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with layer-wise OBS reconstruction.

For a layer ``Y = X W^T`` with Hessian ``H = sum_t x_t x_t^T`` of its inputs, the weights are
visited column by column; pruning (or keeping) column j leaves an error that is spread over the
columns not yet visited through the row of ``chol(H^-1)`` (the OBS update restricted to the
remaining columns). Columns are processed in blocks of ``blocksize`` with lazy updates of the
columns after the block, as in the paper. Which weights go is chosen on the fly with the OBS
saliency ``w^2 / [H^-1]_jj^2``: per block of columns for unstructured sparsity, at each group
start for N:M (the paper's semi-structured variant). Block patterns choose their blocks once up
front (summed saliency, with the inverse of the full Hessian) and then reconstruct with that mask.
All math is fp32; the result is cast back to the weight's dtype.

With ``quant`` (N:M and block patterns) the kept weights are also rounded onto an int8 / int4
grid inside an OBS sweep, as GPTQ does: each kept weight is rounded as its column is visited and
its rounding error is spread over the columns not yet visited. A first, unquantized SparseGPT
pass chooses the mask, compensates the pruning and sets each group's scale / zero from its result
(a grid set from the weights before pruning clips the larger values the compensation moves them
to: SmolLM2-sized layers lost more with int8 per row than plain rounding). The rounding sweep
then starts from that result and visits the columns in decreasing order of ``H_jj`` (GPTQ's
act-order with static groups; the mask and the groups stay those of the natural column order).
A block pattern's groups are runs of ``group_size`` columns inside a block (the block width when
0), the scale groups of :mod:`sparsekern.formats.bsr`: a kept block row's run is exactly one
group of the grid.
"""

from __future__ import annotations

import contextlib

import torch

from sparsekern.formats import quant as qfmt
from sparsekern.formats.bsr import check_group_size
from sparsekern.prune.patterns import Pattern, block_mask, tile_view


def check_hessian(hessian, in_features: int, method: str = "sparsegpt") -> torch.Tensor:
    if hessian is None:
        raise ValueError(
            f"hessian: method {method!r} needs the layer's input Hessian sum(x x^T), shape "
            f"[{in_features}, {in_features}] (collect it with collect_stats(..., need=('norm', 'hessian'))), got None"
        )
    if not isinstance(hessian, torch.Tensor):
        raise TypeError(f"hessian: expected torch.Tensor, got {type(hessian).__name__}")
    if hessian.shape != (in_features, in_features):
        raise ValueError(
            f"hessian: expected shape [{in_features}, {in_features}] (in_features), got {list(hessian.shape)}"
        )
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian: has NaN or Inf entries")
    return hessian


def _inverse_cholesky(hessian: torch.Tensor, w: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened ``H^-1``; zeroes ``w``'s columns for dead inputs."""
    h = hessian.to(device=w.device, dtype=torch.float32).clone()
    dead = torch.diag(h) == 0
    # An input that is always zero carries no information: its weights can go at no cost.
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    try:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(hinv, upper=True)
    except torch.linalg.LinAlgError as exc:
        raise ValueError(
            f"hessian: not positive definite after dampening with percdamp={percdamp} "
            f"(try a larger percdamp or more calibration tokens): {exc}"
        ) from None


@contextlib.contextmanager
def _one_thread(device: torch.device):
    # NOTE: the column loop is a long chain of tiny ops on [rows] vectors, where OpenMP's fork/join
    # costs more than the work: 384x384 2:4 took 6.1 s with 2 threads vs 0.28 s with 1 on the
    # shared 2-core box (load ~7). The lazy block updates outside this loop keep all threads.
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Fractions of each group's range tried for its grid (the least squared rounding error wins).
SHRINK = tuple(1.0 - 0.05 * i for i in range(7))


class _Grid:
    """Rounding onto one scale (and zero) per row and group of ``size`` columns, the scales set
    from the weights ``w`` (the reconstructed ones of an unquantized pass)."""

    def __init__(self, quant: str, group_size: int, symmetric: bool, dtype: torch.dtype, w: torch.Tensor) -> None:
        rows, cols = w.shape
        self.quant, self.size = quant, group_size or cols
        runs = w.float().reshape(rows, cols // self.size, self.size)
        # Clip search for symmetric grids only: SmolLM2 2:4 int4 g64 joint, perplexity 199 -> 192
        # symmetric, but 191 -> 205 with zero points (whose range is already tight on both sides).
        self.scales, self.zeros = qfmt.scale_zero(runs, quant, symmetric, dtype, SHRINK if symmetric else (1.0,))
        # The group of each column as the sweep visits them (a permuted sweep visits them out of
        # order); a list: read once per column, where a tensor element would be a device read.
        self.group = [c // self.size for c in range(cols)]
        self.g = -1

    def column(self, c: int) -> None:
        g = self.group[c]
        if g != self.g:
            self.g, self.scale, self.zero = g, self.scales[:, g], self.zeros[:, g]

    def round(self, col: torch.Tensor) -> torch.Tensor:
        q = qfmt.to_integers(col.unsqueeze(-1), self.scale, self.zero, self.quant).squeeze(-1)
        return (q - self.zero) * self.scale


def _columns(w1, q1, err1, u1, d1, prune1, pattern: Pattern, grid: _Grid | None = None, c0: int = 0) -> None:
    """The sequential OBS sweep over one block of columns (updates the block's tensors in place);
    ``c0``: the block's first column in the weight. With a ``grid`` the mask is fixed (given in
    ``prune1``) and kept weights are rounded onto it."""
    for i in range(w1.shape[1]):
        if grid is None and pattern.kind == "nm" and i % pattern.m == 0:
            sal = w1[:, i : i + pattern.m] ** 2 / d1[i : i + pattern.m].unsqueeze(0) ** 2
            lowest = torch.sort(sal, dim=1, stable=True).indices[:, : pattern.m - pattern.n]
            prune1.scatter_(1, i + lowest, True)
        if grid is not None:
            grid.column(c0 + i)
        col = w1[:, i]
        kept = col if grid is None else grid.round(col)
        q = torch.where(prune1[:, i], torch.zeros_like(col), kept)
        q1[:, i] = q
        e = (col - q) / d1[i]
        w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
        err1[:, i] = e


def sparsegpt_prune(
    weight: torch.Tensor,
    pattern: Pattern,
    hessian: torch.Tensor,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    quant: tuple[str, int, bool] | None = None,
    act_order: bool = True,
) -> tuple[torch.Tensor, ...]:
    """``(pruned and reconstructed weight, keep mask)``; see the module docstring. With ``quant``
    = ``(quant, group_size, symmetric)`` (N:M and block patterns) the kept weights come out on the grid and
    ``(weight, keep, scales, zeros)`` is returned, scales / zeros fp32 ``[rows, groups]`` (block
    patterns: groups of ``group_size`` columns, the block width when 0);
    ``act_order=False`` rounds left to right from the original weights, the pruning compensated
    again in the same sweep (the method before act-order; kept for comparison)."""
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize: expected a positive int, got {blocksize!r}")
    if not isinstance(percdamp, (int, float)) or not percdamp >= 0:
        raise ValueError(f"percdamp: expected a non-negative float, got {percdamp!r}")
    cols = weight.shape[1]
    check_hessian(hessian, cols)
    w = weight.detach().float().clone()
    u = _inverse_cholesky(hessian, w, float(percdamp))

    fixed = None
    if pattern.kind == "block":
        # diag of H^-1 from its Cholesky factor: [H^-1]_jj = sum_i U_ij^2.
        hinv_diag = (u * u).sum(0)
        saliency = w**2 / hinv_diag.unsqueeze(0) ** 2
        fixed = ~block_mask(tile_view(saliency, pattern.block).sum(-1), pattern.block, pattern.sparsity)
    if pattern.kind == "nm":
        # N:M groups must not straddle a block of columns.
        blocksize = -(-blocksize // pattern.m) * pattern.m
    if quant is None:
        w, keep = _sweep(w, u, pattern, blocksize, fixed)
        return w.to(weight.dtype), keep
    if pattern.kind not in ("nm", "block"):
        raise ValueError(f"quant: joint quantization is implemented for N:M and block patterns, got {pattern}")
    qname, group_size, symmetric = quant
    if pattern.kind == "nm":
        qfmt.groups_of(group_size, cols, pattern.m)
    else:
        group_size = pattern.block[1] // check_group_size(group_size, pattern.block[1])
    qfmt.check_quant(qname)
    # The unquantized pass chooses the mask and the grid; the second sweep (same H^-1) rounds.
    first, keep = _sweep(w.clone(), u, pattern, blocksize, fixed)
    grid = _Grid(qname, group_size, symmetric, weight.dtype, first.to(weight.dtype))
    if not act_order:
        w, keep = _sweep(w, u, pattern, blocksize, ~keep, grid)
        return w.to(weight.dtype), keep, grid.scales, grid.zeros
    # Act-order: the rounding sweep starts from the first pass's weights (pruned and compensated)
    # and visits the columns by decreasing H_jj, the groups fixed up front: the inputs that matter
    # most are rounded first, while the most columns are left to absorb their error. (Started from
    # there in the natural order, it gives exactly the sweep above: only the order differs.)
    # NOTE: SmolLM2-135M 2:4 int4 g64 joint, perplexity, bf16. 16 x 256 calibration tokens
    # (unquantized 2:4: 167.0): left to right symmetric 192.0 / zero points 190.9, act-order 174.8
    # / 177.2. 32 x 256 (unquantized 153.4): zero points 177.4 -> 160.5, act-order symmetric 166.0.
    # Tried and dropped: act-order from the original weights, the pruning compensated again in the
    # new order (183.7 / 175.5 at 16 x 256, 170.1 zero points at 32 x 256; on a random layer 4-5x
    # the added output error of left to right: the mask was chosen in the natural order); per
    # layer the order with the smaller tr(dW H dW^T) (189.0 / 199.0: a layer's own error did not
    # predict the model's).
    order = torch.argsort(torch.diag(hessian).to(w.device), descending=True, stable=True)
    w = first[:, order].clone()
    u = _inverse_cholesky(hessian.to(w.device)[order][:, order], w, float(percdamp))
    grid.group = [grid.group[c] for c in order.tolist()]
    w, _ = _sweep(w, u, pattern, blocksize, ~keep[:, order], grid)
    w = w[:, torch.argsort(order)]
    return w.to(weight.dtype), keep, grid.scales, grid.zeros


def _sweep(w, u, pattern: Pattern, blocksize: int, fixed, grid: _Grid | None = None):
    """The OBS sweep over ``w`` (fp32, updated in place) in blocks of columns with lazy updates:
    ``(weight with exact zeros where pruned, keep mask)``. ``fixed``: a given pruned mask (block
    patterns, or the joint pass's second sweep), else chosen on the fly."""
    rows, cols = w.shape
    prune = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)  # True = pruned
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diag(u1)
        if fixed is not None:
            prune1 = fixed[:, i1:i2].clone()
        elif pattern.kind == "unstructured":
            # Cumulative rounding so the per-block counts add up to round(sparsity * numel).
            n_prune = round(pattern.sparsity * rows * i2) - round(pattern.sparsity * rows * i1)
            saliency = (w1**2 / d1.unsqueeze(0) ** 2).flatten()
            prune1 = torch.zeros(rows * (i2 - i1), dtype=torch.bool, device=w.device)
            prune1[torch.sort(saliency, stable=True).indices[:n_prune]] = True
            prune1 = prune1.view(rows, i2 - i1)
        else:
            prune1 = torch.zeros_like(w1, dtype=torch.bool)

        with _one_thread(w.device):
            _columns(w1, q1, err1, u1, d1, prune1, pattern, grid, i1)

        w[:, i1:i2] = q1
        prune[:, i1:i2] = prune1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    keep = ~prune
    # Exact zeros where pruned (q is already 0 there; this also guards -0.0/NaN from dead inputs).
    return torch.where(keep, w, torch.zeros_like(w)), keep
