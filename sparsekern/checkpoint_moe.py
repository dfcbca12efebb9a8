"""``SparseExperts`` in checkpoints: the layer entry, its checks, and rebuilding the module.

A pruned fused-experts module is stored as its stacks' tensors: N:M ``{name}.up_values``
``[E, up_out, hidden*n/m]``, ``{name}.up_meta``, ``{name}.down_values`` ``[E, hidden,
intermediate*n/m]`` and ``{name}.down_meta``; or BSR ``{name}.up_crow`` ``[E, up_out/bm + 1]``
(global block indices), ``up_col`` ``[nnz]``, ``up_blocks`` ``[nnz, bm, bk]`` and the same for
``down``. Plus an entry in ``layers`` (``sparsekern.json`` and the HF ``quantization_config``)::

    {"class": "SparseExperts", "kind": "nm", "pattern": "2:4", "n": 2, "m": 4, "experts": 8,
     "hidden": 1024, "intermediate": 3584, "has_gate": true, "dtype": "float32"}

(``"kind": "block", "block": [32, 32]`` in place of ``n`` / ``m`` for block-sparse experts).

Loading needs the dense architecture's experts module (for its activation and to check the
shapes); :mod:`sparsekern.checkpoint` (``sk.load``) and :mod:`sparsekern.hf.quantizer`
(``from_pretrained``) both build the module through :func:`build`.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.formats.nm import meta_words
from sparsekern.nn.moe import (
    FLOAT_TENSOR,
    STACK_TENSORS,
    SparseExperts,
    expert_views,
    experts_layout,
    find_experts,
    up_name,
)

CLASS = "SparseExperts"
TENSORS = {kind: tuple(f"{w}_{t}" for w in ("up", "down") for t in ts) for kind, ts in STACK_TENSORS.items()}
_FIELDS = {"experts": int, "hidden": int, "intermediate": int, "has_gate": bool}
_KIND_FIELDS = {"nm": {"n": int, "m": int}, "block": {"block": list}}


def entry(mod: SparseExperts) -> dict:
    """The ``layers`` entry of one ``SparseExperts`` module."""
    hidden, inter = mod.down_shape
    info = {"class": CLASS, "kind": mod.kind, "pattern": mod.pattern}
    info.update({"n": mod.n, "m": mod.m} if mod.kind == "nm" else {"block": list(mod.block)})
    info.update(experts=mod.num_experts, hidden=hidden, intermediate=inter, has_gate=mod.has_gate)
    info["dtype"] = str(mod.stack("up")[0 if mod.kind == "nm" else 2].dtype).removeprefix("torch.")
    return info


def tensors_of(info: dict) -> tuple[str, ...]:
    return TENSORS[info["kind"]]


def check_entry(info: dict, where: str) -> None:
    """Every field of a ``SparseExperts`` entry: a ValueError names the key."""
    kind = info.get("kind")
    if kind not in TENSORS:
        raise ValueError(f"{where}.kind: expected 'nm' or 'block' for {CLASS}, got {kind!r}")
    for key, typ in {**_FIELDS, **_KIND_FIELDS[kind]}.items():
        value = info.get(key)
        if typ is list:
            ok = isinstance(value, list) and len(value) == 2
            ok = ok and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in value)
            want = "[rows, cols] of positive ints"
        else:
            ok = isinstance(value, typ) and (typ is bool or (not isinstance(value, bool) and value > 0))
            want = "true or false" if typ is bool else "a positive int"
        if not ok:
            raise ValueError(f"{where}.{key}: expected {want}, got {value!r}")
    if info.get("quant") is not None:
        raise ValueError(f"{where}.quant: {CLASS} holds float values only, got {info['quant']!r}")
    up_out, h, i = (2 if info["has_gate"] else 1) * info["intermediate"], info["hidden"], info["intermediate"]
    rows, cols = (1, info["m"]) if kind == "nm" else info["block"]
    if up_out % rows or h % cols or h % rows or i % cols:
        raise ValueError(f"{where}: the {kind} pattern does not divide the expert shapes {(up_out, h)} and {(h, i)}")


def shapes(info: dict, nnz: dict[str, int] | None = None) -> dict[str, tuple[int, ...]]:
    """The stored shape of each tensor; block stacks need their block counts ``nnz[which]``."""
    e, h, i = info["experts"], info["hidden"], info["intermediate"]
    dims = {"up": ((2 if info["has_gate"] else 1) * i, h), "down": (h, i)}
    out = {}
    for which, (rows, k) in dims.items():
        if info["kind"] == "nm":
            n, m = info["n"], info["m"]
            kept = k // m * n
            out[f"{which}_values"], out[f"{which}_meta"] = (e, rows, kept), (e, rows, meta_words(kept, m))
        else:
            bm, bk = info["block"]
            count = nnz[which]
            out[f"{which}_crow"], out[f"{which}_col"] = (e, rows // bm + 1), (count,)
            out[f"{which}_blocks"] = (count, bm, bk)
    return out


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


def _dims(info: dict) -> dict[str, tuple[int, int]]:
    h, i = info["hidden"], info["intermediate"]
    return {"up": ((2 if info["has_gate"] else 1) * i, h), "down": (h, i)}


def check_shapes(info: dict, parts: dict[str, torch.Tensor]) -> None:
    """Each stored tensor has the shape the entry implies (block counts: as stored)."""
    nnz = {w: parts[f"{w}_blocks"].shape[0] for w in ("up", "down")} if info["kind"] == "block" else None
    want = shapes(info, nnz)
    for t in tensors_of(info):
        if tuple(parts[t].shape) != want[t]:
            raise ValueError(f"{t}: expected shape {want[t]}, got {tuple(parts[t].shape)}")


def weights(info: dict, parts: dict[str, torch.Tensor]) -> tuple[list, list]:
    """Per-expert up and down weights (views) from the stored tensors, shapes and ranges checked."""
    check_shapes(info, parts)
    n, m = info.get("n"), info.get("m")
    out = []
    for which, shape in _dims(info).items():
        stack = tuple(parts[f"{which}_{t}"] for t in STACK_TENSORS[info["kind"]])
        if info["kind"] == "block" and stack[0].dtype != torch.int32:
            raise ValueError(f"{which}_crow: expected int32, got {stack[0].dtype}")
        out.append(expert_views(stack, shape, n, m, f"{which}_crow"))
    return out[0], out[1]


def build(mod: nn.Module, info: dict, parts: dict[str, torch.Tensor], dtype=None, device=None) -> SparseExperts:
    """A ``SparseExperts`` replacing ``mod`` from the stored tensors (or meta-device placeholders),
    in ``dtype`` / on ``device`` (default: those of ``mod``'s weights). Contents are not read:
    callers validate them (:func:`weights` + :func:`validate`, or after a loader fills them)."""
    check_shapes(info, parts)
    ref = mod.floating("up") if isinstance(mod, SparseExperts) else getattr(mod, up_name(mod))
    dtype, device = dtype or ref.dtype, device or ref.device
    names, floating = STACK_TENSORS[info["kind"]], FLOAT_TENSOR[info["kind"]]
    up, down = (
        tuple(parts[f"{w}_{t}"].to(dtype) if t == floating else parts[f"{w}_{t}"] for t in names)
        for w in ("up", "down")
    )
    dims = _dims(info)
    pattern = {"n": info["n"], "m": info["m"]} if info["kind"] == "nm" else {"block": tuple(info["block"])}
    shapes_ = (dims["up"], dims["down"])
    return SparseExperts(info["kind"], up, down, shapes_, mod.act_fn, info["has_gate"], **pattern).to(device)


def validate(up: list, down: list) -> None:
    """Check every expert's indices (read from a file, or after a loader copied bytes in)."""
    for which, ws in (("up", up), ("down", down)):
        for e, w in enumerate(ws):
            try:
                w.validate()
            except ValueError as exc:
                raise ValueError(f"{which} expert {e}: {exc}") from None
