"""compressed-tensors checkpoints whose 2:4 weights are also quantized (2:4 + W4A16 / W8A16).

What llm-compressor writes for a 2:4 model with weight-only int quantization, and how each layer
becomes an exact quantized :class:`NMSparseWeight` (integers copied, scales as stored). Facts
relied on, from vllm-project/compressed-tensors (``src/compressed_tensors/``, 0.14.0.1 unless
said) and vllm-project/llm-compressor 0.10.0.3 (``src/llmcompressor/``):

- ``config.json`` ``quantization_config`` (``compression_config`` in old files):
  ``config_groups.<g>`` = ``{targets, weights, input_activations, output_activations, format}``,
  ``weights`` = ``{num_bits, type, symmetric, strategy, group_size, actorder, dynamic, ...}``, a
  missing strategy inferred from ``group_size`` (``quantization/quant_config.py``,
  ``quant_scheme.py``, ``quant_args.py``); also ``format``, ``ignore``, ``kv_cache_scheme``,
  ``quantization_status``, ``sparsity_config``, ``transform_config``. A layer matches a group's
  ``targets`` (and no ``ignore`` entry) by exact name, ``"re:<regex>"`` (``re.match``) or a class
  name in its MRO (``utils/match.py``).
- ``sparsity_config`` next to weight-only quantization: ``{"format": "dense",
  "sparsity_structure": "2:4", ...}`` (llm-compressor ``transformers/compression/
  sparsity_metadata_config.py``: no ``sparse-24-bitmask`` for weight-only schemes), ``{}`` from
  compressed-tensors 0.15 on (0.20.0 ``compressors/model_compressors/model_compressor.py``:
  "sparsity is removed for now"). Either way the 2:4 pattern is read from the integers.
- Format (``config/format.py``): 2:4 + channel/group weight-only int4/int8 is ``marlin-24``
  (:mod:`.compressed_tensors_marlin24`) unless ``pack-quantized`` was forced; every 2:4 W4A16
  from 0.15 on is ``pack-quantized``. (``naive-quantized`` /
  ``int-quantized`` are written for other bit widths or with activation quantization, both
  refused, so they are not read.)
- ``pack-quantized`` (``compressors/quantized_compressors/{pack_quantized,base}.py``; 0.20.0
  ``compressors/pack_quantized/{base,helpers}.py`` packs 4 and 8 bits the same way):
  ``weight_packed int32 [out, ceil(K*bits/32)]``, signed ``q`` offset by ``2**(bits-1)``, column
  ``8w+i`` (int4) / ``4w+i`` (int8) in bits ``bits*i`` of word ``w``; ``weight_shape`` =
  ``[out, K]``; ``weight_scale [out, groups]`` (``[out, 1]`` channel) in the model's dtype;
  ``weight_zero_point`` only when asymmetric, packed the same way along dim 0 (``int32
  [ceil(out*bits/32), groups]``) since 0.9.4, ``int8 [out, groups]`` before
  (``quantization/lifecycle/initialize.py``); ``weight_g_idx int32 [K]`` with ``actorder: group``.
- Dequantization (``quantization/lifecycle/forward.py``): ``w = (q - zp) * scale`` in the
  scale's dtype, column j in group ``j // group_size`` (or ``g_idx[j]`` unless it holds -1); one
  group when ``K <= group_size``.

Refused (``ValueError`` naming the file and the key): activation or KV-cache quantization, a
transform config, float (fp8/fp4) or other than 4/8-bit weights, strategies other than
channel and group, dynamic weights, formats other than the two above (a ``sparse-24-bitmask`` sparsity format stacked on
quantization included), a ``sparsity_structure`` other than 2:4, act-order ``g_idx`` that is not
the column order, and any quantized layer whose integers break 2:4: every such layer is listed,
since sparsekern has no dense quantized layer to hold it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from sparsekern.formats import quant as q
from sparsekern.formats.compressed_tensors_marlin24 import marlin24_to_nm, unpack_words
from sparsekern.formats.nm import NMSparseWeight, column_indices

FORMATS = ("pack-quantized", "marlin-24")
STRATEGIES = ("channel", "group")
_TENSORS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx", "scale_packed", "meta")  # fmt: skip
_REQUIRED = {
    "pack-quantized": ("weight_packed", "weight_shape", "weight_scale"),
    "marlin-24": ("weight_packed", "scale_packed", "meta"),
}


@dataclass(frozen=True)
class Scheme:
    """The weight quantization of one ``config_groups`` entry."""

    group: str
    targets: tuple[str, ...]
    bits: int
    symmetric: bool
    strategy: str
    group_size: int | None
    format: str


def section_of(config: dict) -> tuple[str, dict]:
    for key in ("quantization_config", "compression_config"):
        if isinstance(config.get(key), dict):
            return key, config[key]
    return "quantization_config", {}


def is_quantized(config: dict) -> bool:
    return bool(section_of(config)[1].get("config_groups"))


def read_config(config: dict, file: str) -> tuple[list[Scheme], list[str]]:
    """The weight schemes and ``ignore`` list of a quantized compressed-tensors ``config.json``."""
    name, sec = section_of(config)
    where = f"{file}: {name}"
    sparsity = sec.get("sparsity_config") or {}
    if not isinstance(sparsity, dict):
        raise ValueError(f"{where}.sparsity_config: expected an object, got {sparsity!r}")
    if sparsity and sparsity.get("format") != "dense":
        raise ValueError(
            f"{where}.sparsity_config.format: expected 'dense' next to quantized weights (what llm-compressor "
            f"writes for weight-only schemes), got {sparsity.get('format')!r}"
        )
    if sparsity and str(sparsity.get("sparsity_structure", "")).lower() != "2:4":
        raise ValueError(
            f"{where}.sparsity_config.sparsity_structure: expected '2:4', got {sparsity.get('sparsity_structure')!r}"
        )
    for key, want in (("quantization_status", "compressed"), ("kv_cache_scheme", None)):
        if key in sec and sec[key] != want:
            raise ValueError(f"{where}.{key}: expected {want!r} (weight-only, compressed), got {sec[key]!r}")
    if sec.get("transform_config"):
        raise ValueError(
            f"{where}.transform_config: online transforms (rotations) are not supported, got {sec['transform_config']!r}"
        )
    ignore = sec.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(s, str) for s in ignore):
        raise ValueError(f"{where}.ignore: expected a list of names, got {ignore!r}")
    groups = sec.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{where}.config_groups: expected a non-empty object, got {groups!r}")
    return [_scheme(g, entry, sec.get("format"), f"{where}.config_groups.{g}") for g, entry in groups.items()], ignore


def _scheme(group: str, entry, default_format, where: str) -> Scheme:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object (targets, weights, ...), got {entry!r}")
    for key in ("input_activations", "output_activations"):
        if entry.get(key) is not None:
            raise ValueError(
                f"{where}.{key}: activation quantization is not supported (weight-only W4A16/W8A16), got {entry[key]!r}"
            )
    targets = entry.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{where}.targets: expected a list of names, got {targets!r}")
    fmt = entry.get("format") or default_format
    if fmt not in FORMATS:
        raise ValueError(f"{where}.format: expected one of {FORMATS}, got {fmt!r}")
    w = entry.get("weights")
    if not isinstance(w, dict):
        raise ValueError(f"{where}.weights: expected an object, got {w!r}")
    if w.get("strategy") is None:  # compressed-tensors infers it from group_size (quant_args.py)
        size = w.get("group_size")
        w = {**w, "strategy": {None: "tensor", -1: "channel"}.get(size, "group" if isinstance(size, int) else None)}
    checks = {
        "type": (w.get("type", "int") == "int", "'int' (float weights such as fp8 are not read)"),
        "num_bits": (w.get("num_bits", 8) in (4, 8), "4 or 8"),
        "strategy": (w.get("strategy") in STRATEGIES, f"one of {STRATEGIES}"),
        "symmetric": (isinstance(w.get("symmetric", True), bool), "true or false"),
        "dynamic": (w.get("dynamic", False) is False, "false (scales stored with the weights)"),
        "block_structure": (w.get("block_structure") is None, "null"),
    }
    for key, (ok, want) in checks.items():
        if not ok:
            raise ValueError(f"{where}.weights.{key}: expected {want}, got {w.get(key)!r}")
    size = w.get("group_size")
    if w["strategy"] == "group" and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ValueError(f"{where}.weights.group_size: expected a positive int for strategy 'group', got {size!r}")
    if fmt == "marlin-24" and (w.get("actorder") in (True, "group", "dynamic") or not w.get("symmetric", True)):
        raise ValueError(
            f"{where}.weights: marlin-24 holds symmetric weights in column order only, got "
            f"symmetric={w.get('symmetric')!r}, actorder={w.get('actorder')!r}"
        )
    return Scheme(group, tuple(targets), w.get("num_bits", 8), w.get("symmetric", True), w["strategy"],
                  size if w["strategy"] == "group" else None, fmt)  # fmt: skip


def _matches(name: str, module: torch.nn.Module, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or any(cls.__name__ == target for cls in type(module).__mro__)


def scheme_for(name: str, module: torch.nn.Module, schemes: list[Scheme], ignore: list[str]) -> Scheme | None:
    """The first config group that targets module ``name`` (compressed-tensors' matching rule)."""
    if any(_matches(name, module, t) for t in ignore):
        return None
    return next((s for s in schemes if any(_matches(name, module, t) for t in s.targets)), None)


def find_layers(keys) -> dict[str, dict[str, str]]:
    """``{layer: {tensor: key}}`` for every layer holding quantized-weight tensors."""
    found: dict[str, dict[str, str]] = {}
    for key in keys:
        base, _, last = key.rpartition(".")
        if base and last in _TENSORS:
            found.setdefault(base, {})[last] = key
    return {k: v for k, v in found.items() if {"weight_packed", "weight_scale", "scale_packed"} & set(v)}


class NotTwoFour(ValueError):
    """A quantized layer whose integers break 2:4 (collected, then reported together)."""


def unpack_int32(packed: torch.Tensor, bits: int, count: int, key: str) -> torch.Tensor:
    """pack-quantized words ``int32 [rows, ceil(count*bits/32)]`` -> signed ``int16 [rows, count]``."""
    words = -(-count * bits // 32)
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] != words:
        raise ValueError(
            f"{key}: expected int32 [rows, {words}] holding {count} {bits}-bit values per row, got {packed.dtype} {tuple(packed.shape)}"
        )
    return (unpack_words(packed, bits)[:, :count] - (1 << (bits - 1))).to(torch.int16)


def dense_integers(s: Scheme, parts: dict, tensors: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(q int16 [out, K], zeros int16 [out, groups], scales [out, groups], group_size)`` of a
    pack-quantized layer, as compressed-tensors stores them (zeros signed, 0 when symmetric)."""
    shape = tensors.pop(parts["weight_shape"])
    if shape.is_floating_point() or shape.numel() != 2 or min(shape.flatten().tolist()) < 1:
        raise ValueError(f"{parts['weight_shape']}: expected 2 positive integers [out, in], got {shape.tolist()}")
    out, k = shape.flatten().tolist()
    if k % 4:
        raise ValueError(f"{parts['weight_shape']}: in_features {k} is not divisible by 4 (2:4)")
    qi = unpack_int32(tensors.pop(parts["weight_packed"]), s.bits, k, parts["weight_packed"])
    if qi.shape[0] != out:
        raise ValueError(f"{parts['weight_packed']}: expected {out} rows (weight_shape), got {qi.shape[0]}")
    groups = 1 if s.strategy != "group" or k <= s.group_size else k // s.group_size
    if s.strategy == "group" and k > s.group_size and k % s.group_size:
        raise ValueError(f"in_features {k} is not divisible by group_size {s.group_size}")
    scales = _check_groups(tensors.pop(parts["weight_scale"]), out, groups, s, parts["weight_scale"])
    if not scales.is_floating_point():
        raise ValueError(f"{parts['weight_scale']}: expected a floating tensor, got {scales.dtype}")
    zeros = torch.zeros(out, groups, dtype=torch.int16)
    if "weight_zero_point" in parts:
        zeros = _zero_points(tensors.pop(parts["weight_zero_point"]), out, groups, s, parts["weight_zero_point"])
        if s.symmetric and zeros.any():
            raise ValueError(f"{parts['weight_zero_point']}: non-zero zero points in a symmetric scheme")
    elif not s.symmetric:
        raise ValueError(f"tensor 'weight_zero_point' missing (asymmetric scheme {s.group!r})")
    group_size = 0 if groups == 1 else k // groups
    if "weight_g_idx" in parts:
        _check_column_order(tensors.pop(parts["weight_g_idx"]), k, group_size or k, parts["weight_g_idx"])
    return qi, zeros, scales, group_size


def _check_groups(t: torch.Tensor, out: int, groups: int, s: Scheme, key: str) -> torch.Tensor:
    """A scale or zero-point tensor, checked to be ``[out, groups]``."""
    if tuple(t.shape) != (out, groups):
        raise ValueError(
            f"{key}: expected shape {(out, groups)} (rows, groups) for strategy {s.strategy!r}, got {tuple(t.shape)}"
        )
    return t.contiguous()


def _zero_points(t: torch.Tensor, out: int, groups: int, s: Scheme, key: str) -> torch.Tensor:
    if t.dtype == torch.int32:
        words = -(-out * s.bits // 32)
        if tuple(t.shape) != (words, groups):
            raise ValueError(f"{key}: expected packed int32 shape {(words, groups)}, got {tuple(t.shape)}")
        return unpack_int32(t.t().contiguous(), s.bits, out, key).t().contiguous()
    lo, hi = -(1 << (s.bits - 1)), (1 << (s.bits - 1)) - 1
    if t.is_floating_point() or t.dtype == torch.bool or ((t < lo) | (t > hi)).any():
        raise ValueError(f"{key}: expected {s.bits}-bit integer zero points in {lo}..{hi}, got {t.dtype}")
    return _check_groups(t, out, groups, s, key).to(torch.int16)


def _check_column_order(g_idx: torch.Tensor, k: int, group_size: int, key: str) -> None:
    if g_idx.is_floating_point() or tuple(g_idx.shape) != (k,):
        raise ValueError(
            f"{key}: expected integer group indices of shape ({k},), got {g_idx.dtype} {tuple(g_idx.shape)}"
        )
    if (g_idx == -1).any():  # compressed-tensors' mark for "not set": column order
        return
    want = torch.arange(k) // group_size
    bad = (g_idx.long() != want).nonzero()
    if bad.numel():
        j = int(bad[0])
        raise ValueError(
            f"{key}: activation-order group indices put column {j} in group {int(g_idx[j])}; sparsekern keeps "
            f"groups of consecutive columns (group {int(want[j])}), so this layer cannot be converted exactly"
        )


def dense_to_nm(
    qi: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int, s: Scheme
) -> NMSparseWeight:
    """Integers ``q [out, K]`` whose zero point marks a pruned weight -> 2:4 quantized weight
    (zeros kept as stored for an asymmetric scheme, None for a symmetric one).

    ``NotTwoFour`` when a group of 4 holds more than 2 integers off the zero point.
    """
    out, k = qi.shape
    diff = qi - zeros.repeat_interleave(k // zeros.shape[1], dim=1)
    count = (diff != 0).view(out, k // 4, 4).sum(-1)
    bad = (count > 2).nonzero()
    if bad.numel():
        r, g = (int(v) for v in bad[0])
        raise NotTwoFour(
            f"row {r}, group {g} (columns {4 * g}..{4 * g + 3}) holds {int(count[r, g])} non-zero weights; "
            f"{bad.shape[0]} group(s) break 2:4"
        )
    # |q - zp| < 2**bits: exact in fp16, and from_dense keeps the non-zeros (zeros fill the rest).
    meta = NMSparseWeight.from_dense(diff.half(), 2, 4).meta
    kept = qi.gather(1, column_indices(meta, 2, 4, k // 2))
    if s.bits == 4:  # ours are unsigned nibbles: q + 8, zero point + 8 (8 when symmetric)
        values, zeros = q.pack_int4(kept + q.INT4_ZERO), zeros + q.INT4_ZERO
    else:
        values = kept.to(torch.int8).contiguous()
    zeros = None if s.symmetric else zeros.to(torch.int8).contiguous()
    return NMSparseWeight(values, meta, 2, 4, (out, k), scales, zeros, group_size).validate()


def quantized_layers(config: dict, file: str, tensors: dict, origin: dict, modules: dict) -> dict:
    """``{layer: (NMSparseWeight, bias, file)}`` for every quantized layer; consumed tensors are
    popped from ``tensors``. The first inconsistency raises ``ValueError``; layers that break 2:4
    are all named in one."""
    schemes, ignore = read_config(config, file)
    out, not_24 = {}, []
    for layer, parts in sorted(find_layers(tensors).items()):
        where = origin[next(iter(parts.values()))]
        module = modules.get(layer)
        if module is None:
            raise ValueError(f"{where}: layer {layer!r} is not a module of the model")
        s = scheme_for(layer, module, schemes, ignore)
        if s is None:
            raise ValueError(
                f"{where}: layer {layer!r} holds quantized tensors but no {file} config_groups entry targets it "
                "(or it is in ignore)"
            )
        try:
            missing = [t for t in _REQUIRED[s.format] if t not in parts]
            if missing:
                raise ValueError(f"tensors {missing} missing for format {s.format!r} (config group {s.group!r})")
            if s.format == "marlin-24":
                packed, scales, meta = (tensors.pop(parts[t]) for t in ("weight_packed", "scale_packed", "meta"))
                w = marlin24_to_nm(packed, scales, meta, s.bits, s.group_size, layer)
            else:
                w = dense_to_nm(*dense_integers(s, parts, tensors), s)
        except NotTwoFour as exc:
            not_24.append((where, f"{layer!r} ({exc})"))
            continue
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: layer {layer!r}: {exc}") from None
        out[layer] = (w, tensors.pop(f"{layer}.bias", None), where)
    if not_24:
        listed = "; ".join(text for _, text in not_24[:8]) + (" ..." if len(not_24) > 8 else "")
        raise ValueError(
            f"{not_24[0][0]}: {len(not_24)} quantized layer(s) are not 2:4 sparse, and sparsekern holds no dense "
            f"quantized layer: {listed}"
        )
    return out
