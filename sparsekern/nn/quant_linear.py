"""``QuantLinear``: a dense linear with int8 weights and int8 activations (the quantized LM head).

``sparsify(model, ..., head="int8")`` (``sparsekern prune --head int8``) puts one in place of the LM
head, which stays dense when the rest is pruned: at TinyLlama-1.1B shapes the bf16 head is 131 MB
of the ~530 MB a token reads at 2:4 + int4, and llama.cpp's Q4_0 / Q8_0 files quantize their head
too (Q6_K / Q8_0). The weight is int8 with one scale per output row (symmetric, round to
nearest); x is rounded to int8 per block of ``act_block`` columns, so the CPU kernel runs integer
dot products (:mod:`sparsekern.ops_quant`). State: ``values`` (int8 buffer, untouched by
``Module.to(dtype)``), ``scales`` (a parameter that carries the layer's dtype), ``bias``.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.formats.quant import quantize
from sparsekern.nn.linear import dense_weight
from sparsekern.ops_quant import check_act_block, check_quant_linear

QUANT = "int8"


def check_parts(values, scales, act_block: int) -> None:
    """Shapes and dtypes (as the op), and every scale finite and > 0 (reads the scales)."""
    if not isinstance(values, torch.Tensor) or values.dtype != torch.int8 or values.dim() != 2:
        got = f"{values.dtype} {tuple(values.shape)}" if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"values: expected a 2-D int8 [out, in] tensor, got {got}")
    x = torch.empty((0, values.shape[1]), dtype=getattr(scales, "dtype", torch.float32), device="meta")
    check_quant_linear(x, values.to("meta"), scales.to("meta") if isinstance(scales, torch.Tensor) else scales, None,
                       act_block)  # fmt: skip
    if scales.device.type == "meta":  # an empty layer for a loader to fill: the data is checked then
        return
    bad = ~(torch.isfinite(scales.float()) & (scales.float() > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"scales: expected every scale finite and > 0, got {float(scales[i])} at row {i}")


class QuantLinear(nn.Module):
    """``y = x_q @ (values * scales[:, None]).T + bias`` with x rounded to int8 per ``act_block``."""

    quant = QUANT

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 act_block: int = 32) -> None:  # fmt: skip
        super().__init__()
        check_parts(values, scales, act_block)
        self.out_features, self.in_features = (int(s) for s in values.shape)
        self.act_block = act_block
        self.register_buffer("values", values.detach().contiguous())
        self.scales = nn.Parameter(scales.detach().to(values.device), requires_grad=False)
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,):
                got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"bias: expected a tensor of shape {(self.out_features,)}, got {got}")
            bias = nn.Parameter(bias.detach().to(device=values.device, dtype=scales.dtype), requires_grad=False)
        self.register_parameter("bias", bias)  # None too: forward reads _parameters["bias"]

    @classmethod
    def from_linear(cls, linear: nn.Module, act_block: int = 32) -> QuantLinear:
        """``linear`` (``nn.Linear`` or ``Conv1D``) with its weight rounded to int8 per output row."""
        w = dense_weight(linear).detach()
        check_act_block(act_block, w.shape[1])
        values, scales, _ = quantize(w, QUANT, 1)
        bias = getattr(linear, "bias", None)
        return cls(values, scales[:, 0], None if bias is None else bias.detach(), act_block)

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized ``[out, in]`` weight (a new tensor, in the layer's dtype)."""
        return (self.values.float() * self.scales.float()[:, None]).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.scales, self.bias) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self._parameters
        return torch.ops.sparsekern.quant_linear(x, self._buffers["values"], p["scales"], p["bias"], self.act_block)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant={QUANT}, act_block={self.act_block}"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # Checked whole before anything is copied (as SparseLinear): a bad scale is refused by name.
        values = state_dict.get(prefix + "values", self.values)
        scales = state_dict.get(prefix + "scales", self.scales)
        if isinstance(values, torch.Tensor) and isinstance(scales, torch.Tensor):
            try:
                if tuple(values.shape) != (self.out_features, self.in_features):
                    raise ValueError(
                        f"values: expected shape {(self.out_features, self.in_features)}, got {tuple(values.shape)}"
                    )
                check_parts(values, scales.detach(), self.act_block)
            except (TypeError, ValueError) as exc:
                errors.append(f"{prefix}{exc}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)


# -- checkpoint entries (sparsekern.json "layers", HF quantization_config) -------------------------

CLASS = "QuantLinear"
TENSORS = ("values", "scales")


def entry(mod: QuantLinear) -> dict:
    """The ``sparsekern.json`` layer entry of ``mod``."""
    return {
        "class": CLASS,
        "in_features": mod.in_features,
        "out_features": mod.out_features,
        "bias": mod.bias is not None,
        "dtype": str(mod.dtype).removeprefix("torch."),
        "quant": QUANT,
        "act_block": mod.act_block,
    }


def check_entry(info: dict, where: str) -> None:
    """Every field of a ``QuantLinear`` entry (a ValueError names the key)."""
    for key in ("in_features", "out_features", "act_block"):
        value = info.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{where}.{key}: expected a positive int, got {value!r}")
    if not isinstance(info.get("bias"), bool):
        raise ValueError(f"{where}.bias: expected true or false, got {info.get('bias')!r}")
    if info.get("quant") != QUANT:
        raise ValueError(f"{where}.quant: expected {QUANT!r}, got {info.get('quant')!r}")
    if info["in_features"] % info["act_block"]:
        raise ValueError(f"{where}.act_block: {info['act_block']} does not divide in_features {info['in_features']}")


def from_parts(info: dict, values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> QuantLinear:
    """The layer an entry and its tensors describe (shapes checked against the entry)."""
    shape = (info["out_features"], info["in_features"])
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != shape:
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"values: expected shape {shape}, got {got}")
    if info["bias"] != (bias is not None):
        raise ValueError(f"bias: {'missing' if info['bias'] else 'unexpected'}")
    return QuantLinear(values, scales, bias, info["act_block"])
