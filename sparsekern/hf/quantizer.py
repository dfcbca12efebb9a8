"""``quant_method: "sparsekern"`` for transformers: ``from_pretrained`` builds ``SparseLinear`` layers.

A folder written by :func:`sparsekern.save` from a ``PreTrainedModel`` carries in ``config.json``

    "quantization_config": {"quant_method": "sparsekern", "format_version": 1,
                            "layers": {"model.layers.0.mlp.up_proj": {"kind": "nm", "n": 2, "m": 4, ...}}}

(the same per-layer entries as ``sparsekern.json``). While the model is still on the meta
device, :class:`SparsekernHfQuantizer` swaps each listed ``nn.Linear`` for a ``SparseLinear``
whose compressed tensors have the shapes the checkpoint holds (a BSR layer's block count is read
from the safetensors header), so transformers' own loader fills them and no dense weight of a
pruned layer is ever built. Every tensor of a swapped layer is checked against the headers
before loading (a missing or misshapen tensor would otherwise be left uninitialised), and the
sparse indices are validated after loading: a refused checkpoint is a ``ValueError`` naming
the file.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from sparsekern import checkpoint_moe as experts_ckpt
from sparsekern.checkpoint import FORMAT_VERSION, check_config, check_safetensors, layer_tensors, use_decode_paths
from sparsekern.formats.bsr import BlockSparseWeight, check_group_size
from sparsekern.formats.nm import NMSparseWeight, meta_words
from sparsekern.formats.quant import groups_of
from sparsekern.hf import METHOD
from sparsekern.nn import quant_linear as quant_head
from sparsekern.nn.linear import SparseLinear, is_conv1d, linear_features
from sparsekern.nn.moe import SparseExperts
from sparsekern.nn.quant_linear import QuantLinear
from sparsekern.prune.patterns import parse_pattern

_ST_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class SparsekernConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a sparsekern folder: per pruned layer, its pattern and shape."""

    def __init__(self, layers: dict | None = None, format_version: int = FORMAT_VERSION, **kwargs) -> None:
        self.quant_method = METHOD
        self.format_version = format_version
        self.layers = {} if layers is None else layers
        # Unknown keys are kept (a newer writer's extras survive a load/save round trip).
        for key, value in kwargs.items():
            if key != "quant_method":
                setattr(self, key, value)


