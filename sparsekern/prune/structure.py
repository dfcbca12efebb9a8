"""The shapes a structured-pruned model has, as checkpoint metadata, and rebuilding them on load.

:mod:`sparsekern.prune.structured` shrinks ``nn.Linear`` layers, changes head/channel counts held
by attention and MLP modules, drops whole layers and updates the HF config. transformers 5 cannot
rebuild any of that from a config (it ignores ``pruned_heads`` and has no per-layer sizes), so
:func:`describe` records it -- per-module linear shapes and count attributes, dropped layer
indices, the config fields touched -- and :func:`rebuild` applies the record to a model built
from the original (or the pruned) config, before its weights load.
"""

from __future__ import annotations

import torch
from torch import nn

# Module attributes structured.py rewrites; read back by the HF attention/MLP forward passes.
COUNT_ATTRS = ("num_attention_heads", "all_head_size", "num_key_value_groups", "intermediate_size")
CONFIG_KEYS = (
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
    "layer_types", "pruned_heads", "sparsekern_structure",
)  # fmt: skip


def is_pruned(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "sparsekern_structure", None) or getattr(cfg, "pruned_heads", None))


def describe(model: nn.Module) -> dict | None:
    """JSON-ready record of ``model``'s pruned structure; None if structured.py never touched it."""
    from sparsekern.nn.linear import SparseLinear
    from sparsekern.prune.structured import _find

    if not is_pruned(model):
        return None
    owner, attr, _ = _find(model)
    owner_name = next(n for n, m in model.named_modules() if m is owner)
    path = f"{owner_name}.{attr}" if owner_name else attr
    rec = model.config.sparsekern_structure or {}
    modules = {}
    for name, mod in model.named_modules():
        if not name.startswith(path + "."):
            continue
        entry = {a: getattr(mod, a) for a in COUNT_ATTRS if isinstance(getattr(mod, a, None), int)}
        if isinstance(mod, (nn.Linear, SparseLinear)):
            entry.update(out_features=mod.out_features, in_features=mod.in_features, bias=mod.bias is not None)
        if entry:
            modules[name] = entry
    config = {}
    for key in CONFIG_KEYS:
        value = getattr(model.config, key, None)
        if value is not None:
            config[key] = {str(k): list(v) for k, v in value.items()} if key == "pruned_heads" else value
    n_now = len(getattr(owner, attr))
    return {
        "layer_list": path,
        "original_layers": rec.get("original_layers", n_now),
        "dropped_layers": list(rec.get("dropped_layers", [])),
        "modules": modules,
        "config": config,
    }


_MISSING = object()


class _Undo:
    """setattr that remembers the old value; ``undo()`` restores all, newest first."""

    def __init__(self) -> None:
        self.done: list[tuple[object, str, object]] = []

    def set(self, obj, attr: str, value) -> None:
        self.done.append((obj, attr, getattr(obj, attr, _MISSING)))
        setattr(obj, attr, value)

    def undo(self) -> None:
        for obj, attr, old in reversed(self.done):
            if old is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)
        self.done = []


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def rebuild(model: nn.Module, record, where: str):
    """Shrink ``model`` to the structure in ``record`` (from :func:`describe`). Returns an undo callable.

    Modules only shrink: a recorded shape larger than the model's is a wrong architecture, refused
    with a ValueError naming ``where`` and the key. On any error the model is left as it was.
    """
    undo = _Undo()
    try:
        _rebuild(model, record, where, undo)
    except BaseException:
        undo.undo()
        raise
    return undo.undo


def _rebuild(model: nn.Module, record, where: str, undo: _Undo) -> None:
    from sparsekern.nn.linear import SparseLinear

    where = f"{where}: structure"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {record!r}")
    path, n_orig, dropped = record.get("layer_list"), record.get("original_layers"), record.get("dropped_layers")
    if not isinstance(path, str) or not _int(n_orig) or not isinstance(dropped, list) or not all(map(_int, dropped)):
        raise ValueError(
            f"{where}: layer_list/original_layers/dropped_layers: expected a module path, an int and a list of "
            f"ints, got {path!r}, {n_orig!r}, {dropped!r}"
        )
    try:
        layers = model.get_submodule(path)
    except AttributeError:
        layers = None
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{where}.layer_list: {path!r} is not a ModuleList of the model")
    n_kept = n_orig - len(set(dropped))
    if len(layers) == n_orig and dropped:
        kept = [i for i in range(n_orig) if i not in set(dropped)]
        owner_name, _, attr = path.rpartition(".")
        undo.set(model.get_submodule(owner_name) if owner_name else model, attr, nn.ModuleList(layers[i] for i in kept))
        for new_i, old_i in enumerate(kept):
            for mod in layers[old_i].modules():
                if _int(getattr(mod, "layer_idx", None)):
                    undo.set(mod, "layer_idx", new_i)
    elif len(layers) != n_kept:
        raise ValueError(
            f"{where}.original_layers: the checkpoint has {n_kept} of {n_orig} layers, the model has {len(layers)}"
        )

    modules = record.get("modules")
    if not isinstance(modules, dict):
        raise ValueError(f"{where}.modules: expected an object of module name -> shape, got {modules!r}")
    for name, entry in modules.items():
        key = f"{where}.modules[{name!r}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{key}: expected an object, got {entry!r}")
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{key}: not a module of the model") from None
        for attr in COUNT_ATTRS:
            if attr in entry:
                if not _int(entry[attr]) or not _int(getattr(mod, attr, None)):
                    raise ValueError(f"{key}.{attr}: expected an int on {type(mod).__name__}, got {entry[attr]!r}")
                if getattr(mod, attr) != entry[attr]:
                    undo.set(mod, attr, entry[attr])
        if "out_features" in entry:
            _shrink_linear(model, name, mod, entry, key, undo, SparseLinear)

    config = record.get("config", {})
    if not isinstance(config, dict) or not set(config) <= set(CONFIG_KEYS):
        raise ValueError(f"{where}.config: expected an object with keys from {CONFIG_KEYS}, got {config!r}")
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for k, v in config.items():
            if k == "pruned_heads":
                if not isinstance(v, dict) or not all(str(i).isdigit() and isinstance(h, list) for i, h in v.items()):
                    raise ValueError(f"{where}.config.pruned_heads: expected {{layer: [heads]}}, got {v!r}")
                v = {int(i): list(h) for i, h in v.items()}
            undo.set(cfg, k, v)


def _shrink_linear(model, name, mod, entry, key, undo: _Undo, sparse_cls) -> None:
    out, k, bias = entry.get("out_features"), entry.get("in_features"), entry.get("bias")
    if not (_int(out) and _int(k) and out > 0 and k > 0 and isinstance(bias, bool)):
        raise ValueError(f"{key}: expected out_features, in_features (positive ints) and bias (bool), got {entry!r}")
    if not isinstance(mod, (nn.Linear, sparse_cls)):
        raise ValueError(f"{key}: expected an nn.Linear in the model, got {type(mod).__name__}")
    have = (mod.out_features, mod.in_features, mod.bias is not None)
    if have == (out, k, bias):
        return
    if out > have[0] or k > have[1]:
        raise ValueError(f"{key}: pruned shape {(out, k)} is larger than the model's {have[:2]}")
    ref = mod.weight if isinstance(mod, nn.Linear) else mod.dtype_param()
    new = torch.nn.utils.skip_init(nn.Linear, k, out, bias=bias, device=ref.device, dtype=ref.dtype)
    new.train(mod.training)
    parent_name, _, child = name.rpartition(".")
    undo.set(model.get_submodule(parent_name) if parent_name else model, child, new)
