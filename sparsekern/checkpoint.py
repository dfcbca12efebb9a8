"""Compressed checkpoints: ``save(model, dir)`` / ``load(dir, model)``.

A sparsekern checkpoint is a directory with

- ``model.safetensors``: every tensor of ``model.state_dict()`` as it is, so a ``SparseLinear``
  contributes its compressed ``values``/``meta`` (or ``crow_indices``/``col_indices``/``blocks``)
  and ``bias``, never a dense weight. Tensors that share storage (tied embeddings) are written
  once; the others are listed as aliases.
- ``sparsekern.json``: format version, sparsekern version, and per sparse layer its class,
  pattern, shape, dtype and bias flag; for a structured-pruned model also its ``structure``
  (:mod:`sparsekern.prune.structure`), from which ``load`` shrinks a model built from the
  original config.

``load(dir, model)`` takes the dense architecture (e.g. built from the same HF config), swaps in
``SparseLinear`` for the layers listed (no re-pruning) and loads every tensor. It also reads
compressed-tensors checkpoints (detected from ``config.json``): ``sparse-24-bitmask``, and 2:4 +
W4A16 / W8A16 (``pack-quantized``, ``marlin-24``; see :mod:`sparsekern.formats.compressed_tensors`).
Everything is validated before the model is touched: file integrity (a truncated file names the
tensor cut off), missing and unexpected keys, shapes, dtypes and sparse index validity. A refused
checkpoint leaves the model unchanged.

Safe inputs: file names read from the JSON (``weights``, shard names of an index) must resolve
inside the folder (:func:`sparsekern.folder.resolve_inside`); malformed JSON, a missing key or
a wrong type is a ``ValueError`` naming the file and the key. ``save`` writes the whole folder
atomically (:func:`sparsekern.folder.write_folder`).
"""

from __future__ import annotations

import json
import os
import struct

import torch
from torch import nn

from sparsekern import checkpoint_moe as experts_ckpt
from sparsekern.folder import read_json, resolve_inside, write_folder
from sparsekern.formats.bsr import BlockSparseWeight
from sparsekern.formats.nm import NMSparseWeight
from sparsekern.formats.quant import QUANTS
from sparsekern.nn import quant_linear as quant_head
from sparsekern.nn.decode_attention import use_decode_attention
from sparsekern.nn.dense_head import use_dense_head
from sparsekern.nn.linear import SparseLinear, is_conv1d, linear_features
from sparsekern.nn.moe import SparseExperts
from sparsekern.nn.quant_linear import QuantLinear
from sparsekern.prune.structure import describe, rebuild

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "sparsekern.json"
_ST_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


