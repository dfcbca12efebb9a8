"""The ``sparsekern`` quantization config for vLLM: which layers are sparse, and with what pattern.

It reads the per-layer entries :func:`sparsekern.save` records, either from ``config.json``'s
``quantization_config`` (``{"quant_method": "sparsekern", "format_version": 1, "layers": ...}``)
or, for ``--quantization sparsekern`` on a folder without one, from ``sparsekern.json``. Layer
names are the checkpoint's (Hugging Face) names; vLLM fuses some layers (``qkv_proj`` from
``q_proj``/``k_proj``/``v_proj``, ``gate_up_proj``), so a fused layer is sparse when all of its
parts are, with one pattern. Anything else is refused when the model is built, naming the parts.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from sparsekern.checkpoint import CONFIG, FORMAT_VERSION, check_config
from sparsekern.nn import quant_linear as quant_head
from sparsekern.vllm import METHOD


class SparsekernConfig(QuantizationConfig):
    """Per pruned layer (checkpoint name): kind, pattern (n, m or block), shape and bias flag, and
    for quantized N:M values the quantization (int8 / int4, scale group, zero points, int8
    activations); the int8 LM head of ``sparsify(head="int8")`` (a ``QuantLinear`` entry) runs
    :class:`~sparsekern.vllm.head.SparsekernInt8HeadMethod`."""

    def __init__(self, layers: dict[str, dict]) -> None:
        super().__init__()
        self.layers = layers

    def __repr__(self) -> str:
        return f"SparsekernConfig({len(self.layers)} sparse layers)"

    def get_name(self) -> str:
        return METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # the Triton kernels' floor; sm_80+ adds the 2:4 tensor-core path

    @staticmethod
    def get_config_filenames() -> list[str]:
        return [CONFIG]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SparsekernConfig:
        """From ``quantization_config`` (``quant_method`` set) or ``sparsekern.json`` (``format`` set)."""
        where = "sparsekern.json" if config.get("format") == "sparsekern" else "config.json: quantization_config"
        if where == "config.json: quantization_config" and config.get("quant_method") != METHOD:
            raise ValueError(f"{where}.quant_method: expected {METHOD!r}, got {config.get('quant_method')!r}")
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{where}.format_version: expected {FORMAT_VERSION}, got {config.get('format_version')!r}")
        layers, _ = check_config({"layers": config.get("layers")}, where)
        experts = sorted(name for name, info in layers.items() if info.get("class") == "SparseExperts")
        if experts:
            raise ValueError(
                f"{where}.layers[{experts[0]!r}].class: 'SparseExperts' (N:M MoE experts) are not served by the "
                f"vLLM plugin yet ({len(experts)} expert layers); serve this folder with `sparsekern serve`"
            )
        return cls(dict(layers))

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        # Models whose vLLM module tree differs from the HF one (a renamed prefix) rename the
        # entries; the mapper vLLM passes keeps q_proj/k_proj/v_proj as they are.
        self.layers = hf_to_vllm_mapper.apply_dict(self.layers)

    def parts(self, prefix: str) -> list[str]:
        """Checkpoint names of the layers vLLM fused into the one at ``prefix`` (itself if unfused)."""
        parent, _, last = prefix.rpartition(".")
        fused = self.packed_modules_mapping.get(last)
        if prefix in self.layers or not fused:
            return [prefix]
        return [f"{parent}.{p}" if parent else p for p in fused]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        entry = self.layers.get(prefix)
        if entry is not None and entry.get("class") == quant_head.CLASS:
            if not isinstance(layer, ParallelLMHead):
                raise ValueError(
                    f"quantization_config.layers[{prefix!r}]: an int8 LM head (QuantLinear) in the checkpoint, but "
                    f"vLLM builds it as {type(layer).__name__}; only vLLM's ParallelLMHead takes an int8 head"
                )
            from sparsekern.vllm.head import SparsekernInt8HeadMethod

            return SparsekernInt8HeadMethod(prefix, entry)
        names = self.parts(prefix)
        entries = [self.layers.get(n) for n in names]
        if not isinstance(layer, LinearBase):
            sparse = [n for n, e in zip(names, entries) if e is not None]
            if sparse:
                raise ValueError(
                    f"quantization_config.layers[{sparse[0]!r}]: sparse in the checkpoint, but vLLM builds it as "
                    f"{type(layer).__name__}; only linear layers (vLLM's LinearBase) run sparse"
                )
            return None
        if all(e is None for e in entries):
            return UnquantizedLinearMethod()
        patterns = {n: _pattern(e) for n, e in zip(names, entries)}
        if len(set(patterns.values())) > 1:
            raise ValueError(
                f"{prefix}: vLLM fuses {names} into one layer, so they need one sparse pattern; the checkpoint has "
                + ", ".join(f"{n}: {p}" for n, p in patterns.items())
            )
        from sparsekern.vllm.linear import SparsekernLinearMethod

        return SparsekernLinearMethod(prefix, names, entries)


def _pattern(entry: dict | None) -> str:
    if entry is None:
        return "dense"
    if entry["kind"] == "nm":
        quant = entry.get("quant")
        if quant is None:
            return f"{entry['n']}:{entry['m']}"
        zeros = "+zeros" if entry.get("zeros") else ""
        act = f"a{entry['act_block']}" if entry.get("act_block") else ""
        return f"{entry['n']}:{entry['m']}+{quant}g{entry.get('group_size', 0)}{act}{zeros}"
    return "block{}x{}".format(*entry["block"])
