"""The lean decode step in one C++ call: ``torch.ops.sparsekern._lean_step_cpu`` (csrc/cpu/lean_step.cpp).

:class:`NativeStep` packs what :class:`~sparsekern.lean.decoder.LeanDecoder` holds (norm weights,
the fused q/k/v and gate/up linears, o, down, rope tables, the static K/V caches) into the op's
flat lists once; a call then runs every block in C++ and only the LM head in Python.

The C++ step runs each sparse linear with the CPU kernel, so it stands in for the Python step
only where the layer's own plan would pick that kernel too: :meth:`NativeStep.why_not` asks every
``SparseLinear``'s plan which backend it runs for the decode row bucket (once per batch bucket
and dispatch state) and says why not otherwise. Dense ``nn.Linear`` layers run ``at::linear`` in
both steps. Anything else (layers that did not stack, another activation than SiLU, mixed dtypes,
a model off the CPU, an extension built without the op) keeps the Python step, with the reason.

NOTE: SmolLM2-135M shapes, 2:4 bf16, the Python step spends ~90 us per block in ~14 Python-level
torch calls; one C++ call makes those dispatcher calls without Python in between.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern import _extension, dispatch
from sparsekern.nn.linear import SparseLinear

OP = "sparsekern::_lean_step_cpu"
_DENSE, _NM, _BSR = 0, 1, 2


def unavailable() -> str | None:
    """Why the C++ step cannot run at all here (None: it can)."""
    if not _extension.HAS_C_EXT:
        return f"compiled extension not loaded ({_extension.LOAD_ERROR})"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU"):
        return "the compiled extension predates _lean_step_cpu; rebuild it"
    return None


def pack_linear(mod: nn.Module, dtype: torch.dtype) -> tuple[list, list[int]] | str:
    """``(5 tensors, 5 ints)`` describing ``mod`` to the op (see csrc/cpu/lean_step.cpp), or why not."""
    if type(mod) is nn.Linear:
        if mod.weight.dtype != dtype:
            return f"nn.Linear of dtype {mod.weight.dtype}, the model's hidden states are {dtype}"
        bias = None if mod.bias is None else mod.bias.detach()
        return [mod.weight.detach(), bias, None, None, None], [_DENSE, 0, 0, 0, 0]
    if type(mod) is not SparseLinear:
        return f"{type(mod).__name__} (layers that did not stack into one linear)"
    if mod.dtype != dtype:
        return f"SparseLinear of dtype {mod.dtype}, the model's hidden states are {dtype}"
    p, b = mod._parameters, mod._buffers

    def flat(t):
        return None if t is None else t.detach().contiguous()

    if mod.block is None:
        scales = p.get("scales")
        values = b["values"] if scales is not None else p["values"]
        zeros = b.get("zeros") if scales is not None else None
        tensors = [flat(values), flat(b["meta"]), flat(p.get("bias")), flat(scales), flat(zeros)]
        return tensors, [_NM, mod.n, mod.m, mod.group_size, mod.act_block]
    tensors = [flat(b["crow_indices"]), flat(b["col_indices"]), flat(p["blocks"]), flat(p.get("bias")), None]
    return tensors, [_BSR, 0, 0, 0, 0]


def _plan_backend(mod: SparseLinear, x: torch.Tensor) -> str | None:
    """The backend ``mod``'s plan runs for x's row bucket (its plan is made here if need be)."""
    mod(x)
    key = (dispatch.row_bucket(x.shape[0]), x.dtype, x.device, x.shape[-1])
    p = mod.__dict__["_plans"].by_key.get(key)
    return None if p is None else p.backend


class NativeStep:
    """``LeanDecoder.step`` as one C++ call; build it with :meth:`build` (None and a reason if
    the model does not qualify)."""

    def __init__(self, dec, weights: list, specs: list[int], sparse: list[tuple[str, SparseLinear, int]]) -> None:
        self.dec, self.weights, self.specs, self.sparse = dec, weights, specs, sparse
        self.norms = [t for blk in dec.blocks for t in (blk.ln1, blk.ln2)]
        self.eps = [e for blk in dec.blocks for e in (blk.eps1, blk.eps2)]
        self._checked: dict[tuple, str | None] = {}

    @classmethod
    def build(cls, dec) -> tuple[NativeStep | None, str | None]:
        why = unavailable()
        if why:
            return None, why
        dtype, device = dec.embed.dtype, dec.embed.device
        if device.type != "cpu":
            return None, f"model on {device} (the C++ step is a CPU kernel)"
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return None, f"dtype {dtype}"
        norms = [dec.norm] + [t for blk in dec.blocks for t in (blk.ln1, blk.ln2)]
        if any(t.dtype != dtype or t.device != device for t in norms):
            return None, f"RMSNorm weights not all of the hidden states' dtype {dtype}"
        weights, specs, sparse = [], [], []
        for i, blk in enumerate(dec.blocks):
            if blk.act is not F.silu:
                return None, f"model.layers.{i}: activation {type(blk.act).__name__}, not SiLU"
            widths = (dec.dim, blk.heads * dec.head_dim, dec.dim, blk.inter)
            for name, mod, k in zip(("qkv", "o", "gate_up", "down"), (blk.qkv, blk.o, blk.gate_up, blk.down), widths):
                packed = pack_linear(mod, dtype)
                if isinstance(packed, str):
                    return None, f"model.layers.{i}.{name}: {packed}"
                weights += packed[0]
                specs += packed[1]
                if type(mod) is SparseLinear:
                    sparse.append((f"model.layers.{i}.{name}", mod, k))
        return cls(dec, weights, specs, sparse), None

    def why_not(self, batch: int) -> str | None:
        """Why this step would not compute what the Python step does for ``batch`` rows: a sparse
        layer whose plan runs another backend than the CPU kernel (None: it would)."""
        key = (dispatch.row_bucket(batch), dispatch.state())
        if key not in self._checked:
            self._checked[key] = self._check(batch)
        return self._checked[key]

    def _check(self, batch: int) -> str | None:
        dtype, device = self.dec.embed.dtype, self.dec.embed.device
        with torch.inference_mode():
            for name, mod, k in self.sparse:
                backend = _plan_backend(mod, torch.zeros(batch, k, dtype=dtype, device=device))
                if backend != "cpu":
                    return f"{name}: its plan runs backend {backend!r} for {batch} rows, not the CPU kernel"
        return None

    def __call__(self, tokens: torch.Tensor, pos: int, kv: list) -> torch.Tensor:
        """Logits ``[B, vocab]``, as :meth:`LeanDecoder.step`."""
        dec = self.dec
        h = torch.ops.sparsekern._lean_step_cpu.default(
            tokens, pos, dec.embed, dec.cos, dec.sin, self.norms, self.eps, self.weights, self.specs,
            [k for k, _ in kv], [v for _, v in kv], dec.norm, dec.norm_eps, dec.scale,
        )  # fmt: skip
        return dec.lm_head(h)
