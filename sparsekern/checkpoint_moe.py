"""``SparseExperts`` in checkpoints: the layer entry, its checks, and rebuilding the module.

A pruned fused-experts module is stored as four tensors, ``{name}.up_values`` ``[E, up_out,
hidden*n/m]``, ``{name}.up_meta``, ``{name}.down_values`` ``[E, hidden, intermediate*n/m]`` and
``{name}.down_meta``, plus an entry in ``layers`` (``sparsekern.json`` and the HF
``quantization_config`` alike)::

    {"class": "SparseExperts", "kind": "nm", "pattern": "2:4", "n": 2, "m": 4, "experts": 8,
     "hidden": 1024, "intermediate": 3584, "has_gate": true, "dtype": "float32"}

Loading needs the dense architecture's experts module (for its activation and to check the
shapes); :mod:`sparsekern.checkpoint` (``sk.load``) and :mod:`sparsekern.hf.quantizer`
(``from_pretrained``) both build the module through :func:`build`.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.formats.nm import NMSparseWeight, meta_words
from sparsekern.nn.moe import SparseExperts, experts_layout, find_experts, up_name

CLASS = "SparseExperts"
TENSORS = ("up_values", "up_meta", "down_values", "down_meta")
_FIELDS = {"n": int, "m": int, "experts": int, "hidden": int, "intermediate": int, "has_gate": bool}


def entry(mod: SparseExperts) -> dict:
    """The ``layers`` entry of one ``SparseExperts`` module."""
    hidden, inter = mod.down_shape
    return {
        "class": CLASS,
        "kind": "nm",
        "pattern": mod.pattern,
        "n": mod.n,
        "m": mod.m,
        "experts": mod.num_experts,
        "hidden": hidden,
        "intermediate": inter,
        "has_gate": mod.has_gate,
        "dtype": str(mod.up_values.dtype).removeprefix("torch."),
    }


def check_entry(info: dict, where: str) -> None:
    """Every field of a ``SparseExperts`` entry: a ValueError names the key."""
    if info.get("kind") != "nm":
        raise ValueError(f"{where}.kind: expected 'nm' for {CLASS}, got {info.get('kind')!r}")
    for key, typ in _FIELDS.items():
        value = info.get(key)
        ok = isinstance(value, typ) and (typ is bool or (not isinstance(value, bool) and value > 0))
        if not ok:
            raise ValueError(
                f"{where}.{key}: expected {'true or false' if typ is bool else 'a positive int'}, got {value!r}"
            )
    if info.get("quant") is not None:
        raise ValueError(f"{where}.quant: {CLASS} holds float values only, got {info['quant']!r}")
    if info["hidden"] % info["m"] or info["intermediate"] % info["m"]:
        raise ValueError(
            f"{where}: hidden {info['hidden']} and intermediate {info['intermediate']} must be divisible by m={info['m']}"
        )


def shapes(info: dict) -> dict[str, tuple[int, ...]]:
    """The stored shape of each of :data:`TENSORS`."""
    e, h, i, n, m = (info[k] for k in ("experts", "hidden", "intermediate", "n", "m"))
    up_out = (2 if info["has_gate"] else 1) * i
    kh, ki = h // m * n, i // m * n
    return {
        "up_values": (e, up_out, kh),
        "up_meta": (e, up_out, meta_words(kh, m)),
        "down_values": (e, h, ki),
        "down_meta": (e, h, meta_words(ki, m)),
    }


def check_module(mod: nn.Module, info: dict, where: str) -> None:
    """``mod`` (the model's module at the entry's name) must be a fused experts module of the entry's shape."""
    if not isinstance(mod, SparseExperts) and find_experts(mod).get("") is not mod:
        raise ValueError(f"{where}: expected a fused experts module in the model, got {type(mod).__name__}")
    why = None if isinstance(mod, SparseExperts) else experts_layout(mod)
    if why:
        raise ValueError(f"{where}: {why}")
    if isinstance(mod, SparseExperts):
        have = (mod.num_experts, *mod.down_shape, mod.has_gate)
    else:
        have = (*mod.down_proj.shape, getattr(mod, "has_gate", True))
    want = (info["experts"], info["hidden"], info["intermediate"], info["has_gate"])
    if have != want:
        raise ValueError(f"{where}: (experts, hidden, intermediate, has_gate) {want}, the model's module is {have}")


def weights(info: dict, parts: dict[str, torch.Tensor]) -> tuple[list[NMSparseWeight], list[NMSparseWeight]]:
    """Per-expert up and down weights from the four stored tensors, shapes checked."""
    want = shapes(info)
    for t in TENSORS:
        if tuple(parts[t].shape) != want[t]:
            raise ValueError(f"{t}: expected shape {want[t]}, got {tuple(parts[t].shape)}")
    h, i = info["hidden"], info["intermediate"]
    up_shape = ((2 if info["has_gate"] else 1) * i, h)
    n, m = info["n"], info["m"]
    up = [NMSparseWeight(v, mt, n, m, up_shape) for v, mt in zip(parts["up_values"], parts["up_meta"])]
    down = [NMSparseWeight(v, mt, n, m, (h, i)) for v, mt in zip(parts["down_values"], parts["down_meta"])]
    return up, down


def build(mod: nn.Module, info: dict, parts: dict[str, torch.Tensor], dtype=None, device=None) -> SparseExperts:
    """A ``SparseExperts`` replacing ``mod`` from the stored tensors (or meta-device placeholders)."""
    up, down = weights(info, parts)
    ref = mod.up_values if isinstance(mod, SparseExperts) else getattr(mod, up_name(mod))
    dtype, device = dtype or ref.dtype, device or ref.device
    move = [w.to(dtype) for w in up], [w.to(dtype) for w in down]
    new = SparseExperts(*move, mod.act_fn, info["has_gate"])
    return new if device is None else new.to(device)


def validate(up: list[NMSparseWeight], down: list[NMSparseWeight]) -> None:
    """Check every expert's indices (read from a file, or after a loader copied bytes in)."""
    for which, ws in (("up", up), ("down", down)):
        for e, w in enumerate(ws):
            try:
                w.validate()
            except ValueError as exc:
                raise ValueError(f"{which} expert {e}: {exc}") from None