class SparsekernHfQuantizer(HfQuantizer):
    """Swaps the listed ``nn.Linear`` modules for ``SparseLinear`` before transformers loads weights."""

    requires_calibration = True  # only pre-pruned folders: pruning is `sparsekern prune`'s job

    def _process_model_before_weight_loading(self, model, dtype=None, checkpoint_files=None, **kwargs):
        files = [f for f in checkpoint_files or () if f.endswith(".safetensors")]
        if not files:
            raise ValueError(f"quantization_config: quant_method {METHOD!r} needs .safetensors weights, got {files}")
        where = os.path.join(os.path.dirname(files[0]), "config.json")
        if self.quantization_config.format_version != FORMAT_VERSION:
            raise ValueError(
                f"{where}: quantization_config.format_version: expected {FORMAT_VERSION}, "
                f"got {self.quantization_config.format_version!r}"
            )
        layers, _ = check_config({"layers": self.quantization_config.layers}, f"{where}: quantization_config")
        # The dtype the rest of the model is built in (from_pretrained's dtype, resolved; the
        # base class does not pass it on): the sparse layers must match it, or x and the weight differ.
        dtype = dtype or getattr(model.config, "dtype", None)
        headers = {}
        for file in files:  # a truncated or garbled file is refused here, before any tensor is read
            for key, entry in check_safetensors(file).items():
                if key != "__metadata__":
                    headers[key] = (entry, file)
        modules = dict(model.named_modules())
        prefix = f"{model.base_model_prefix}."
        for name, info in layers.items():
            target = _module_name(name, modules, prefix)
            if target is None:
                raise ValueError(
                    f"{where}: quantization_config.layers[{name!r}]: no such module in {type(model).__name__}"
                )
            if info.get("class") == experts_ckpt.CLASS:
                layer = _empty_experts(name, info, modules[target], headers, dtype, where)
            elif info.get("class") == quant_head.CLASS:
                layer = _empty_quant_head(name, info, modules[target], headers, dtype, where)
            else:
                layer = _empty_layer(name, info, modules[target], headers, dtype, where)
            parent, _, child = target.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        self._where = where
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # The loader copies bytes; whether the indices make sense is checked once, here.
        compressed = False
        for name, mod in model.named_modules():
            compressed |= isinstance(mod, SparseLinear | QuantLinear | SparseExperts)
            if isinstance(mod, SparseLinear):
                _validate(mod.sparse_weight, f"{self._where}: layer {name!r}")
            elif isinstance(mod, QuantLinear):
                try:
                    quant_head.check_parts(mod.values, mod.scales.detach(), mod.act_block)
                except ValueError as exc:
                    raise ValueError(f"{self._where}: layer {name!r}: {exc}") from None
            elif isinstance(mod, SparseExperts):
                try:
                    experts_ckpt.validate(mod.weights("up"), mod.weights("down"))
                except ValueError as exc:
                    raise ValueError(f"{self._where}: layer {name!r}: {exc}") from None
        if compressed:  # the dense LM head's decode rows on the GEMV, decode attention: as sparsify left it
            use_decode_paths(model)
        return model

    def is_serializable(self) -> bool:
        # save_pretrained would write the state dict as is; sparsekern.save is the writer that
        # also records the layer entries, so refuse rather than write a folder that cannot load.
        return False

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def _validate(w: NMSparseWeight | BlockSparseWeight, where: str) -> None:
    # NMSparseWeight.validate unpacks its indices in row chunks itself (uint8, 64K indices at a time), so
    # a whole layer adds no int64 temporaries to the loading peak.
    try:
        w.validate()
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _module_name(name: str, modules: dict, prefix: str) -> str | None:
    """``name`` as saved, or with the base-model prefix removed/added (a CausalLM folder loaded
    by ``AutoModel`` and the other way round)."""
    for candidate in (name, name.removeprefix(prefix), prefix + name):
        if candidate in modules:
            return candidate
    return None


