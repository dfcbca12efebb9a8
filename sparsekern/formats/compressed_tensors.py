"""compressed-tensors' ``sparse-24-bitmask`` 2:4 checkpoints (what llm-compressor writes), to and from N:M.

Fields relied on (compressed-tensors, ``compressors/sparse_compressors/sparse_24_bitmask.py`` and
``utils/helpers.py``):

- ``config.json``: ``quantization_config`` (older files: ``compression_config``) holds
  ``sparsity_config`` with ``"format": "sparse-24-bitmask"``. A ``config_groups`` entry there
  means the weights are also quantized (2:4 + W4A16 / W8A16): those checkpoints are read by
  :mod:`sparsekern.formats.compressed_tensors_quant` (:func:`read_layers` picks the reader).
- Per compressed layer, three tensors, named ``<layer>.shape``, ``<layer>.compressed``,
  ``<layer>.bitmask`` (current releases strip ``.weight`` from the prefix) or
  ``<layer>.weight.shape`` / ``.weight.compressed`` / ``.weight.bitmask`` (older releases);
  both are read.
- ``shape``: integer tensor holding the dense ``[rows, cols]`` (stored as ``[2, 1]``).
- ``compressed``: ``[rows, cols // 2]``, the kept values of each row in column order. The
  compressor keeps exactly 2 of every 4 (top-2 ``|w|``, so a group may keep explicit zeros).
- ``bitmask``: ``uint8 [rows, ceil(cols / 8)]`` = ``numpy.packbits(mask, axis=-1,
  bitorder="little")``: bit ``j % 8`` (least significant first) of byte ``j // 8`` flags column j.

The conversion to :class:`NMSparseWeight` is exact and never materialises the dense weight.
"""

from __future__ import annotations

import json
import os

import torch

from sparsekern.formats import compressed_tensors_quant as ctq
from sparsekern.formats.nm import NMSparseWeight, column_indices, pack_meta

FORMAT = "sparse-24-bitmask"
SUFFIXES = ("shape", "compressed", "bitmask")


def sparsity_config(config: dict) -> dict | None:
    """The ``sparsity_config`` of an HF ``config.json`` dict, or None."""
    for key in ("quantization_config", "compression_config"):
        section = config.get(key)
        if isinstance(section, dict) and isinstance(section.get("sparsity_config"), dict):
            return section["sparsity_config"]
    return None


def is_sparse24_bitmask(config: dict) -> bool:
    sc = sparsity_config(config)
    return sc is not None and sc.get("format") == FORMAT


def is_compressed_tensors(config: dict) -> bool:
    """Whether an HF ``config.json`` dict describes a compressed-tensors checkpoint."""
    return sparsity_config(config) is not None or ctq.section_of(config)[1].get("quant_method") == "compressed-tensors"


def check_supported(config: dict, where: str) -> None:
    """Refuse compressed-tensors configs this reader cannot convert exactly (before any weight is read)."""
    if ctq.is_quantized(config):
        ctq.read_config(config, where)
        return
    sc = sparsity_config(config)
    if sc is None or sc.get("format") != FORMAT:
        got = None if sc is None else sc.get("format")
        raise ValueError(f"{where}: expected a compressed-tensors sparsity_config with format {FORMAT!r}, got {got!r}")


def read_layers(config: dict, where: str, tensors: dict, origin: dict, model: torch.nn.Module) -> dict:
    """``{layer: (NMSparseWeight, bias, file)}`` for every compressed layer of a checkpoint whose
    ``config.json`` (at ``where``) is ``config``; the tensors used are popped from ``tensors``."""
    check_supported(config, where)
    if ctq.is_quantized(config):
        return ctq.quantized_layers(config, where, tensors, origin, dict(model.named_modules()))
    sparse = {}
    for layer, parts in find_layers(tensors).items():
        file = origin[parts["compressed"]]
        try:
            w = bitmask_to_nm(*(tensors.pop(parts[s]) for s in SUFFIXES), name=layer)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{file}: layer {layer!r}: {exc}") from None
        sparse[layer] = (w, tensors.pop(f"{layer}.bias", None), file)
    return sparse


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """``bool [rows, cols]`` -> ``uint8 [rows, ceil(cols/8)]``, little bit order (numpy.packbits)."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.int32, device=mask.device)
    padded[:, :cols] = mask.to(torch.int32)
    weights = 1 << torch.arange(8, dtype=torch.int32, device=mask.device)
    return (padded.view(rows, -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bitmask(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitmask`: ``bool [rows, cols]``."""
    bits = (bitmask.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32, device=bitmask.device)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :cols].bool()