# -- save ------------------------------------------------------------------------------------


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> None:
    """Write ``model`` (sparsified or not) to directory ``path`` as compressed safetensors + JSON.

    For a transformers ``PreTrainedModel`` the folder is also a complete HF folder
    (``config.json`` with ``quantization_config``, ``generation_config.json``, and the
    ``tokenizer``'s files when one is passed): after ``import sparsekern``,
    ``AutoModelForCausalLM.from_pretrained(path)`` loads it (:mod:`sparsekern.hf`).

    The folder is built beside ``path`` and renamed into place once complete; an existing
    ``path`` must be empty or an earlier sparsekern checkpoint (see ``write_folder``).
    """
    from safetensors.torch import save_file

    import sparsekern

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected torch.nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, SparseExperts):
            layers[name] = experts_ckpt.entry(mod)
        elif isinstance(mod, QuantLinear):
            layers[name] = quant_head.entry(mod)
        elif isinstance(mod, SparseLinear):
            info = {
                "class": "SparseLinear",
                "kind": mod.kind,
                "pattern": mod.pattern,
                "in_features": mod.in_features,
                "out_features": mod.out_features,
                "bias": mod.bias is not None,
                "dtype": str(mod.dtype).removeprefix("torch."),
            }
            info.update({"n": mod.n, "m": mod.m} if mod.block is None else {"block": list(mod.block)})
            if mod.quant is not None:
                info.update(quant=mod.quant, group_size=mod.group_size, zeros=mod.zeros is not None)
                if mod.act_block:
                    info["act_block"] = mod.act_block
            layers[name] = info
    tensors, aliases, first = {}, {}, {}
    for key, t in model.state_dict().items():
        ident = (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and ident in first:
            aliases[key] = first[ident]
            continue
        first[ident] = key
        tensors[key] = t.detach().to("cpu").contiguous()
    config = {
        "format": "sparsekern",
        "format_version": FORMAT_VERSION,
        "sparsekern_version": sparsekern.__version__,
        "weights": WEIGHTS,
        "layers": layers,
        "aliases": aliases,
    }
    structure = describe(model)  # shapes left by structured pruning (heads, channels, layers)
    if structure is not None:
        config["structure"] = structure

    def write_config(file: str) -> None:
        with open(file, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)

    from sparsekern.hf.export import hf_files

    meta = {"format": "pt", "sparsekern_format_version": str(FORMAT_VERSION)}
    writers = {WEIGHTS: lambda file: save_file(tensors, file, metadata=meta), CONFIG: write_config}
    writers.update(hf_files(model, layers, tokenizer))
    write_folder(path, writers)


# -- reading safetensors with integrity checks -----------------------------------------------


def check_safetensors(file: str) -> dict:
    """Parse the header of ``file`` and check every tensor lies inside the file. Returns the header.

    Anything that is not a well-formed safetensors file (truncated, garbled header, offsets out
    of the file) is a ``ValueError`` naming ``file``.
    """
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{file}: truncated or not a safetensors file ({size} bytes, no header)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > size - 8:
            raise ValueError(f"{file}: truncated: header claims {hlen} bytes, file has {size - 8} after the length")
        try:
            header = json.loads(f.read(hlen))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{file}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    data = size - 8 - hlen
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape, dtype, offsets = (entry.get(k) if isinstance(entry, dict) else None for k in _ST_FIELDS)
        if not (
            _int_list(shape) and isinstance(dtype, str) and _int_list(offsets) and len(offsets) == 2
            and 0 <= offsets[0] <= offsets[1]
        ):  # fmt: skip
            raise ValueError(f"{file}: corrupt safetensors header: tensor {name!r}: {entry!r}")
        start, end = offsets
        numel = 1
        for s in shape:
            numel *= s
        item = _ST_DTYPES.get(dtype)
        if item is not None and end - start != numel * item:
            raise ValueError(f"{file}: tensor {name!r}: {end - start} bytes for shape {shape} {dtype}")
        if end > data:
            raise ValueError(
                f"{file}: truncated: tensor {name!r} needs bytes {start}..{end} of the data section, "
                f"which holds only {data} bytes"
            )
    return header


_ST_FIELDS = ("shape", "dtype", "data_offsets")


def _int_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def read_tensors(files: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of ``files`` (validated first) and the file each came from."""
    from safetensors import safe_open

    for file in files:
        check_safetensors(file)
    tensors, origin = {}, {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key in tensors:
                        raise ValueError(f"{file}: tensor {key!r} also appears in {origin[key]}")
                    tensors[key], origin[key] = f.get_tensor(key), file
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001  (safetensors' own error type: overlaps, bad dtypes)
            raise ValueError(f"{file}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    return tensors, origin


def weight_files(path: str) -> list[str]:
    """The safetensors files of folder ``path``: ``model.safetensors`` or the shards its index names."""
    single = os.path.join(path, WEIGHTS)
    if os.path.exists(single):
        return [resolve_inside(path, WEIGHTS, path, "weights")]
    index = os.path.join(path, WEIGHTS + ".index.json")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: weight_map: expected an object of tensor -> file, got {weight_map!r}")
        bad = [v for v in weight_map.values() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{index}: weight_map: expected file names, got {bad[0]!r}")
        shards = sorted(set(weight_map.values()))
        return [resolve_inside(path, s, index, f"weight_map shard {s!r}") for s in shards]
    raise FileNotFoundError(f"path: no {WEIGHTS} or {WEIGHTS}.index.json in {path}")


# -- load ------------------------------------------------------------------------------------


def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a checkpoint from directory ``path`` into ``model`` (in place; also returned).

    ``model`` is the dense architecture; layers stored sparse are swapped to ``SparseLinear``
    in the dtype and on the device of the layer they replace; where any layer is, a dense LM head
    becomes a :class:`~sparsekern.nn.dense_head.DenseHead` (where its GEMV runs here), as
    ``sparsify`` left it.
    """
    from sparsekern.formats import compressed_tensors as ct

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected torch.nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: {path} is not a directory")
    cfg_file, hf_file = os.path.join(path, CONFIG), os.path.join(path, "config.json")
    hf_config = read_json(hf_file) if os.path.exists(hf_file) else None
    undo = None  # set where the folder's structure is rebuilt: put back if the layers fail
    if os.path.exists(cfg_file):
        config = read_json(cfg_file)
        if config.get("format") != "sparsekern" or config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{cfg_file}: expected format 'sparsekern' version {FORMAT_VERSION}, got "
                f"{config.get('format')!r} version {config.get('format_version')!r}"
            )
        layers, aliases = check_config(config, cfg_file)
        weights = resolve_inside(path, config.get("weights", WEIGHTS), cfg_file, "weights")
        tensors, origin = read_tensors([weights])
        for alias, target in aliases.items():
            if target not in tensors:
                raise ValueError(f"{cfg_file}: alias {alias!r} points to {target!r}, which is not in the file")
            tensors[alias] = tensors[target]
        sparse = _native_layers(layers, tensors, origin, cfg_file)
        if "structure" in config:
            undo = rebuild(model, config["structure"], cfg_file)
    elif hf_config is not None and ct.is_compressed_tensors(hf_config):
        ct.check_supported(hf_config, hf_file)  # a refused config reads no weights
        tensors, origin = read_tensors(weight_files(path))
        sparse = ct.read_layers(hf_config, hf_file, tensors, origin, model)
    else:
        raise FileNotFoundError(f"path: {path} has neither {CONFIG} nor a compressed-tensors config.json")
    try:
        _apply(model, sparse, tensors, origin)
    except BaseException:
        if undo is not None:
            undo()
        raise
    if sparse:  # as sparsify left it (a dense checkpoint loads as it was saved)
        use_decode_paths(model)
    return model


def use_decode_paths(model) -> None:
    """What ``sparsify`` leaves on a model besides its layers, for the loaders of a sparsekern
    folder (:func:`load`, the HF quantizer): the dense LM head's decode rows on the GEMV
    (:func:`use_dense_head`) and decode attention (:func:`use_decode_attention`)."""
    use_dense_head(model)
    use_decode_attention(model)


_LAYER_FIELDS = {
    "nm": {"in_features": int, "out_features": int, "bias": bool, "n": int, "m": int},
    "block": {"in_features": int, "out_features": int, "bias": bool, "block": list},
}


def check_config(config: dict, cfg_file: str) -> tuple[dict, dict]:
    """``layers`` and ``aliases`` of ``sparsekern.json``, every field checked: a ValueError names the key."""
    layers, aliases = config.get("layers"), config.get("aliases", {})
    if not isinstance(layers, dict):
        raise ValueError(f"{cfg_file}: layers: expected an object of layer name -> entry, got {layers!r}")
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise ValueError(f"{cfg_file}: aliases: expected an object of tensor name -> tensor name, got {aliases!r}")
    for name, info in layers.items():
        where = f"{cfg_file}: layers[{name!r}]"
        if not isinstance(info, dict):
            raise ValueError(f"{where}: expected an object, got {info!r}")
        if info.get("class") == experts_ckpt.CLASS:
            experts_ckpt.check_entry(info, where)
            continue
        if info.get("class") == quant_head.CLASS:
            quant_head.check_entry(info, where)
            continue
        if info.get("class") != "SparseLinear":
            raise ValueError(
                f"{where}.class: expected 'SparseLinear', 'SparseExperts' or 'QuantLinear', got {info.get('class')!r}"
            )
        kind = info.get("kind")
        if kind not in _LAYER_FIELDS:
            raise ValueError(f"{where}.kind: expected one of {sorted(_LAYER_FIELDS)}, got {kind!r}")
        for key, typ in _LAYER_FIELDS[kind].items():
            value = info.get(key)
            ok = isinstance(value, typ) and (typ is bool or not isinstance(value, bool))
            if ok and typ is int:
                ok = value > 0
            if ok and key == "block":
                ok = len(value) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in value)
            if not ok:
                want = {int: "a positive int", bool: "true or false", list: "[rows, cols] of positive ints"}[typ]
                raise ValueError(f"{where}.{key}: expected {want}, got {value!r}")
        check_quant_fields(info, where)
    return layers, aliases


