"""``SparseLinear``: a drop-in for ``nn.Linear`` whose weight is N:M or block-sparse.

The compressed tensors are the module's state: ``values``/``meta`` (N:M) or
``crow_indices``/``col_indices``/``blocks`` (BSR), plus ``bias``. Floating tensors are
``nn.Parameter`` so ``.half()``, ``.to(dtype)`` and optimisers see them; index tensors are int32
buffers, which ``Module.to(dtype)`` leaves alone by design. No dense copy of the weight is kept.

HF GPT-2's ``Conv1D`` (``y = x @ W + b`` with ``W [in, out]``) converts too: the weight is
transposed once, and the resulting layer computes the same function as the Conv1D.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern import dispatch
from sparsekern.backends import dense as dense_backend
from sparsekern.formats.bsr import BlockSparseWeight
from sparsekern.formats.nm import NMSparseWeight
from sparsekern.ops import (
    all_finite,
    bsr_linear_backward,
    check_bsr_index_values,
    check_bsr_linear,
    check_nm_linear,
    nm_linear_backward,
)

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
        # The public ops pick the backend (C++ CPU, Triton, CUDA, dense fallback, reference);
        # nothing here knows which one runs. Plain inference calls skip the op's Python layers
        # (see _run_planned); autograd, torch.compile, tracing and odd inputs take the op.
        # NOTE: the state is read from _parameters/_buffers directly: five nn.Module.__getattr__
        # lookups cost ~3 us per call, a seventh of a MiniLM-sized layer.
        params, buffers = self._parameters, self._buffers
        bias = params.get("bias")
        if self.block is None:
            p = params["values"]
            weight_args = (p, buffers["meta"], self.n, self.m, bias)
        else:
            p = params["blocks"]
            weight_args = (buffers["crow_indices"], buffers["col_indices"], p, bias)
        if (
            type(x) is torch.Tensor  # not a subclass (fake/functional tensors under export, ...)
            and x.dtype == p.dtype
            and x.device == p.device
            and x.dim() > 0
            and x.shape[-1] == self.in_features
            and x.numel() > 0
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
        ):
            if torch.is_grad_enabled() and (
                x.requires_grad or p.requires_grad or (bias is not None and bias.requires_grad)
            ):
                # NOTE: an HF model called without no_grad() has weights that require grad:
                # MiniLM 1x128 through the op's autograd 0.81x dense, through this 0.9x+.
                return _PlannedAutograd.apply(x, p, bias, weight_args, self)
            return self._run_planned(x, weight_args)
        # Everything else, bad input included (the op's checks say what is wrong).
        return self._op(x, *weight_args)

    def _op(self, x: torch.Tensor, *weight_args) -> torch.Tensor:
        # The BSR op takes K from x (crow/col/blocks do not carry it): a narrower x whose block
        # columns happen to cover the stored ones would pass its checks and give a wrong answer.
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features} (in_features), got shape {tuple(x.shape)}")
        if self.block is None:
            return torch.ops.sparsekern.nm_linear(x, *weight_args)
        return torch.ops.sparsekern.bsr_linear(x, *weight_args)

    def _run_planned(self, x: torch.Tensor, weight_args: tuple) -> torch.Tensor:
        """The op's work without its per-call Python layers: the backend the dispatcher picked
        for this row bucket is remembered here (until :func:`dispatch.state` changes) and called
        directly; the full argument check runs when a plan is made. Where the dense fallback
        won, the plan holds its dense weight and the call is ``F.linear``, as in ``nn.Linear``.

        NOTE: on a 384x384 2:4 layer at 1 row (MiniLM-sized), the public op cost 60-95 us per call
        against 12 us for the CPU kernel itself (dispatcher -> Python, checks, select, finiteness
        scan) while F.linear takes ~22 us: without this, small swapped layers lose to dense.
        Planned: ~21 us on the CPU kernel.
        """
        tensors = weight_args[:2] if self.block is None else weight_args[:3]
        state = dispatch.state()
        key = (dispatch.row_bucket(x.numel() // self.in_features), x.dtype, x.device)
        plans = self.__dict__.setdefault("_plans", {})
        plan = plans.get(key)
        if (
            plan is None
            or plan[0] != state
            # a dense copy is only good while the weight is the one it came from
            or (plan[2] is not None and dense_backend.weight_stamp(*tensors) != plan[3])
        ):
            plan = plans[key] = self._make_plan(x, weight_args, tensors, state)
        impl, dense_w = plan[1], plan[2]
        if dense_w is not None:
            return F.linear(x, dense_w, weight_args[-1])
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        args = (x2, *weight_args)
        if impl.supports(*args) is not None:
            return self._op(x, *weight_args)
        out = impl.fn(*args)
        # Sparse kernels skip pruned weights where dense computes 0 * inf = nan: inputs with
        # NaN/Inf take the op, which propagates them exactly as F.linear does.
        if not impl.nonfinite_exact and not all_finite(x2):
            return self._op(x, *weight_args)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def _make_plan(self, x: torch.Tensor, weight_args: tuple, tensors: tuple, state: tuple) -> tuple:
        """``(state, impl, dense weight or None, weight stamp)`` for x's row bucket."""
        args = (x.reshape(-1, self.in_features), *weight_args)
        op = "nm_linear" if self.block is None else "bsr_linear"
        # Every check before select: a measurement must never time a candidate on bad input.
        if self.block is None:
            check_nm_linear(*args)
        else:
            check_bsr_linear(*args)
            check_bsr_index_values(*weight_args[:3], self.in_features)
        impl = dispatch.select(op, *args)
        stamp = dense_backend.weight_stamp(*tensors)
        if impl.backend != "dense" or stamp is None:
            return (state, impl, None, None)
        if self.block is None:
            dense_w = dense_backend.nm_weight(*weight_args[:4])
        else:
            dense_w = dense_backend.bsr_weight(*weight_args[:3], self.in_features)
        return (state, impl, dense_w, stamp)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"pattern={self.pattern}"
        )

    def _apply(self, *args, **kwargs):
        # .to() / .half() / .cuda(): plans (and dense copies) for the old tensors are dropped.
        self.__dict__.pop("_plans", None)
        return super()._apply(*args, **kwargs)

    def __getstate__(self):
        # Plans are per-process caches (and may hold a dense copy of the weight): never pickled
        # or deep-copied; a copy makes its own on its first call.
        state = dict(super().__getstate__())
        state.pop("_plans", None)
        return state

    # -- state dict --------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # The incoming weight is checked whole (shapes, then index ranges) before anything is
        # copied: a bad one is reported through ``errors`` (load_state_dict raises naming the key)
        # and this layer keeps its tensors; an index out of range would otherwise be read by a kernel.
        names = self.tensor_names()
        parts = {name: state_dict.get(prefix + name, getattr(self, name)) for name in names}
        if all(isinstance(t, torch.Tensor) for t in parts.values()):  # else super() reports it
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
                self.__dict__.pop("_plans", None)  # the density, hence the bucket, may change
                if blocks.shape[0] != self.blocks.shape[0]:
                    self.blocks.data = self.blocks.new_empty(blocks.shape)
                    self.col_indices = self.col_indices.new_empty(col.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def _incoming_weight(self, parts: dict) -> NMSparseWeight | BlockSparseWeight:
        """The format object a load would produce (index tensors moved next to the values)."""
        shape = (self.out_features, self.in_features)
        if self.block is None:
            values = parts["values"].detach()
            return NMSparseWeight(values, parts["meta"].to(values.device), self.n, self.m, shape)
        blocks = parts["blocks"].detach()
        if blocks.dim() != 3 or tuple(blocks.shape[1:]) != tuple(self.block):
            raise ValueError(f"blocks: expected [nnz, {self.block[0]}, {self.block[1]}], got {tuple(blocks.shape)}")
        crow, col = parts["crow_indices"].to(blocks.device), parts["col_indices"].to(blocks.device)
        return BlockSparseWeight(crow, col, blocks, shape)


class _PlannedAutograd(torch.autograd.Function):
    """The planned path with gradients: forward runs the remembered backend, backward is the
    public op's own formula (``ops.nm_linear_backward`` / ``ops.bsr_linear_backward``), so the
    graph holds one node instead of the op's Python layers per call.

    Only x, the kept weights and the bias are inputs of the node. NOTE: every argument of
    ``apply`` costs ~1 us of functorch unwrapping: 5 arguments instead of 8 save ~3 us a call.
    """

    @staticmethod
    def forward(ctx, x, p, bias, weight_args, layer):
        ctx.save_for_backward(x, p, bias)
        ctx.weight_args, ctx.nm = weight_args, layer.block is None
        return layer._run_planned(x, weight_args)

    @staticmethod
    def backward(ctx, grad):
        x, p, bias = ctx.saved_tensors
        need_x, need_p, need_b = ctx.needs_input_grad[:3]
        # The op's backward takes the op's arguments and which of them need a gradient.
        if ctx.nm:
            args = (x, p, *ctx.weight_args[1:4], bias)
            op_ctx = SimpleNamespace(args=args, needs_input_grad=(need_x, need_p, False, False, False, need_b))
            gx, gp, *_, gb = nm_linear_backward(op_ctx, grad)
        else:
            args = (x, *ctx.weight_args[:2], p, bias)
            op_ctx = SimpleNamespace(args=args, needs_input_grad=(need_x, False, False, need_p, need_b))
            gx, _, _, gp, gb = bsr_linear_backward(op_ctx, grad)
        return gx, gp, gb, None, None
