"""``SparseLinear``: a drop-in for ``nn.Linear`` whose weight is N:M or block-sparse.

The compressed tensors are the module's state: ``values``/``meta`` (N:M) or
``crow_indices``/``col_indices``/``blocks`` (BSR), plus ``bias``. Floating tensors are
``nn.Parameter`` so ``.half()``, ``.to(dtype)`` and optimisers see them; index tensors are int32
buffers, which ``Module.to(dtype)`` leaves alone by design. The layer keeps no dense copy of the
weight; its plans (:mod:`sparsekern.plan`) may, where the dense fallback runs it, unless it was made
with ``dense_fallback=False``.

HF GPT-2's ``Conv1D`` (``y = x @ W + b`` with ``W [in, out]``) converts too: the weight is
transposed once, and the resulting layer computes the same function as the Conv1D.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from sparsekern import plan
from sparsekern.formats.bsr import BlockSparseWeight, block_width
from sparsekern.formats.nm import NMSparseWeight
from sparsekern.formats.quant import quant_of
from sparsekern.ops import BSR_LINEAR, NM_LINEAR

_NM_TENSORS = ("values", "meta")
_QNM_TENSORS = ("values", "meta", "scales", "zeros")
_BSR_TENSORS = ("crow_indices", "col_indices", "blocks")
_QBSR_TENSORS = ("crow_indices", "col_indices", "blocks", "scales", "zeros")


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
        self,
        weight: NMSparseWeight | BlockSparseWeight,
        bias: torch.Tensor | None = None,
        requires_grad: bool = False,
        dense_fallback: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(weight, (NMSparseWeight, BlockSparseWeight)):
            raise TypeError(f"weight: expected NMSparseWeight or BlockSparseWeight, got {type(weight).__name__}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.group_size = self.act_block = 0
        if isinstance(weight, NMSparseWeight) and weight.quant is not None:
            self.n, self.m, self.block, self.act_block = weight.n, weight.m, None, weight.act_block
            self.register_buffer("values", weight.values.detach())
            self.register_buffer("meta", weight.meta.detach())
            self._hold_scales(weight)
        elif isinstance(weight, NMSparseWeight):
            self.n, self.m, self.block = weight.n, weight.m, None
            self.values = nn.Parameter(weight.values.detach(), requires_grad=requires_grad)
            self.register_buffer("meta", weight.meta.detach())
        else:
            self.n = self.m = None
            self.block = weight.block
            self.register_buffer("crow_indices", weight.crow_indices.detach())
            self.register_buffer("col_indices", weight.col_indices.detach())
            if weight.quant is None:
                self.blocks = nn.Parameter(weight.blocks.detach(), requires_grad=requires_grad)
            else:
                self.register_buffer("blocks", weight.blocks.detach())
                self._hold_scales(weight)
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,):
                got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"bias: expected a tensor of shape {(self.out_features,)}, got {got}")
            bias = nn.Parameter(bias.detach().to(device=weight.device, dtype=weight.dtype), requires_grad=requires_grad)
        self.bias = bias
        self.dense_fallback = dense_fallback

    def _hold_scales(self, weight: NMSparseWeight | BlockSparseWeight) -> None:
        """A quantized weight's scales and zeros. Its integers are a buffer (no gradients,
        ``Module.to(dtype)`` leaves them alone); the scales, a parameter, carry the layer's dtype."""
        self.group_size = weight.group_size
        self.scales = nn.Parameter(weight.scales.detach(), requires_grad=False)
        self.register_buffer("zeros", None if weight.zeros is None else weight.zeros.detach())

    @property
    def dense_fallback(self) -> bool:
        """Whether the dense fallback may run this layer (keeping a dense copy of its weight).
        ``False``: no dense copy anywhere; the fastest sparse kernel runs it."""
        return self.__dict__["_dense_fallback"]

    @dense_fallback.setter
    def dense_fallback(self, allowed: bool) -> None:
        if not isinstance(allowed, bool):
            raise TypeError(f"dense_fallback: expected bool, got {type(allowed).__name__}")
        self.__dict__["_dense_fallback"] = allowed
        self._drop_plans()

    def _drop_plans(self) -> None:
        self.__dict__["_plans"] = plan.Plans(dense=self.dense_fallback)
        # The op's own plans (compile, tracing) are per weight tensor: tell them too.
        plan.set_dense_fallback(self.values if self.block is None else self.blocks, self.dense_fallback)

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
        dense_fallback: bool = True,
        quant: str | None = None,
        group_size: int = 0,
        symmetric: bool = True,
        act_block: int = 0,
    ) -> SparseLinear:
        """Prune ``linear`` (``nn.Linear`` or ``Conv1D``) to ``pattern`` with ``method``, then compress.

        ``method=None`` takes the weight as it is: it must already follow the pattern (a layer
        pruned elsewhere); nothing is re-pruned. ``pattern`` is a string such as ``"2:4"`` or
        ``"block32x32:0.9"``, or a :class:`sparsekern.prune.Pattern`. ``quant`` (``"int8"`` /
        ``"int4"``): the kept weights are then rounded to integers with one scale per
        ``group_size`` columns (0: per row for N:M, per block row for blocks), and zero points
        unless ``symmetric``, see
        :func:`sparsekern.prune.prune_quantized` (SparseGPT rounds inside its sweep); ``act_block``
        (e.g. 32, N:M only): x is rounded to int8 per block of that many columns too (integer dot
        products).
        """
        from sparsekern.prune import parse_pattern, prune_quantized, prune_weight

        pat = parse_pattern(pattern) if isinstance(pattern, str) else pattern
        if quant is not None and pat.kind == "block" and act_block:
            raise ValueError(f"act_block: int8 activations are implemented for N:M patterns, got {str(pat)!r}")
        if pat.kind == "unstructured":
            raise ValueError(
                f"pattern: SparseLinear holds N:M or block weights, got {str(pat)!r}; unstructured sparsity "
                "has no kernel here (sparsify() keeps such layers as dense nn.Linear with zeroed weights)"
            )
        weight = dense_weight(linear).detach()
        requires_grad = bool(linear.weight.requires_grad) and quant is None
        if quant is not None and method is not None:
            with torch.no_grad():
                sparse = prune_quantized(
                    weight, pat, method, quant, group_size, symmetric, act_norm=act_norm, hessian=hessian
                )
            if pat.kind == "nm":
                sparse = dataclasses.replace(sparse, act_block=act_block)
            return cls(sparse, linear.bias, requires_grad=False, dense_fallback=dense_fallback)
        with torch.no_grad():
            if method is not None:
                weight, _ = prune_weight(weight, pat, method, act_norm=act_norm, hessian=hessian)
            weight = weight.to(dense_weight(linear).dtype)
            if pat.kind == "nm":
                sparse = NMSparseWeight.from_dense(
                    weight,
                    n=pat.n,
                    m=pat.m,
                    quant=quant,
                    group_size=group_size,
                    symmetric=symmetric,
                    act_block=act_block,
                )
            else:
                sparse = BlockSparseWeight.from_dense(
                    weight, block=tuple(pat.block), quant=quant, group_size=group_size, symmetric=symmetric
                )
        return cls(sparse, linear.bias, requires_grad=requires_grad, dense_fallback=dense_fallback)

    # -- views -------------------------------------------------------------------------------

    @property
    def sparse_weight(self) -> NMSparseWeight | BlockSparseWeight:
        """The weight as a format object sharing this module's tensors."""
        shape = (self.out_features, self.in_features)
        if self.block is None:
            scales, zeros = self._parameters.get("scales"), self._buffers.get("zeros")
            quant = (scales, zeros, self.group_size, self.act_block)
            return NMSparseWeight(self.values, self.meta, self.n, self.m, shape, *quant)
        scales, zeros = self._parameters.get("scales"), self._buffers.get("zeros")
        return BlockSparseWeight(self.crow_indices, self.col_indices, self.blocks, shape, scales, zeros)

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
        return self.dtype_param().dtype

    @property
    def device(self) -> torch.device:
        return self.dtype_param().device

    @property
    def quant(self) -> str | None:
        """``"int8"``/``"int4"`` for quantized values, else None."""
        if "scales" not in self._parameters:
            return None
        return quant_of(self.values if self.block is None else self.blocks)

    def tensor_names(self) -> tuple[str, ...]:
        if self.block is not None:
            return _QBSR_TENSORS if "scales" in self._parameters else _BSR_TENSORS
        return _QNM_TENSORS if "scales" in self._parameters else _NM_TENSORS

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
        """The floating parameter that carries the layer's dtype: ``values`` or ``blocks``, or
        ``scales`` when the values are quantized integers."""
        scales = self._parameters.get("scales")
        if scales is not None:
            return scales
        return self.blocks if self.block is not None else self.values

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The layer's plans pick and hold the backend (sparsekern/plan.py); nothing here knows
        # which one runs. NOTE: the state is read from _parameters/_buffers directly: five
        # nn.Module.__getattr__ lookups cost ~3 us per call, a seventh of a MiniLM-sized layer.
        params, buffers, plans = self._parameters, self._buffers, self.__dict__["_plans"]
        if self.block is None:
            scales = params.get("scales")
            if scales is None:
                args = (params["values"], buffers["meta"], self.n, self.m, params.get("bias"))
            else:
                args = (buffers["values"], buffers["meta"], self.n, self.m, params.get("bias"), scales,
                        buffers["zeros"], self.group_size, self.act_block)  # fmt: skip
            return plan.linear(NM_LINEAR, x, args, plans)
        # The BSR op takes K from x (crow/col/blocks do not carry it): a narrower x whose block
        # columns happen to cover the stored ones would pass its checks and give a wrong answer.
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features} (in_features), got shape {tuple(x.shape)}")
        scales = params.get("scales")
        if scales is None:
            args = (buffers["crow_indices"], buffers["col_indices"], params["blocks"], params.get("bias"))
        else:
            args = (buffers["crow_indices"], buffers["col_indices"], buffers["blocks"], params.get("bias"), scales,
                    buffers["zeros"])  # fmt: skip
        return plan.linear(BSR_LINEAR, x, args, plans)

    def extra_repr(self) -> str:
        q = "" if self.quant is None else f", quant={self.quant}, group_size={self.group_size}"
        q += f", act_block={self.act_block}" if self.act_block else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"pattern={self.pattern}{q}"
        )

    def _apply(self, *args, **kwargs):
        # .to() / .half() / .cuda(): plans (and dense copies) for the old tensors are dropped.
        self.__dict__.pop("_plans", None)
        out = super()._apply(*args, **kwargs)
        self._drop_plans()  # the parameter may be a new object now
        return out

    def __getstate__(self):
        # Plans are per-process caches (and may hold a dense copy of the weight): never pickled
        # or deep-copied; a copy makes its own on its first call.
        state = dict(super().__getstate__())
        state.pop("_plans", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_dense_fallback", True)
        self._drop_plans()

    # -- state dict --------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # The incoming weight is checked whole (shapes, then index ranges) before anything is
        # copied: a bad one is reported through ``errors`` (load_state_dict raises naming the key)
        # and this layer keeps its tensors; an index out of range would otherwise be read by a kernel.
        names = self.tensor_names()
        parts = {name: state_dict.get(prefix + name, getattr(self, name)) for name in names}
        if all(isinstance(t, torch.Tensor) for name, t in parts.items() if name != "zeros"):  # else super() reports it
            try:
                self._incoming_weight(parts).validate()
            except (TypeError, ValueError) as exc:
                errors.append(f"{prefix}{exc}")
                return
        # A BSR weight's block count depends on the data; resize to the incoming tensors so a
        # state dict from another pruning of the same layer loads (N:M shapes are fixed).
        if self.block is not None:
            blocks, col = state_dict.get(prefix + "blocks"), state_dict.get(prefix + "col_indices")
            if isinstance(blocks, torch.Tensor) and isinstance(col, torch.Tensor):
                self._drop_plans()  # the density, hence the bucket, may change
                if blocks.shape[0] != self.blocks.shape[0]:
                    for name in ("blocks", "col_indices", "scales", "zeros"):
                        t, new = getattr(self, name, None), state_dict.get(prefix + name)
                        if isinstance(t, torch.Tensor) and isinstance(new, torch.Tensor):
                            t.data = t.new_empty(new.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        self._drop_plans()  # load_state_dict(assign=True) puts in new parameters

    def _incoming_weight(self, parts: dict) -> NMSparseWeight | BlockSparseWeight:
        """The format object a load would produce (index tensors moved next to the values)."""
        shape = (self.out_features, self.in_features)
        if self.block is None:
            values, dev = parts["values"].detach(), parts["values"].device
            scales, zeros = parts.get("scales"), parts.get("zeros")
            scales = None if scales is None else scales.detach().to(dev)
            zeros = None if zeros is None else zeros.to(dev)
            quant = (scales, zeros, self.group_size, self.act_block)
            return NMSparseWeight(values, parts["meta"].to(dev), self.n, self.m, shape, *quant)
        blocks = parts["blocks"].detach()
        if blocks.dim() != 3 or (blocks.shape[1], block_width(blocks)) != tuple(self.block):
            raise ValueError(f"blocks: expected [nnz, {self.block[0]}, {self.block[1]}], got {tuple(blocks.shape)}")
        dev = blocks.device
        crow, col = parts["crow_indices"].to(dev), parts["col_indices"].to(dev)
        scales, zeros = parts.get("scales"), parts.get("zeros")
        scales = None if scales is None else scales.detach().to(dev)
        return BlockSparseWeight(crow, col, blocks, shape, scales, None if zeros is None else zeros.to(dev))
