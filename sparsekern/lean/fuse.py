"""One linear layer for several that read the same input (q/k/v, gate/up): their output rows stacked.

Decode runs a few hundred small linear calls per token; each call has a fixed cost (Python, the
op's plan lookup, a kernel launch on a handful of rows), so three calls for q, k and v cost about
three times one call of the stacked weight. Stacking output rows is valid for every format here:

- dense ``nn.Linear``: weights concatenated along ``out_features``;
- N:M ``SparseLinear``: groups run along ``in_features``, so the rows of q, k and v stacked are
  still an N:M weight (``values`` and ``meta`` concatenated row-wise);
- block ``SparseLinear``: block rows stacked (``crow_indices`` shifted by the blocks before them).

Layers that differ in format, pattern, block shape, dtype or device (or are of a type not listed
above) stay separate: :class:`Concat` calls each and concatenates the outputs.

The stacked layer holds its own copy of the weights: the source modules are not touched.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.formats.bsr import BlockSparseWeight
from sparsekern.formats.nm import NMSparseWeight
from sparsekern.nn.linear import SparseLinear


class Concat(nn.Module):
    """``cat([m(x) for m in mods], -1)``: the fallback where the layers cannot be stacked."""

    def __init__(self, mods: list[nn.Module]) -> None:
        super().__init__()
        self.mods = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.mods], dim=-1)


def _bias(mods: list[nn.Module], outs: list[int], like: torch.Tensor) -> torch.Tensor | None:
    """Biases stacked (zeros for a layer without one), or None when no layer has one."""
    biases = [getattr(m, "bias", None) for m in mods]
    if all(b is None for b in biases):
        return None
    return torch.cat([like.new_zeros(o) if b is None else b.detach() for b, o in zip(biases, outs)])


def _dense(mods: list[nn.Linear]) -> nn.Linear:
    w = torch.cat([m.weight.detach() for m in mods])
    bias = _bias(mods, [m.out_features for m in mods], w)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    lin.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def _scales_zeros(mods: list[SparseLinear]) -> tuple:
    """Quantized layers' scales and zeros, stacked as their rows (N:M) or blocks (BSR) are."""
    zeros = None if mods[0].zeros is None else torch.cat([m.zeros for m in mods])
    return torch.cat([m.scales.detach() for m in mods]), zeros


def _nm(mods: list[SparseLinear]) -> SparseLinear:
    first = mods[0]
    values = torch.cat([m.values.detach() for m in mods])
    meta = torch.cat([m.meta for m in mods])
    shape = (values.shape[0], first.in_features)
    quant = () if first.quant is None else (*_scales_zeros(mods), first.group_size, first.act_block)
    weight = NMSparseWeight(values, meta, first.n, first.m, shape, *quant)
    return SparseLinear(weight, _bias(mods, [m.out_features for m in mods], first.dtype_param()))


def _bsr(mods: list[SparseLinear]) -> SparseLinear:
    crows, before = [mods[0].crow_indices[:1]], 0
    for m in mods:
        crows.append(m.crow_indices[1:] + before)
        before += int(m.crow_indices[-1])
    blocks = torch.cat([m.blocks.detach() for m in mods])
    shape = (sum(m.out_features for m in mods), mods[0].in_features)
    quant = () if mods[0].quant is None else _scales_zeros(mods)
    weight = BlockSparseWeight(torch.cat(crows), torch.cat([m.col_indices for m in mods]), blocks, shape, *quant)
    return SparseLinear(weight, _bias(mods, [m.out_features for m in mods], mods[0].dtype_param()))


def _kind(m: nn.Module) -> tuple | None:
    """What must agree for two layers to stack (None: a layer type that never stacks)."""
    if type(m) is nn.Linear:
        return ("dense", m.in_features, m.weight.dtype, m.weight.device)
    if type(m) is SparseLinear:
        fmt = ("nm", m.n, m.m) if m.block is None else ("block", tuple(m.block))
        if m.quant is not None:  # quantized rows stack only with the same quantization
            fmt += (m.quant, m.group_size, m.act_block, m.zeros is None)
        return (*fmt, m.in_features, m.dtype, m.device)
    return None


def fuse_linears(mods: list[nn.Module]) -> nn.Module:
    """One module computing ``cat([m(x) for m in mods], -1)``: stacked weights where they agree."""
    kinds = {_kind(m) for m in mods}
    if len(kinds) != 1 or None in kinds:
        return Concat(mods)
    kind = kinds.pop()[0]
    with torch.no_grad():
        if kind == "dense":
            return _dense(mods)
        return _nm(mods) if kind == "nm" else _bsr(mods)