def check_quant_fields(info: dict, where: str) -> None:
    """The optional ``quant`` / ``group_size`` / ``zeros`` of an N:M or block layer entry
    (``act_block``: N:M only)."""
    if info.get("quant") is None:
        if any(key in info for key in ("group_size", "zeros", "act_block")):
            raise ValueError(f"{where}: group_size/zeros/act_block given without quant")
        return
    if info["quant"] not in QUANTS:
        raise ValueError(f"{where}.quant: expected one of {QUANTS}, got {info['quant']!r}")
    size, zeros = info.get("group_size"), info.get("zeros")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"{where}.group_size: expected an int >= 0, got {size!r}")
    if not isinstance(zeros, bool):
        raise ValueError(f"{where}.zeros: expected true or false, got {zeros!r}")
    act = info.get("act_block", 0)
    if not isinstance(act, int) or isinstance(act, bool) or act < 0:
        raise ValueError(f"{where}.act_block: expected an int >= 0, got {act!r}")
    if act and info["kind"] != "nm":
        raise ValueError(
            f"{where}.act_block: int8 activations are for 'nm' layers, got {act} on a {info['kind']!r} layer"
        )


def layer_tensors(info: dict) -> tuple[str, ...]:
    """Names of the tensors a layer entry stores (bias aside)."""
    if info.get("class") == experts_ckpt.CLASS:
        return experts_ckpt.tensors_of(info)
    if info.get("class") == quant_head.CLASS:
        return quant_head.TENSORS
    names = ("values", "meta") if info["kind"] == "nm" else ("crow_indices", "col_indices", "blocks")
    if info.get("quant") is None:
        return names
    return names + ("scales",) + (("zeros",) if info["zeros"] else ())


