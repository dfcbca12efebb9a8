"""``SparseLinear``: a drop-in for ``nn.Linear`` whose weight is N:M or block-sparse.

The compressed tensors are the module's state: ``values``/``meta`` (N:M) or
``crow_indices``/``col_indices``/``blocks`` (BSR), plus ``bias``. Floating tensors are
``nn.Parameter`` so ``.half()``, ``.to(dtype)`` and optimisers see them; index tensors are int32
buffers, which ``Module.to(dtype)`` leaves alone by design. No dense copy of the weight is kept.

HF GPT-2's ``Conv1D`` (``y = x @ W + b`` with ``W [in, out]``) converts too: the weight is
transposed once, and the resulting layer computes the same function as the Conv1D.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.formats.bsr import BlockSparseWeight
from sparsekern.formats.nm import NMSparseWeight

_NM_TENSORS = ("values", "meta")
_BSR_TENSORS = ("crow_indices", "col_indices", "blocks")


def is_conv1d(module: nn.Module) -> bool:
    """HF ``transformers.pytorch_utils.Conv1D`` (matched by name: transformers is optional)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """``[out, in]`` weight of an ``nn.Linear`` or a ``Conv1D`` (a view, not a copy)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.t()
    raise TypeError(f"module: expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module."""
    out, k = dense_weight(module).shape
    return k, out


class SparseLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` held as an :class:`NMSparseWeight` or :class:`BlockSparseWeight`."""

    def __init__(
        self, weight: NMSparseWeight | BlockSparseWeight, bias: torch.Tensor | None = None, requires_grad: bool = False
    ) -> None:
        super().__init__()
        if not isinstance(weight, (NMSparseWeight, BlockSparseWeight)):
            raise TypeError(f"weight: expected NMSparseWeight or BlockSparseWeight, got {type(weight).__name__}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        if isinstance(weight, NMSparseWeight):
            self.n, self.m, self.block = weight.n, weight.m, None
            self.values = nn.Parameter(weight.values.detach(), requires_grad=requires_grad)
            self.register_buffer("meta", weight.meta.detach())
        else:
            self.n = self.m = None
            self.block = weight.block
            self.register_buffer("crow_indices", weight.crow_indices.detach())
            self.register_buffer("col_indices", weight.col_indices.detach())
            self.blocks = nn.Parameter(weight.blocks.detach(), requires_grad=requires_grad)
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,):
                got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"bias: expected a tensor of shape {(self.out_features,)}, got {got}")
            bias = nn.Parameter(bias.detach().to(device=weight.device, dtype=weight.dtype), requires_grad=requires_grad)
        self.bias = bias

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        pattern="2:4",
        method: str | None = "magnitude",
        *,
        act_norm: torch.Tensor | None = None,
        hessian: torch.Tensor | None = None,
    ) -> SparseLinear:
        """Prune ``linear`` (``nn.Linear`` or ``Conv1D``) to ``pattern`` with ``method``, then compress.

        ``method=None`` takes the weight as it is: it must already follow the pattern (a layer
        pruned elsewhere); nothing is re-pruned. ``pattern`` is a string such as ``"2:4"`` or
        ``"block32x32:0.9"``, or a :class:`sparsekern.prune.Pattern`.
        """
        from sparsekern.prune import parse_pattern, prune_weight

        pat = parse_pattern(pattern) if isinstance(pattern, str) else pattern
        if pat.kind == "unstructured":
            raise ValueError(
                f"pattern: SparseLinear holds N:M or block weights, got {str(pat)!r}; unstructured sparsity "
                "has no kernel here (sparsify() keeps such layers as dense nn.Linear with zeroed weights)"
            )
        weight = dense_weight(linear).detach()
        with torch.no_grad():
            if method is not None:
                weight, _ = prune_weight(weight, pat, method, act_norm=act_norm, hessian=hessian)
            weight = weight.to(dense_weight(linear).dtype)
            if pat.kind == "nm":
                sparse = NMSparseWeight.from_dense(weight, n=pat.n, m=pat.m)
            else:
                sparse = BlockSparseWeight.from_dense(weight, block=tuple(pat.block))
        requires_grad = bool(linear.weight.requires_grad)
        return cls(sparse, linear.bias, requires_grad=requires_grad)

    # -- views -------------------------------------------------------------------------------

    @property
    def sparse_weight(self) -> NMSparseWeight | BlockSparseWeight:
        """The weight as a format object sharing this module's tensors."""
        shape = (self.out_features, self.in_features)
        if self.block is None:
            return NMSparseWeight(self.values, self.meta, self.n, self.m, shape)
        return BlockSparseWeight(self.crow_indices, self.col_indices, self.blocks, shape)

    @property
    def weight(self) -> torch.Tensor:
        """Dense ``[out, in]`` weight, decompressed on each access (read-only; for code that inspects
        ``layer.weight.dtype``/``.device``/``.shape``). It is not stored."""
        return self.sparse_weight.to_dense()

    @property
    def kind(self) -> str:
        return "nm" if self.block is None else "block"

    @property
    def pattern(self) -> str:
        """``"2:4"`` for N:M; ``"block32x32:0.90"`` (achieved block sparsity) for BSR."""
        return self.sparse_weight.pattern

    @property
    def dtype(self) -> torch.dtype:
        return (self.values if self.block is None else self.blocks).dtype

    @property
    def device(self) -> torch.device:
        return (self.values if self.block is None else self.blocks).device

    def tensor_names(self) -> tuple[str, ...]:
        return _NM_TENSORS if self.block is None else _BSR_TENSORS

    def nbytes(self) -> int:
        """Bytes held by the weight and bias."""
        extra = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.sparse_weight.nbytes() + extra

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` computing the same function (the masked dense weight)."""
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.device, dtype=self.dtype
        )
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.weight.requires_grad_(self.dtype_param().requires_grad)
        return lin

    def dtype_param(self) -> nn.Parameter:
        """The floating parameter holding the kept weights (``values`` or ``blocks``)."""
        return self.values if self.block is None else self.blocks

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The public ops pick the backend (C++ CPU, Triton, CUDA, reference); nothing here
        # knows which one runs.
        if self.block is None:
            return torch.ops.sparsekern.nm_linear(x, self.values, self.meta, self.n, self.m, self.bias)
        return torch.ops.sparsekern.bsr_linear(x, self.crow_indices, self.col_indices, self.blocks, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"pattern={self.pattern}"
        )

    # -- state dict --------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # A BSR weight's block count depends on the data; resize to the incoming tensors so a
        # state dict from another pruning of the same layer loads (N:M shapes are fixed).
        if self.block is not None:
            blocks, col = state_dict.get(prefix + "blocks"), state_dict.get(prefix + "col_indices")
            if isinstance(blocks, torch.Tensor) and isinstance(col, torch.Tensor):
                if blocks.dim() != 3 or tuple(blocks.shape[1:]) != tuple(self.block):
                    errors.append(
                        f"{prefix}blocks: expected [nnz, {self.block[0]}, {self.block[1]}], got {tuple(blocks.shape)}"
                    )
                    return
                if blocks.shape[0] != self.blocks.shape[0]:
                    self.blocks.data = self.blocks.new_empty(blocks.shape)
                    self.col_indices = self.col_indices.new_empty(col.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
