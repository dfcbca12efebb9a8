"""Pruning fused MoE experts: router-weighted statistics (MoE-Pruner), N:M experts, expert dropping.

MoE-Pruner (Xie et al., 2024) scores an expert's weight ``W_ij`` by ``|W_ij| * ||X_j * G||``: the
tokens routed to that expert, each scaled by the gate value the router gave it, so tokens the
expert barely contributes to barely count. :class:`ExpertStats` collects, per expert, those
router-weighted inputs of the up (gate-up) projection and of the down projection (the gated
intermediate activations). Wanda on experts is then MoE-Pruner's score; SparseGPT / ADMM get the
router-weighted Hessian ``sum_t g_t^2 x_t x_t^T`` (the squared error of ``g_t * W x_t``, which is
what the expert adds to the block's output). An expert no calibration token reached has no
statistics: it is pruned by magnitude, and the report says so.

:func:`drop_experts` removes whole experts by calibration usage, block by block on the inputs
the already-dropped blocks produce, and cuts the router's rows with them: its softmax then
re-normalises over the experts that remain.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from sparsekern.formats.bsr import BlockSparseWeight
from sparsekern.formats.nm import NMSparseWeight
from sparsekern.nn.moe import SparseExperts, _num_experts, experts_layout, find_experts, up_name
from sparsekern.prune.calibration import ActivationStats

_COUNT_ATTRS = ("num_experts", "num_local_experts")


def _routed_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    got = list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
    if len(got) < 3:
        raise ValueError(f"experts: expected a call with {names}, got {len(args)} args and keys {sorted(kwargs)}")
    return got[0], got[1], got[2]


def _gate(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return module._apply_gate(h) if getattr(module, "has_gate", True) else module.act_fn(h)


class ExpertStats:
    """Per-expert, router-weighted input statistics of one fused experts module (see module doc)."""

    def __init__(self, module: nn.Module):
        e = _num_experts(module)
        hidden, inter = getattr(module, up_name(module)).shape[2], module.down_proj.shape[2]
        self.up = [ActivationStats(hidden) for _ in range(e)]
        self.down = [ActivationStats(inter) for _ in range(e)]
        self.counts = torch.zeros(e, dtype=torch.int64)  # routed (token, expert) pairs

    @property
    def n_tokens(self) -> int:
        return int(self.counts.sum())

    def observe(self, module, args, kwargs, mask, need: tuple[str, ...]) -> None:
        """Accumulate one call of ``module(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``;
        ``mask`` (a [B, S] padding mask, or None) drops padded tokens when ``T == B * S``."""
        hidden, index, weights = _routed_call(args, kwargs)
        if mask is not None and hidden.shape[0] == mask.numel():
            keep = mask.reshape(-1).to(hidden.device)
            hidden, index, weights = hidden[keep], index[keep], weights[keep]
        up_w = getattr(module, up_name(module))
        for e in index.unique().tolist():
            if e >= len(self.up):  # expert-parallel sentinel
                continue
            tok, pos = torch.where(index == e)
            g = weights[tok, pos].float().unsqueeze(1)
            x = hidden[tok]
            h = _gate(module, F.linear(x, up_w[e]))
            self.up[e].update(x.float() * g, need)
            self.down[e].update(h.float() * g, need)
            self.counts[e] += tok.numel()


def prune_experts(
    module: nn.Module, pattern, method: str = "magnitude", stats: ExpertStats | None = None, dense_fallback: bool = True
):
    """``(SparseExperts, note)``: every expert's two weights of ``module`` pruned to ``pattern``
    (N:M, or blocks: each expert to the pattern's block sparsity).

    ``method`` as for linears; all but magnitude need ``stats`` (``"wanda"`` is then MoE-Pruner's
    router-weighted score). ``note`` names the experts pruned by magnitude for want of tokens.
    """
    from sparsekern.prune import parse_pattern, prune_weight

    pat = parse_pattern(pattern) if isinstance(pattern, str) else pattern
    why = experts_layout(module)
    if why:
        raise ValueError(f"module: {why}")
    if pat.kind not in ("nm", "block"):
        raise ValueError(f"pattern: SparseExperts holds N:M or block-sparse experts, got {str(pat)!r}")
    if method != "magnitude" and stats is None:
        raise ValueError(f"stats: method {method!r} needs the experts' calibration statistics, got None")
    up_w, down_w = getattr(module, up_name(module)).detach(), module.down_proj.detach()
    unseen, up, down = [], [], []
    with torch.no_grad():
        for e in range(up_w.shape[0]):
            seen = stats is not None and stats.counts[e] > 0
            if method != "magnitude" and not seen:
                unseen.append(e)
            for w, st, out in ((up_w[e], stats and stats.up[e], up), (down_w[e], stats and stats.down[e], down)):
                kw = {"act_norm": st.act_norm, "hessian": st.hessian} if seen else {}
                pruned, _ = prune_weight(w, pat, method if seen else "magnitude", **kw)
                pruned = pruned.to(w.dtype)
                if pat.kind == "nm":
                    out.append(NMSparseWeight.from_dense(pruned, pat.n, pat.m))
                else:
                    out.append(BlockSparseWeight.from_dense(pruned, block=tuple(pat.block)))
    note = f"{method}: experts {unseen} got no calibration tokens, pruned by magnitude" if unseen else ""
    return SparseExperts.from_weights(up, down, module.act_fn, getattr(module, "has_gate", True), dense_fallback), note


# -- expert dropping -------------------------------------------------------------------------------


@dataclass
class DropReport:
    """What :func:`drop_experts` did: per MoE layer, the experts kept and every expert's usage."""

    keep: int
    layers: dict[str, dict] = field(default_factory=dict)  # experts module -> {"kept": [...], "usage": [...]}
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [
            f"drop_experts: kept {self.keep} experts per layer in {len(self.layers)} layers ({self.seconds:.1f} s)"
        ]
        for name, row in self.layers.items():
            lines.append(f"  {name}: kept {row['kept']}, routed tokens per expert {row['usage']}")
        return "\n".join(lines)


def _router_of(block: nn.Module, experts: nn.Module, e: int) -> nn.Module:
    """The module beside ``experts`` whose ``weight`` is ``[e, hidden]`` and that picks top-k."""
    parent = next(m for m in block.modules() if any(c is experts for c in m.children()))
    found = [
        m
        for m in parent.children()
        if m is not experts and getattr(m, "top_k", None) and getattr(getattr(m, "weight", None), "shape", (0,))[0] == e
    ]
    if len(found) != 1:
        raise ValueError(
            f"model: unknown MoE layout: expected one router (a module with top_k and a weight [{e}, hidden]) "
            f"beside {type(experts).__name__}, found {len(found)}"
        )
    return found[0]


def _cut(module: nn.Module, kept: torch.Tensor, e: int, undo: list) -> None:
    """Keep rows ``kept`` of every parameter and buffer of ``module`` whose leading dimension is
    ``e``; ``undo`` gets what puts the module back."""
    for name, p in list(module.named_parameters(recurse=False)):
        if p.dim() >= 1 and p.shape[0] == e:
            undo.append((module, name, p))
            setattr(module, name, nn.Parameter(p.detach()[kept].clone(), requires_grad=p.requires_grad))
    for name, b in list(module.named_buffers(recurse=False)):
        if b is not None and b.dim() >= 1 and b.shape[0] == e:
            undo.append((module, name, b))
            module.register_buffer(name, b[kept].clone())
    for attr in _COUNT_ATTRS:
        if getattr(module, attr, None) == e:
            undo.append((module, attr, e))
            setattr(module, attr, int(kept.numel()))


def _undo(undo: list) -> None:
    for module, name, old in reversed(undo):
        if isinstance(old, torch.Tensor) and not isinstance(old, nn.Parameter):
            module.register_buffer(name, old)
        else:
            setattr(module, name, old)


def _usage(block, stacks: list[nn.Module], hidden: list, captured: list, e: int) -> dict[int, torch.Tensor]:
    """Routed (token, expert) pairs per expert of each of ``stacks`` (by id) over one block's
    calibration inputs, padding excluded."""
    from sparsekern.prune.sequential import _run_block

    counts = {id(m): torch.zeros(e, dtype=torch.int64) for m in stacks}
    mask = [None]

    def count(module, args, kwargs):
        _, index, _ = _routed_call(args, kwargs)
        if mask[0] is not None and index.shape[0] == mask[0].numel():
            index = index[mask[0].reshape(-1).to(index.device)]
        index = index[index < e]
        counts[id(module)] += torch.bincount(index.reshape(-1).cpu(), minlength=e)

    handles = [m.register_forward_pre_hook(count, with_kwargs=True) for m in stacks]
    try:
        for h, (a, k, m) in zip(hidden, captured):
            mask[0] = m
            _run_block(block, h, a, k)
    finally:
        for h in handles:
            h.remove()
    return counts


def drop_experts(model: nn.Module, calibration, keep: int | float, progress: bool = False) -> DropReport:
    """Remove the least-used experts of every MoE layer of ``model`` in place.

    ``keep``: experts left per layer, as a count (int) or a fraction of them (float in (0, 1]);
    never fewer than the router's top-k. Usage is the number of calibration tokens routed to an
    expert, counted block by block on the already-dropped model's activations (ties: lower id).
    The router loses the dropped experts' rows (its softmax re-normalises over the rest) and the
    config's expert count follows, so a saved model reloads with the new shape.
    """
    from sparsekern.prune.sequential import _bar, _run_block, block_inputs, check_calibration, find_blocks, inference

    t0 = time.perf_counter()
    found = find_blocks(model)
    if isinstance(found, str):
        raise ValueError(f"model: drop_experts needs the model's blocks; {found}")
    path, blocks = found
    stacks = [(i, n, m) for i, b in enumerate(blocks) for n, m in find_experts(b).items()]
    if not stacks:
        raise ValueError("model: has no fused experts modules (num_experts and 3-D down_proj); nothing to drop")
    e = {_num_experts(m) for _, _, m in stacks}
    if len(e) != 1:
        raise ValueError(f"model: MoE layers have different expert counts {sorted(e)}; expected one")
    e = e.pop()
    routers = {id(m): _router_of(blocks[i], m, e) for i, _, m in stacks}
    top_k = max(int(r.top_k) for r in routers.values())
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep: expected an int count or a float fraction, got {type(keep).__name__}")
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep: expected a fraction in (0, 1], got {keep}")
        keep = max(1, math.floor(keep * e + 0.5))
    if not top_k <= keep <= e:
        raise ValueError(f"keep: expected {top_k}..{e} experts (top-k {top_k}, {e} experts), got {keep}")
    items = check_calibration(model, calibration)
    report = DropReport(keep)
    undo: list = []  # everything cut so far: put back if anything raises (never a half-dropped model)
    try:
        with inference(model):
            captured, hidden = block_inputs(model, blocks[0], items)
            for i in _bar(range(len(blocks)), progress, path):
                mine = [(n, m) for j, n, m in stacks if j == i]
                counts = _usage(blocks[i], [m for _, m in mine], hidden, captured, e)
                for name, m in mine:
                    usage = counts[id(m)]
                    # Most used first; a stable sort keeps the lower id on ties.
                    kept = torch.sort(torch.argsort(-usage, stable=True)[:keep]).values
                    _cut(m, kept, e, undo)
                    _cut(routers[id(m)], kept, e, undo)
                    report.layers[f"{path}.{i}.{name}"] = {"kept": kept.tolist(), "usage": usage.tolist()}
                hidden = [_run_block(blocks[i], h, a, k) for h, (a, k, _) in zip(hidden, captured)]
    except BaseException:
        _undo(undo)
        raise
    # The model's own count (Mixtral's aux loss) and the config's, so a saved model reloads.
    cfg = getattr(model, "config", None)
    for owner in [*model.modules(), cfg, getattr(cfg, "text_config", None)]:
        for attr in _COUNT_ATTRS:
            if owner is not None and getattr(owner, attr, None) == e:
                setattr(owner, attr, keep)
    report.seconds = time.perf_counter() - t0
    return report