def _native_layers(layers: dict, tensors: dict, origin: dict, cfg_file: str) -> dict:
    out = {}
    for name, info in layers.items():
        names = layer_tensors(info)
        keys = [f"{name}.{t}" for t in names]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ValueError(f"{cfg_file}: layer {name!r}: tensors {missing} missing from the weights file")
        where = origin.get(keys[0], cfg_file)
        shape = (info.get("out_features"), info.get("in_features"))
        try:
            parts = [tensors.pop(k) for k in keys]
            if info.get("class") == experts_ckpt.CLASS:
                w = dict(zip(names, parts))
                experts_ckpt.validate(*experts_ckpt.weights(info, w))
                out[name] = (w, info, where)
                continue
            if info.get("class") == quant_head.CLASS:
                bias = tensors.pop(f"{name}.bias", None)
                out[name] = (quant_head.from_parts(info, *parts, bias), None, where)
                continue
            if info["kind"] == "nm" and info.get("quant") is not None:
                values, meta, scales, zeros = (*parts, None)[:4]
                quant = (scales, zeros, info["group_size"], info.get("act_block", 0))
                w = NMSparseWeight(values, meta, info["n"], info["m"], shape, *quant)
                if w.quant != info["quant"]:
                    raise ValueError(f"values: expected {info['quant']} values, got dtype {values.dtype}")
                w.validate()
            elif info["kind"] == "nm":
                w = NMSparseWeight(*parts, info["n"], info["m"], shape).validate()
            else:
                crow, col, blocks, scales, zeros = (*parts, None, None)[:5]
                w = BlockSparseWeight(crow, col, blocks, shape, scales, zeros)
                if w.quant != info.get("quant"):
                    raise ValueError(
                        f"blocks: expected {info.get('quant') or 'float'} blocks, got dtype {blocks.dtype}"
                    )
                w.validate()
                if list(w.block) != list(info["block"]):
                    raise ValueError(f"blocks: expected block {info['block']}, got {list(w.block)}")
                if w.quant is not None and w.group_size != info["group_size"]:
                    raise ValueError(f"scales: expected group_size {info['group_size']}, got {w.group_size}")
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: layer {name!r}: {exc}") from None
        bias = tensors.pop(f"{name}.bias", None)
        if info["bias"] and bias is None:
            raise ValueError(f"{where}: layer {name!r}: tensor {name + '.bias'!r} missing")
        out[name] = (w, bias, where)
    return out


