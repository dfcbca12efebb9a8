"""Structured pruning that shrinks a model: attention heads, MLP channels, whole layers.

Supported families: BERT-like encoders (``encoder.layer[i].attention.self.{query,key,value}``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``) and Llama-like decoders
(``layers[i].self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``). The result is plain,
smaller ``nn.Linear`` layers: faster on any device, no kernel needed.

Importance. With ``calibration`` (model inputs, as for ``collect_stats``): FLAP's fluctuation
metric (An et al., 2024): for an input channel j of the output projection (o_proj / down_proj),
``var_t(x_tj) * ||W[:, j]||^2`` -- how much the layer's output moves when the channel is replaced
by its mean; a head scores the sum over its channels. Removed channels' means are then folded
into the output projection's bias (FLAP's compensation) where that layer has a bias (BERT).
Llama's o_proj/down_proj have none, and HF's config cannot describe a bias on them alone
(``attention_bias`` / ``mlp_bias`` switch every projection), so there nothing is folded.
Without calibration: the weights' norms (rows of the input projections times columns of the
output projection), a data-free proxy.

GQA (Llama). HF's attention maps query head i to KV head ``i // num_key_value_groups``, so every
KV head must keep the same number of query heads. ``fraction=`` therefore prunes whole KV groups
(a KV head with all its query heads, which also shrinks the KV cache); ``heads_to_prune`` may
name whole groups and/or the same number of query heads in every remaining group.

Config. Uniform results update ``num_attention_heads`` / ``num_key_value_heads`` / ``head_dim``
(Llama) and ``intermediate_size``. HF has no per-layer fields, so per-layer shapes are also
recorded in ``config.sparsekern_structure`` (``{"layers": {i: {...}}}``) and BERT's removed heads
in ``config.pruned_heads`` (HF v4's name); BERT's ``num_attention_heads`` is kept because its
head size is derived from it. ``drop_layers`` records the original indices it removed. Uniform
Llama results reload through ``save_pretrained``/``from_pretrained``; everything else (uneven
layers, BERT heads: transformers 5 ignores ``pruned_heads``) through ``sk.save``/``sk.load``,
which record and rebuild the shapes (:mod:`sparsekern.prune.structure`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsekern.prune.calibration import collect_stats


@dataclass
class _Block:
    family: str  # "bert" | "llama"
    layer: nn.Module
    attn: nn.Module  # holds the head-count attributes
    qkv: list[tuple[nn.Module, str]]  # (parent, attr) of q, k, v
    o: tuple[nn.Module, str]
    mlp_in: list[tuple[nn.Module, str]]
    mlp_out: tuple[nn.Module, str]
    mlp: nn.Module

    @property
    def head_dim(self) -> int:
        return self.attn.attention_head_size if self.family == "bert" else self.attn.head_dim

    def n_heads(self) -> int:
        return _get(self.qkv[0]).out_features // self.head_dim

    def n_kv(self) -> int:
        return _get(self.qkv[1]).out_features // self.head_dim


def _get(ref: tuple[nn.Module, str]) -> nn.Linear:
    return getattr(*ref)


def _find(model: nn.Module) -> tuple[nn.Module, str, str]:
    """(owner, attribute, family) of the ModuleList of transformer layers."""
    for _, mod in model.named_modules():
        for attr, child in mod.named_children():
            if not isinstance(child, nn.ModuleList) or len(child) == 0:
                continue
            first = child[0]
            if hasattr(first, "attention") and hasattr(first.attention, "self") and hasattr(first, "intermediate"):
                return mod, attr, "bert"
            if hasattr(first, "self_attn") and hasattr(first.self_attn, "q_proj") and hasattr(first, "mlp"):
                return mod, attr, "llama"
    raise TypeError(
        f"model: {type(model).__name__} is not a supported family (BERT-like encoder.layer or Llama-like layers)"
    )


def _blocks(model: nn.Module) -> list[_Block]:
    owner, attr, family = _find(model)
    out = []
    for layer in getattr(owner, attr):
        if family == "bert":
            a = layer.attention
            out.append(
                _Block(
                    family, layer, a.self, [(a.self, "query"), (a.self, "key"), (a.self, "value")], (a.output, "dense"),
                    [(layer.intermediate, "dense")], (layer.output, "dense"), layer.intermediate,
                )
            )  # fmt: skip
        else:
            a, m = layer.self_attn, layer.mlp
            ins = [(m, n) for n in ("gate_proj", "up_proj") if hasattr(m, n)]
            out.append(
                _Block(
                    family,
                    layer,
                    a,
                    [(a, "q_proj"), (a, "k_proj"), (a, "v_proj")],
                    (a, "o_proj"),
                    ins,
                    (m, "down_proj"),
                    m,
                )
            )
    return out


def _require_linear(blocks: list[_Block], part: str, op: str) -> None:
    """TypeError before anything changes when a projection is not a plain ``nn.Linear``."""
    for i, b in enumerate(blocks):
        owner, refs = (b.attn, b.qkv + [b.o]) if part == "attention" else (b.mlp, b.mlp_in + [b.mlp_out])
        if part == "MLP" and not b.mlp_in:
            refs = refs + [(b.mlp, "gate_proj / up_proj")]
        for parent, attr in refs:
            got = getattr(parent, attr, None)
            if type(got) is not nn.Linear:
                moe = (
                    " (a mixture of experts: fused expert weights, no per-channel nn.Linear)"
                    if hasattr(b.mlp, "experts") and part == "MLP"
                    else ""
                )
                what = "missing" if got is None else type(got).__name__
                raise TypeError(
                    f"model: {op} supports {part} projections that are nn.Linear (Llama q/k/v/o_proj and "
                    f"gate/up/down_proj, BERT query/key/value/dense); layer {i}: {type(owner).__name__}{moe} "
                    f"has {attr}: {what}"
                )


def _linear_like(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(old.training)
    new.weight.requires_grad_(old.weight.requires_grad)
    return new


def _keep_rows(ref, idx: torch.Tensor) -> None:
    old = _get(ref)
    idx = idx.to(old.weight.device)
    setattr(*ref, _linear_like(old, old.weight.detach()[idx], None if old.bias is None else old.bias.detach()[idx]))


def _keep_cols(ref, idx: torch.Tensor, fold: torch.Tensor | None = None) -> None:
    """Keep input columns ``idx``; ``fold`` is added to the bias (FLAP's mean compensation)."""
    old = _get(ref)
    bias = None if old.bias is None else old.bias.detach().clone()
    if bias is not None and fold is not None:
        bias += fold.to(bias.dtype)
    setattr(*ref, _linear_like(old, old.weight.detach()[:, idx.to(old.weight.device)], bias))


def _fold(ref, removed: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor | None:
    lin = _get(ref)
    if mean is None or lin.bias is None or removed.numel() == 0:
        return None
    w = lin.weight.detach().float()[:, removed.to(lin.weight.device)]
    return w @ mean.to(w.device)[removed.to(w.device)]


def _channel_stats(model, refs: list, calibration) -> list:
    if calibration is None:
        return [None] * len(refs)
    layers = {f"block{i}": _get(r) for i, r in enumerate(refs)}
    stats = collect_stats(model, layers, calibration, need=("norm", "mean"))
    return [stats[f"block{i}"] for i in range(len(refs))]


def _record(model: nn.Module, index: int, **fields) -> None:
    rec = getattr(model.config, "sparsekern_structure", None) or {"layers": {}}
    rec["layers"].setdefault(str(index), {}).update(fields)
    model.config.sparsekern_structure = rec


def _check_fraction(fraction) -> float:
    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction: expected a fraction in [0, 1), got {fraction!r}")
    return float(fraction)


def _head_scores(b: _Block, stat) -> torch.Tensor:
    """Importance per query head ``[n_heads]`` (FLAP fluctuation, or weight norms without data)."""
    hd, o = b.head_dim, _get(b.o).weight.detach().float()
    col_sq = (o * o).sum(0)
    if stat is not None:
        return (stat.var.to(col_sq.device) * col_sq).view(-1, hd).sum(1)
    q, k, v = (_get(r).weight.detach().float() for r in b.qkv)
    rep = b.n_heads() // b.n_kv()
    kv = ((k * k).sum(1) + (v * v).sum(1)).view(-1, hd).sum(1).repeat_interleave(rep)
    return ((q * q).sum(1).view(-1, hd).sum(1) + kv + col_sq.view(-1, hd).sum(1)).sqrt()


def _apply_heads(model, i: int, b: _Block, removed: list[int], stat, compensate: bool) -> tuple[int, int]:
    hd, nh, nkv = b.head_dim, b.n_heads(), b.n_kv()
    bad = [h for h in removed if not isinstance(h, int) or not 0 <= h < nh]
    if bad:
        raise ValueError(f"heads_to_prune[{i}]: expected head indices in 0..{nh - 1}, got {bad}")
    removed_set = set(removed)
    keep = [h for h in range(nh) if h not in removed_set]
    if not keep:
        raise ValueError(f"heads_to_prune[{i}]: would remove all {nh} heads of layer {i}; use drop_layers instead")
    rep = nh // nkv
    kept_groups = sorted({h // rep for h in keep})
    per_group = {g: sum(1 for h in keep if h // rep == g) for g in kept_groups}
    if b.family == "llama" and len(set(per_group.values())) != 1:
        raise ValueError(
            f"heads_to_prune[{i}]: GQA needs the same number of query heads per KV head, got {per_group} "
            "(kept query heads per KV group); prune whole groups or the same count in every group"
        )

    def chans(heads):
        return torch.tensor([h * hd + d for h in heads for d in range(hd)], dtype=torch.long)

    q_keep, q_gone = chans(keep), chans(sorted(removed_set))
    fold = _fold(b.o, q_gone, stat.mean if (stat is not None and compensate) else None)
    _keep_rows(b.qkv[0], q_keep)
    kv_keep = chans(kept_groups) if b.family == "llama" else q_keep
    _keep_rows(b.qkv[1], kv_keep)
    _keep_rows(b.qkv[2], kv_keep)
    _keep_cols(b.o, q_keep, fold)
    if b.family == "bert":
        b.attn.num_attention_heads = len(keep)
        b.attn.all_head_size = len(keep) * hd
        pruned = dict(getattr(model.config, "pruned_heads", None) or {})
        # Record original head indices, as HF v4's pruned_heads did.
        orig = [h for h in range(nh + len(pruned.get(i, []))) if h not in set(pruned.get(i, []))]
        pruned[i] = sorted(set(pruned.get(i, [])) | {orig[h] for h in removed_set})
        model.config.pruned_heads = pruned
    else:
        b.attn.num_key_value_groups = len(keep) // len(kept_groups)
    _record(
        model,
        i,
        num_attention_heads=len(keep),
        num_key_value_heads=len(kept_groups) if b.family == "llama" else len(keep),
    )
    return len(keep), len(kept_groups)


def prune_heads(
    model: nn.Module,
    heads_to_prune: dict[int, list[int]] | None = None,
    *,
    fraction: float | None = None,
    calibration=None,
    compensate: bool = True,
) -> dict[int, list[int]]:
    """Remove attention heads in place; returns ``{layer: removed query heads}``.

    Either ``heads_to_prune`` (query-head indices per layer, current numbering) or ``fraction``
    (per layer: of the heads for BERT, of the KV groups for Llama, lowest importance first).
    """
    if (heads_to_prune is None) == (fraction is None):
        raise ValueError("prune_heads: pass exactly one of heads_to_prune or fraction")
    blocks = _blocks(model)
    _require_linear(blocks, "attention", "prune_heads")
    stats = _channel_stats(model, [b.o for b in blocks], calibration)
    if heads_to_prune is None:
        fraction = _check_fraction(fraction)
        heads_to_prune = {}
        for i, b in enumerate(blocks):
            scores, rep = _head_scores(b, stats[i]), 1
            if b.family == "llama":
                rep = b.n_heads() // b.n_kv()
                scores = scores.view(-1, rep).sum(1)  # per KV group
            n_units = scores.numel()
            gone = torch.sort(scores, stable=True).indices[: min(round(fraction * n_units), n_units - 1)]
            heads_to_prune[i] = sorted(g * rep + r for g in gone.tolist() for r in range(rep))
    if not isinstance(heads_to_prune, dict):
        raise TypeError(f"heads_to_prune: expected dict[int, list[int]], got {type(heads_to_prune).__name__}")
    for i in heads_to_prune:
        if not isinstance(i, int) or not 0 <= i < len(blocks):
            raise ValueError(f"heads_to_prune: layer {i!r} out of range 0..{len(blocks) - 1}")
    counts = {}
    for i, b in enumerate(blocks):
        if heads_to_prune.get(i):
            counts[i] = _apply_heads(model, i, b, list(heads_to_prune[i]), stats[i], compensate)
        else:
            counts[i] = (b.n_heads(), b.n_kv())
    if blocks[0].family == "llama" and len(set(counts.values())) == 1:
        nh, nkv = next(iter(counts.values()))
        model.config.head_dim = blocks[0].head_dim  # no longer hidden_size // num_attention_heads
        model.config.num_attention_heads, model.config.num_key_value_heads = nh, nkv
    return {i: sorted(h) for i, h in heads_to_prune.items() if h}


def prune_mlp_channels(
    model: nn.Module, fraction: float, calibration=None, *, compensate: bool = True
) -> dict[int, int]:
    """Remove ``round(fraction * intermediate_size)`` MLP channels per layer in place (FLAP-style).

    Returns ``{layer: new intermediate size}``. Shrinks gate/up (rows) and down (columns), or
    BERT's intermediate.dense (rows) and output.dense (columns).
    """
    fraction = _check_fraction(fraction)
    blocks = _blocks(model)
    _require_linear(blocks, "MLP", "prune_mlp_channels")
    stats = _channel_stats(model, [b.mlp_out for b in blocks], calibration)
    sizes = {}
    for i, b in enumerate(blocks):
        down = _get(b.mlp_out).weight.detach().float()
        col_sq = (down * down).sum(0)
        if stats[i] is not None:
            scores = stats[i].var.to(col_sq.device) * col_sq
        else:
            row_sq = sum((_get(r).weight.detach().float() ** 2).sum(1) for r in b.mlp_in)
            scores = (row_sq * col_sq).sqrt()
        width = scores.numel()
        order = torch.sort(scores, stable=True).indices
        n_gone = min(round(fraction * width), width - 1)
        gone, keep = order[:n_gone], torch.sort(order[n_gone:]).values
        fold = _fold(b.mlp_out, gone, stats[i].mean if (stats[i] is not None and compensate) else None)
        for r in b.mlp_in:
            _keep_rows(r, keep)
        _keep_cols(b.mlp_out, keep, fold)
        if hasattr(b.mlp, "intermediate_size"):
            b.mlp.intermediate_size = keep.numel()
        sizes[i] = keep.numel()
        _record(model, i, intermediate_size=keep.numel())
    if len(set(sizes.values())) == 1:
        model.config.intermediate_size = next(iter(sizes.values()))
    return sizes


def drop_layers(model: nn.Module, layers: list[int]) -> nn.Module:
    """Remove whole transformer layers in place (ShortGPT / LaCo-style depth pruning).

    Renumbers every ``layer_idx`` attribute (KV-cache slots) and fixes ``num_hidden_layers``,
    ``layer_types`` and the per-layer records in the config.
    """
    owner, attr, _ = _find(model)
    old = getattr(owner, attr)
    n = len(old)
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise TypeError(f"layers: expected a list of int layer indices, got {layers!r}")
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"layers: indices {bad} out of range 0..{n - 1}")
    gone = set(layers)
    kept = [i for i in range(n) if i not in gone]
    if not kept:
        raise ValueError(f"layers: would remove all {n} layers")
    setattr(owner, attr, nn.ModuleList([old[i] for i in kept]))
    for new_i, old_i in enumerate(kept):
        for mod in old[old_i].modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new_i
    cfg = model.config
    cfg.num_hidden_layers = len(kept)
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == n:
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    # Original indices of every dropped layer, so a checkpoint can rebuild this from the original config.
    rec = getattr(cfg, "sparsekern_structure", None) or {"layers": {}}
    n_orig, before = rec.get("original_layers", n), set(rec.get("dropped_layers", []))
    orig = [i for i in range(n_orig) if i not in before]
    rec["layers"] = {str(j): rec["layers"][str(i)] for j, i in enumerate(kept) if str(i) in rec["layers"]}
    rec["original_layers"], rec["dropped_layers"] = n_orig, sorted(before | {orig[i] for i in gone})
    cfg.sparsekern_structure = rec
    if getattr(cfg, "pruned_heads", None):
        cfg.pruned_heads = {kept.index(i): h for i, h in cfg.pruned_heads.items() if i in kept}
    return model
