"""Mixture-of-experts weights: fused expert stacks, found, checked and swapped for ``SparseExperts``.

transformers 5 stores a MoE layer's experts fused, as 3-D parameters ``[num_experts, out, in]``
on one module (``MixtralExperts.gate_up_proj`` / ``down_proj``, ``Qwen2MoeExperts``, ...), and
the router as a bare 2-D parameter (``MixtralTopKRouter.weight``). In Mixtral the experts hold
~90% of the parameters. Every such class is decorated with transformers'
``use_experts_implementation``, which records its layout on the instance (``has_gate``,
``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_post_expert_norm``) and gives the one
forward all of them share: ``up`` (or ``gate_up``) projection of the tokens routed to an expert,
the gate, ``down`` projection, times the routing weight, summed over the top-k experts.

:class:`SparseExperts` computes that forward with each expert's two weights N:M-sparse, running
only the routed tokens through ``sparsekern.ops.nm_grouped_linear`` (one call per projection
for all experts). Layouts it does not take (transposed or interleaved stacks, biases, a custom
gate function, a post-expert norm) are reported by :func:`experts_layout` and left dense.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.formats.bsr import BlockSparseWeight
from sparsekern.formats.nm import NMSparseWeight, stack_nm

_EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts")


def _num_experts(module: nn.Module) -> int | None:
    for attr in _EXPERT_COUNT_ATTRS:
        n = getattr(module, attr, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def _is_stack(module: nn.Module) -> bool:
    """A fused experts module: expert count and a 3-D ``down_proj`` parameter."""
    p = getattr(module, "down_proj", None)
    return (
        _num_experts(module) is not None
        and not isinstance(module, nn.Linear)
        and isinstance(p, nn.Parameter)
        and p.dim() == 3
    )


def up_name(module: nn.Module) -> str:
    return "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"


def experts_layout(module: nn.Module) -> str | None:
    """Why ``SparseExperts`` cannot take this fused experts module (None: it can)."""
    from transformers.integrations.moe import _default_apply_gate

    kind = type(module).__name__
    if not hasattr(module, "is_transposed"):
        return f"{kind} is not a transformers experts class (no use_experts_implementation layout)"
    for flag, want in (("is_transposed", False), ("is_concatenated", True), ("has_bias", False)):
        if bool(getattr(module, flag)) != want:
            return f"{kind} has {flag}={not want}: only [experts, out, in] stacks without biases are supported"
    if getattr(module, "has_post_expert_norm", False):
        return f"{kind} applies a post-expert norm: not supported"
    if getattr(module, "has_gate", True) and getattr(type(module), "_apply_gate", None) is not _default_apply_gate:
        return f"{kind} has its own gate function: not supported"
    e = _num_experts(module)
    up, down = getattr(module, up_name(module), None), getattr(module, "down_proj", None)
    if not isinstance(up, torch.Tensor) or up.dim() != 3 or down.dim() != 3:
        return f"{kind}: expected 3-D {up_name(module)} and down_proj parameters"
    inter = down.shape[2]
    want_up = (e, (2 if getattr(module, "has_gate", True) else 1) * inter, down.shape[1])
    if tuple(up.shape) != want_up or down.shape[0] != e:
        return f"{kind}: {up_name(module)} {list(up.shape)} and down_proj {list(down.shape)} do not match {e} experts"
    return None


def find_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Every fused experts module of ``model`` by qualified name (supported layout or not)."""
    return {name: mod for name, mod in model.named_modules() if _is_stack(mod)}


def expert_weights(
    model: nn.Module, taken: set[str] = frozenset(), reasons: dict[str, str] | None = None
) -> list[tuple[str, nn.Parameter, str]]:
    """``(name, parameter, reason not pruned)`` for the expert stacks and router weights that stay dense.

    A module counts when it is not an ``nn.Linear`` and carries ``num_experts`` (or
    ``num_local_experts``); its 3-D parameters ``[num_experts, out, in]`` are expert stacks,
    its 2-D ``[num_experts, hidden]`` ones routers. Modules named in ``taken`` (being pruned) are
    left out, as are biases. ``reasons``: why a stack module was not pruned, by module name
    (default: its unsupported layout, see :func:`experts_layout`).
    """
    reasons = reasons or {}
    out = []
    for mod_name, mod in model.named_modules():
        n = _num_experts(mod)
        if n is None or isinstance(mod, (nn.Linear, SparseExperts)) or mod_name in taken:
            continue
        layout = reasons.get(mod_name) or (experts_layout(mod) if _is_stack(mod) else None)
        for pname, p in mod.named_parameters(recurse=False):
            if pname.endswith("bias") or p.dim() not in (2, 3) or p.shape[0] != n:
                continue
            dims = list(p.shape)
            if p.dim() == 3:
                why = f"fused expert weights {dims}: {layout or 'not pruned'}"
            else:
                why = f"router weight {dims} of {type(mod).__name__}: not an nn.Linear, no sparse kernel"
            out.append((f"{mod_name}.{pname}" if mod_name else pname, p, why))
    return out