def _empty_layer(name: str, info: dict, module: nn.Module, headers: dict, dtype, where: str) -> SparseLinear:
    """A ``SparseLinear`` on the meta device shaped like the checkpoint's tensors for ``name``."""
    here = f"{where}: quantization_config.layers[{name!r}]"
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise ValueError(f"{here}: expected an nn.Linear in the model, got {type(module).__name__}")
    k, out = linear_features(module)
    if (info["out_features"], info["in_features"]) != (out, k):
        raise ValueError(
            f"{here}: shape {(info['out_features'], info['in_features'])}, the model's layer is {(out, k)}"
        )
    if info["bias"] != (getattr(module, "bias", None) is not None):
        raise ValueError(
            f"{here}: bias {info['bias']}, the model's layer {'has' if module.bias is not None else 'has no'} bias"
        )
    _check_pattern(info, here)
    names = layer_tensors(info)
    found = {}
    for t in names + (("bias",) if info["bias"] else ()):
        key = f"{name}.{t}"
        if key not in headers:
            raise ValueError(f"{here}: tensor {key!r} is not in the checkpoint")
        found[t] = headers[key]
    float_name = "scales" if info.get("quant") is not None else "blocks" if info["kind"] != "nm" else "values"
    entry, file = found[float_name]
    if dtype is None:
        dtype = _ST_TORCH.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{file}: tensor {name}.{float_name}: dtype {entry['dtype']}, expected F32, F16 or BF16")
    meta = dict(device="meta")
    if info["kind"] == "nm":
        n, m = info["n"], info["m"]
        if k % m:
            raise ValueError(f"{here}: in_features {k} is not divisible by m={m}")
        kept = k // m * n
        want = {"values": [out, kept], "meta": [out, meta_words(kept, m)]}
        quant = info.get("quant")
        if quant is None:
            weight_of = lambda: NMSparseWeight(  # noqa: E731
                torch.empty(out, kept, dtype=dtype, **meta),
                torch.empty(*want["meta"], dtype=torch.int32, **meta),
                n,
                m,
                (out, k),
            )
        else:
            groups = groups_of(info["group_size"], k, m)
            width, qdtype = (kept // 2, torch.uint8) if quant == "int4" else (kept, torch.int8)
            want.update(values=[out, width], scales=[out, groups], zeros=[out, groups])
            weight_of = lambda: NMSparseWeight(  # noqa: E731
                torch.empty(out, width, dtype=qdtype, **meta),
                torch.empty(*want["meta"], dtype=torch.int32, **meta),
                n,
                m,
                (out, k),
                torch.empty(out, groups, dtype=dtype, **meta),
                torch.empty(out, groups, dtype=torch.int8, **meta) if info["zeros"] else None,
                info["group_size"],
                info.get("act_block", 0),
            )
    else:
        bm, bk = info["block"]
        if out % bm or k % bk:
            raise ValueError(f"{here}: block {(bm, bk)} does not divide the layer's shape {(out, k)}")
        nnz = found["blocks"][0]["shape"][0] if found["blocks"][0]["shape"] else -1
        want = {"crow_indices": [out // bm + 1], "col_indices": [nnz], "blocks": [nnz, bm, bk]}
        quant, parts = info.get("quant"), ()
        if quant is not None:
            try:
                groups = check_group_size(info["group_size"], bk)
            except ValueError as exc:
                raise ValueError(f"{here}: {exc}") from None
            width, qdtype = (bk // 2, torch.uint8) if quant == "int4" else (bk, torch.int8)
            want.update(blocks=[nnz, bm, width], scales=[nnz, bm, groups], zeros=[nnz, bm, groups])
            parts = (
                torch.empty(nnz, bm, groups, dtype=dtype, **meta),
                torch.empty(nnz, bm, groups, dtype=torch.int8, **meta) if info["zeros"] else None,
            )
        weight_of = lambda: BlockSparseWeight(  # noqa: E731
            torch.empty(out // bm + 1, dtype=torch.int32, **meta),
            torch.empty(nnz, dtype=torch.int32, **meta),
            torch.empty(*want["blocks"], dtype=dtype if quant is None else qdtype, **meta),
            (out, k),
            *parts,
        )
    want["bias"] = [out]
    for t, (entry, file) in found.items():
        if entry["shape"] != want[t]:
            raise ValueError(f"{file}: tensor {name}.{t}: shape {entry['shape']}, {here} needs {want[t]}")
        is_index = t in ("meta", "crow_indices", "col_indices")
        if is_index and entry["dtype"] != "I32":
            raise ValueError(f"{file}: tensor {name}.{t}: dtype {entry['dtype']}, expected I32")
        integer = (
            {"int8": "I8", "int4": "U8"}.get(info.get("quant"))
            if t in ("values", "blocks")
            else "I8"
            if t == "zeros"
            else None
        )
        if integer is not None and entry["dtype"] != integer:
            raise ValueError(f"{file}: tensor {name}.{t}: dtype {entry['dtype']}, expected {integer}")
    try:
        weight = weight_of()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{here}: {exc}") from None
    bias = torch.empty(out, dtype=dtype, **meta) if info["bias"] else None
    return SparseLinear(weight, bias)


def _empty_experts(name: str, info: dict, module: nn.Module, headers: dict, dtype, where: str) -> SparseExperts:
    """A ``SparseExperts`` on the meta device shaped like the checkpoint's tensors for ``name``."""
    here = f"{where}: quantization_config.layers[{name!r}]"
    experts_ckpt.check_module(module, info, here)
    _check_pattern(info, here)
    names = experts_ckpt.tensors_of(info)
    for t in names:
        if f"{name}.{t}" not in headers:
            raise ValueError(f"{here}: tensor {name + '.' + t!r} is not in the checkpoint")
    nnz = None
    if info["kind"] == "block":  # the block counts are whatever the file holds
        nnz = {w: (headers[f"{name}.{w}_blocks"][0]["shape"] or [-1])[0] for w in ("up", "down")}
    want = experts_ckpt.shapes(info, nnz)
    floating = experts_ckpt.FLOAT_TENSOR[info["kind"]]
    for t in names:
        entry, file = headers[f"{name}.{t}"]
        if tuple(entry["shape"]) != want[t]:
            raise ValueError(f"{file}: tensor {name}.{t}: shape {entry['shape']}, {here} needs {list(want[t])}")
        expect = None if t.endswith(floating) else "I32"
        if expect and entry["dtype"] != expect or not expect and entry["dtype"] not in _ST_TORCH:
            raise ValueError(
                f"{file}: tensor {name}.{t}: dtype {entry['dtype']}, expected {expect or 'F32, F16 or BF16'}"
            )
    dtype = dtype or _ST_TORCH[headers[f"{name}.up_{floating}"][0]["dtype"]]
    parts = {t: torch.empty(want[t], dtype=dtype if t.endswith(floating) else torch.int32, device="meta") for t in want}
    return experts_ckpt.build(module, info, parts, dtype=dtype, device="meta")


def _empty_quant_head(name: str, info: dict, module: nn.Module, headers: dict, dtype, where: str) -> QuantLinear:
    """A ``QuantLinear`` (the int8 LM head) on the meta device, checked against the file's headers."""
    here = f"{where}: quantization_config.layers[{name!r}]"
    out, k = info["out_features"], info["in_features"]
    if not isinstance(module, nn.Linear) or (module.out_features, module.in_features) != (out, k):
        got = type(module).__name__ + (
            f" {module.out_features}x{module.in_features}" if isinstance(module, nn.Linear) else ""
        )
        raise ValueError(f"{here}: expected an nn.Linear {out}x{k} in the model, got {got}")
    if info["bias"] != (module.bias is not None):
        raise ValueError(
            f"{here}: bias {info['bias']}, the model's layer {'has' if module.bias is not None else 'has no'} bias"
        )
    want = {"values": ([out, k], ("I8",)), "scales": ([out], tuple(_ST_TORCH)), "bias": ([out], tuple(_ST_TORCH))}
    for t in quant_head.TENSORS + (("bias",) if info["bias"] else ()):
        key = f"{name}.{t}"
        if key not in headers:
            raise ValueError(f"{here}: tensor {key!r} is not in the checkpoint")
        (entry, file), (shape, dtypes) = headers[key], want[t]
        if entry["shape"] != shape or entry["dtype"] not in dtypes:
            raise ValueError(
                f"{file}: tensor {key}: {entry['dtype']} {entry['shape']}, {here} needs {'/'.join(dtypes)} {shape}"
            )
    dtype = dtype or _ST_TORCH[headers[f"{name}.scales"][0]["dtype"]]
    empty = functools.partial(torch.empty, device="meta")
    bias = empty(out, dtype=dtype) if info["bias"] else None
    return QuantLinear(empty(out, k, dtype=torch.int8), empty(out, dtype=dtype), bias, info["act_block"])


def _check_pattern(info: dict, here: str) -> None:
    """``pattern`` must parse and agree with ``kind``/``n``/``m``/``block`` (a hand-edited config
    naming a pattern that has no kernel is refused at start-up, not at the first call)."""
    try:
        pat = parse_pattern(info.get("pattern"))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{here}.pattern: {exc}") from None
    agrees = (
        (pat.kind == "nm" and (pat.n, pat.m) == (info.get("n"), info.get("m")))
        if info["kind"] == "nm"
        else (pat.kind == "block" and list(pat.block) == list(info["block"]))
    )
    if not agrees:
        fields = {k: info.get(k) for k in ("kind", "n", "m", "block") if k in info}
        raise ValueError(f"{here}.pattern: {info['pattern']!r} disagrees with {fields}")


def register() -> None:
    """Make ``quant_method: "sparsekern"`` known to transformers (idempotent)."""
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(SparsekernConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(SparsekernHfQuantizer)