def _apply(model: nn.Module, sparse: dict, tensors: dict, origin: dict) -> None:
    """Validate the remaining tensors against ``model``, then swap layers and load. All or nothing."""
    modules = dict(model.named_modules())
    new_modules = {}
    for name, (w, bias, where) in sparse.items():
        mod = modules.get(name)
        if mod is None:
            raise ValueError(f"{where}: layer {name!r} is not a module of the model")
        if isinstance(w, dict):  # SparseExperts: w holds its four tensors, bias its entry
            experts_ckpt.check_module(mod, bias, f"{where}: layer {name!r}")
            new_modules[name] = experts_ckpt.build(mod, bias, w)
            continue
        if isinstance(w, QuantLinear):  # built whole from the file (bias included)
            if not isinstance(mod, (nn.Linear, QuantLinear)) or (mod.out_features, mod.in_features) != (
                w.out_features,
                w.in_features,
            ):
                got = type(mod).__name__ + (
                    f" {mod.out_features}x{mod.in_features}" if hasattr(mod, "in_features") else ""
                )
                raise ValueError(
                    f"{where}: layer {name!r}: expected an nn.Linear {w.out_features}x{w.in_features} in the model, got {got}"
                )
            if (getattr(mod, "bias", None) is not None) != (w.bias is not None):
                raise ValueError(
                    f"{where}: layer {name!r}: bias {'missing' if w.bias is None else 'unexpected'} in checkpoint"
                )
            ref = mod.scales if isinstance(mod, QuantLinear) else mod.weight
            new_modules[name] = w.to(device=ref.device, dtype=ref.dtype)
            continue
        if not (isinstance(mod, (nn.Linear, SparseLinear)) or is_conv1d(mod)):
            raise ValueError(f"{where}: layer {name!r}: expected an nn.Linear in the model, got {type(mod).__name__}")
        k, out = (mod.in_features, mod.out_features) if isinstance(mod, SparseLinear) else linear_features(mod)
        if (out, k) != tuple(w.shape):
            raise ValueError(f"{where}: layer {name!r}: weight shape {tuple(w.shape)}, model expects {(out, k)}")
        has_bias = getattr(mod, "bias", None) is not None
        if has_bias != (bias is not None):
            raise ValueError(f"{where}: layer {name!r}: bias {'missing' if has_bias else 'unexpected'} in checkpoint")
        if bias is not None and tuple(bias.shape) != (out,):
            raise ValueError(f"{where}: layer {name!r}: bias shape {tuple(bias.shape)}, expected {(out,)}")
        ref = mod.dtype_param() if isinstance(mod, SparseLinear) else mod.weight
        w = w.to(device=ref.device, dtype=ref.dtype)
        layer = SparseLinear(w, None if bias is None else bias.to(device=ref.device, dtype=ref.dtype))
        layer.requires_grad_(ref.requires_grad)
        new_modules[name] = layer

    own = model.state_dict()
    replaced = tuple(f"{n}." for n in new_modules)
    expected = {k: v for k, v in own.items() if not k.startswith(replaced)}
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(
            f"{origin.get(unexpected[0], 'checkpoint')}: unexpected tensors not in the model: {unexpected[:8]}"
        )
    present = {(v.data_ptr(), tuple(v.shape)) for k, v in expected.items() if k in tensors}
    # A key absent from the file is fine only when it is tied to one that is present (HF omits tied lm_head).
    missing = sorted(
        k for k, v in expected.items() if k not in tensors and (v.data_ptr(), tuple(v.shape)) not in present
    )
    if missing:
        raise ValueError(f"checkpoint: tensors missing for model keys {missing[:8]} ({len(missing)} in all)")
    for key, t in tensors.items():
        want = expected[key]
        if tuple(t.shape) != tuple(want.shape):
            raise ValueError(
                f"{origin.get(key)}: tensor {key!r} has shape {tuple(t.shape)}, model expects {tuple(want.shape)}"
            )
        if t.is_floating_point() != want.is_floating_point() or (
            not want.is_floating_point() and t.dtype != want.dtype
        ):
            raise ValueError(f"{origin.get(key)}: tensor {key!r} has dtype {t.dtype}, model expects {want.dtype}")

    # Validated: from here on nothing can refuse the checkpoint.
    for name, layer in new_modules.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