# A stack's tensors per kind, in the grouped op's argument order, and its floating one.
STACK_TENSORS = {"nm": ("values", "meta"), "block": ("crow", "col", "blocks")}
FLOAT_TENSOR = {"nm": "values", "block": "blocks"}


class SparseExperts(nn.Module):
    """A fused experts module whose up (or gate-up) and down stacks are N:M- or block-sparse.

    Same call as the module it replaces: ``forward(hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]``; expert ids ``>= num_experts`` (expert-parallel sentinels)
    contribute nothing. Each stack is one set of tensors over all experts: N:M ``{up,down}_values``
    ``[E, out, kept]`` and ``_meta`` (see ``formats.nm.stack_nm``), or BSR ``_crow`` ``[E, rows+1]``
    indexing one shared ``_col`` / ``_blocks`` (``formats.bsr.stack_bsr``). Floating tensors are
    ``nn.Parameter`` (so ``.to(dtype)`` moves them), indices buffers. ``dense_fallback`` as for
    ``SparseLinear``.
    """

    def __init__(
        self,
        kind: str,
        up: tuple[torch.Tensor, ...],
        down: tuple[torch.Tensor, ...],
        shapes: tuple[tuple[int, int], tuple[int, int]],
        act_fn: nn.Module,
        has_gate: bool,
        *,
        n: int | None = None,
        m: int | None = None,
        block: tuple[int, int] | None = None,
        dense_fallback: bool = True,
    ):
        """From the stacks' tensors as stored (``up`` / ``down`` in the order of :data:`STACK_TENSORS`)
        and the per-expert ``(out, in)`` shapes of up and down; :meth:`from_weights` builds them
        from one weight per expert. The contents are not read (meta tensors are fine)."""
        super().__init__()
        if kind not in STACK_TENSORS or len(up) != len(STACK_TENSORS[kind]) or len(down) != len(up):
            raise ValueError(f"kind: expected 'nm' or 'block' with {STACK_TENSORS.get(kind)} per stack, got {kind!r}")
        self.kind, self.n, self.m, self.block = kind, n, m, None if block is None else tuple(block)
        self.num_experts, self.has_gate = int(up[0].shape[0]), has_gate
        self.up_shape, self.down_shape = (tuple(int(d) for d in s) for s in shapes)
        inter = self.down_shape[1]
        if self.up_shape != ((2 if has_gate else 1) * inter, self.down_shape[0]):
            raise ValueError(f"up, down: shapes {self.up_shape} and {self.down_shape} do not chain")
        for which, parts in (("up", up), ("down", down)):
            if parts[0].shape[0] != self.num_experts:
                raise ValueError(f"{which}: expected {self.num_experts} experts, got {parts[0].shape[0]}")
            for t, tensor in zip(STACK_TENSORS[kind], parts):
                if t == FLOAT_TENSOR[kind]:
                    setattr(self, f"{which}_{t}", nn.Parameter(tensor.detach(), requires_grad=False))
                else:
                    self.register_buffer(f"{which}_{t}", tensor.detach())
        self.act_fn = act_fn
        self.dense_fallback = dense_fallback

    @classmethod
    def from_weights(
        cls,
        up: list[NMSparseWeight | BlockSparseWeight],
        down: list[NMSparseWeight | BlockSparseWeight],
        act_fn: nn.Module,
        has_gate: bool,
        dense_fallback: bool = True,
    ) -> SparseExperts:
        """From one up and one down weight per expert (all float N:M of one pattern, or all BSR)."""
        if not up or len(up) != len(down):
            raise ValueError(f"up, down: expected one weight per expert in each, got {len(up)} and {len(down)}")
        kinds = {_kind_of(w) for w in up + down}
        if len(kinds) != 1 or None in kinds:
            raise ValueError(f"up, down: expected float N:M or block-sparse weights of one kind, got {kinds}")
        kind = kinds.pop()
        stacks = [stack_nm(ws) if kind == "nm" else _stack_bsr(ws) for ws in (up, down)]
        pattern = {"n": up[0].n, "m": up[0].m} if kind == "nm" else {"block": up[0].block}
        shapes = (tuple(up[0].shape), tuple(down[0].shape))
        return cls(kind, *stacks, shapes, act_fn, has_gate, **pattern, dense_fallback=dense_fallback)

    def stack(self, which: str) -> tuple[torch.Tensor, ...]:
        """The tensors of one stack (``"up"`` / ``"down"``), in the grouped op's argument order."""
        return tuple(getattr(self, f"{which}_{t}") for t in STACK_TENSORS[self.kind])

    def floating(self, which: str) -> torch.Tensor:
        """The floating tensor of one stack: N:M values or BSR blocks."""
        return getattr(self, f"{which}_{FLOAT_TENSOR[self.kind]}")

    @property
    def dense_fallback(self) -> bool:
        """Whether dispatch may run these experts densely (keeping a dense ``[E, out, in]`` copy of
        each stack). ``False``: no dense copy, ever; the fastest sparse kernel runs them."""
        return self.__dict__["_dense_fallback"]

    @dense_fallback.setter
    def dense_fallback(self, allowed: bool) -> None:
        from sparsekern import plan

        if not isinstance(allowed, bool):
            raise TypeError(f"dense_fallback: expected bool, got {type(allowed).__name__}")
        self.__dict__["_dense_fallback"] = allowed
        for which in ("up", "down"):
            plan.set_dense_fallback(self.floating(which), allowed)

    @property
    def pattern(self) -> str:
        """``"2:4"`` for N:M; ``"block32x32:0.90"`` (block sparsity over both stacks) for BSR."""
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        bm, bk = self.block
        nnz = self.up_blocks.shape[0] + self.down_blocks.shape[0]
        total = self.num_experts * (self.up_shape[0] * self.up_shape[1] + self.down_shape[0] * self.down_shape[1])
        return f"block{bm}x{bk}:{1 - nnz * bm * bk / total:.2f}"

    def extra_repr(self) -> str:
        e, (up_out, hidden), inter = self.num_experts, self.up_shape, self.down_shape[1]
        return f"experts={e}, hidden={hidden}, up_out={up_out}, intermediate={inter}, pattern={self.pattern}"

    def nbytes(self, which: str | None = None) -> int:
        """Bytes of one stack (``"up"`` / ``"down"``) or of both."""
        tensors = [t for w in ("up", "down") if which in (None, w) for t in self.stack(w)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def weights(self, which: str) -> list[NMSparseWeight | BlockSparseWeight]:
        """One stack (``"up"`` or ``"down"``) as per-expert weight views."""
        shape = self.up_shape if which == "up" else self.down_shape
        return expert_views(self.stack(which), shape, self.n, self.m, f"{which}_crow")

    def dense(self, which: str) -> torch.Tensor:
        """The ``[E, out, in]`` dense stack (pruned weights), e.g. to copy back into the fused module."""
        return torch.stack([w.to_dense() for w in self.weights(which)])

    def _linear(self, x: torch.Tensor, which: str, offsets: torch.Tensor) -> torch.Tensor:
        from sparsekern import ops

        if self.kind == "nm":
            return ops.nm_grouped_linear(x, *self.stack(which), offsets, self.n, self.m)
        return ops.bsr_grouped_linear(x, *self.stack(which), offsets)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        t, k = top_k_index.shape
        e = self.num_experts
        ids = top_k_index.reshape(-1)
        counts = torch.bincount(ids, minlength=e + 1)[:e]  # sentinels (>= e) counted past the end
        # Stable sort by expert: each expert's rows are contiguous; sentinels sort last and drop.
        order = torch.argsort(ids, stable=True)[: int(counts.sum())]
        offsets = torch.zeros(e + 1, dtype=torch.int64)
        offsets[1:] = counts.cumsum(0).cpu()
        token = order // k
        h = self._linear(hidden_states[token], "up", offsets)
        if self.has_gate:
            gate, up = h.chunk(2, dim=-1)
            h = self.act_fn(gate) * up
        else:
            h = self.act_fn(h)
        y = self._linear(h, "down", offsets)
        y = y * top_k_weights.reshape(-1)[order, None]
        # One row per (token, choice), summed over the choices; sentinel rows stay zero.
        # NOTE: not index_add_: on 2 busy cores its parallel CPU path took ~50 ms for 2 rows.
        rows = torch.zeros(t * k, y.shape[-1], dtype=y.dtype, device=y.device)
        rows[order] = y
        return rows.view(t, k, -1).sum(1).to(hidden_states.dtype)


def expert_views(stack: tuple, shape: tuple[int, int], n=None, m=None, crow_name: str = "crow") -> list:
    """Per-expert weight views of one stack as stored: N:M ``(values, meta)`` with pattern ``n:m``,
    or BSR ``(crow, col, blocks)`` with global crow indices. A BSR expert whose block range leaves
    ``0..nnz`` is a ValueError naming ``crow_name`` (slicing would clamp it silently)."""
    if len(stack) == 2:
        values, meta = stack
        return [NMSparseWeight(values[e], meta[e], n, m, shape) for e in range(values.shape[0])]
    crow, col, blocks = stack
    out = []
    for e in range(crow.shape[0]):
        lo, hi = int(crow[e, 0]), int(crow[e, -1])
        if not 0 <= lo <= hi <= blocks.shape[0]:
            raise ValueError(f"{crow_name}: expert {e} spans blocks {lo}..{hi}, outside 0..{blocks.shape[0]}")
        out.append(BlockSparseWeight(crow[e] - lo, col[lo:hi], blocks[lo:hi], shape))
    return out


def _kind_of(w) -> str | None:
    if isinstance(w, NMSparseWeight):
        return "nm" if w.quant is None else None
    return "block" if isinstance(w, BlockSparseWeight) else None


def _stack_bsr(weights):
    from sparsekern.formats.bsr import stack_bsr  # noqa: PLC0415  (lands with the grouped BSR op)

    return stack_bsr(weights)