def bitmask_to_nm(shape, compressed: torch.Tensor, bitmask: torch.Tensor, name: str = "weight") -> NMSparseWeight:
    """One layer's ``shape``/``compressed``/``bitmask`` tensors as an exact 2:4 :class:`NMSparseWeight`.

    ``ValueError`` (naming ``name``) for any inconsistency: shape, dtype, a group of 4 with
    more than 2 flags, a row whose flag count differs from the number of stored values.
    """
    if isinstance(shape, torch.Tensor):
        if shape.dtype.is_floating_point or shape.numel() != 2:
            raise ValueError(f"{name}.shape: expected 2 integers [rows, cols], got {shape.dtype} {tuple(shape.shape)}")
        shape = shape.flatten().tolist()
    rows, cols = (int(s) for s in shape)
    if rows < 1 or cols < 4 or cols % 4:
        raise ValueError(f"{name}.shape: expected [rows, cols] with cols divisible by 4, got {[rows, cols]}")
    if tuple(compressed.shape) != (rows, cols // 2):
        raise ValueError(f"{name}.compressed: expected shape {(rows, cols // 2)}, got {tuple(compressed.shape)}")
    want_bytes = -(-cols // 8)
    if bitmask.dtype not in (torch.uint8, torch.int8) or tuple(bitmask.shape) != (rows, want_bytes):
        raise ValueError(
            f"{name}.bitmask: expected uint8 of shape {(rows, want_bytes)}, got {bitmask.dtype} {tuple(bitmask.shape)}"
        )
    mask = unpack_bitmask(bitmask.view(torch.uint8), cols)
    groups = mask.view(rows, cols // 4, 4)
    count = groups.sum(-1)
    bad = (count > 2).nonzero()
    if bad.numel():
        r, g = (int(v) for v in bad[0])
        raise ValueError(f"{name}.bitmask: row {r}, group {g} flags {int(count[r, g])} of 4 weights; expected 2:4")
    short = (count.sum(-1) != cols // 2).nonzero()
    if short.numel():
        r = int(short[0])
        raise ValueError(
            f"{name}.bitmask: row {r} flags {int(count[r].sum())} weights but compressed stores {cols // 2} per row"
        )
    # Every group flags exactly 2 (at most 2 each, cols/2 in total): the flagged positions are
    # the in-group indices, ascending, and compressed already lists the values in that order.
    idx = groups.nonzero()[:, 2].view(rows, cols // 2)
    weight = NMSparseWeight(compressed.contiguous(), pack_meta(idx, 4), 2, 4, (rows, cols))
    return weight.validate()


def nm_to_bitmask(weight: NMSparseWeight) -> dict[str, torch.Tensor]:
    """A 2:4 :class:`NMSparseWeight` as ``{"shape", "compressed", "bitmask"}`` tensors."""
    if not isinstance(weight, NMSparseWeight) or (weight.n, weight.m) != (2, 4):
        raise ValueError(f"weight: expected a 2:4 NMSparseWeight, got {weight!r}")
    rows, cols = weight.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device)
    mask.scatter_(1, column_indices(weight.meta, 2, 4, weight.values.shape[1]), True)
    return {
        "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1),
        "compressed": weight.values.detach().cpu().contiguous(),
        "bitmask": pack_bitmask(mask).cpu(),
    }


def find_layers(keys) -> dict[str, dict[str, str]]:
    """``{layer: {"shape": key, "compressed": key, "bitmask": key}}`` for every compressed layer in ``keys``.

    ``layer`` is the module name (``.weight`` stripped). A layer missing one of the three
    tensors raises ``ValueError``.
    """
    found: dict[str, dict[str, str]] = {}
    for key in keys:
        base, _, last = key.rpartition(".")
        if last in SUFFIXES and base:
            layer = base[: -len(".weight")] if base.endswith(".weight") else base
            found.setdefault(layer, {})[last] = key
    for layer, parts in found.items():
        if set(parts) != set(SUFFIXES):
            if "compressed" not in parts and "bitmask" not in parts:
                continue  # a module whose own parameter happens to be called "shape"
            missing = sorted(set(SUFFIXES) - set(parts))
            raise ValueError(f"{layer}: compressed-tensors layer lacks tensor(s) {missing}")
    return {k: v for k, v in found.items() if set(v) == set(SUFFIXES)}


def to_sparse24_bitmask(model: torch.nn.Module, path: str, *, strip_weight_suffix: bool = True) -> list[str]:
    """Write ``model`` as a compressed-tensors ``sparse-24-bitmask`` checkpoint in directory ``path``.

    Every 2:4 :class:`SparseLinear` becomes ``<layer>.shape/.compressed/.bitmask`` (with
    ``strip_weight_suffix=False``: ``<layer>.weight.shape`` ..., the older naming); all other
    tensors are written as they are. Writes ``model.safetensors`` and ``config.json`` (the model's
    HF config if it has one, plus the ``quantization_config``). Returns the compressed layer names.
    Made for tests and interop checks, not as an export path for serving.
    """
    from safetensors.torch import save_file

    from sparsekern.nn.linear import SparseLinear

    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear) and mod.block is None and (mod.n, mod.m) == (2, 4):
            prefix = name if strip_weight_suffix else f"{name}.weight"
            for suffix, t in nm_to_bitmask(mod.sparse_weight).items():
                tensors[f"{prefix}.{suffix}"] = t
            if mod.bias is not None:
                tensors[f"{name}.bias"] = mod.bias.detach().cpu().contiguous()
            layers.append(name)
    covered = {f"{n}.{t}" for n in layers for t in ("values", "meta", "bias")}
    seen: dict[int, str] = {}
    for key, t in model.state_dict().items():
        if key in covered:
            continue
        if t.data_ptr() in seen and t.numel():  # tied weights: saved once, like HF
            continue
        seen[t.data_ptr()] = key
        tensors[key] = t.detach().cpu().contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else {}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "sparsity_config": {
            "format": FORMAT,
            "sparsity_structure": "2:4",
            "targets": sorted(layers),
            "ignore": [],
            "global_sparsity": 0.5,
        },
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, default=str)
    return layers
