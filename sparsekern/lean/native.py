"""The lean decode step in one C++ call: ``torch.ops.sparsekern._lean_step_cpu`` (csrc/cpu/lean_step_op.cpp).

:class:`Native` packs what :class:`~sparsekern.lean.decoder.LeanDecoder` holds (norm weights, the
fused q/k/v and gate/up linears, o, down) into the op's flat lists once; a :class:`NativeStep`
call then runs every block in C++ (rope tables and the static K/V caches passed along), and the
LM head as :func:`head_fn` says (``_lean_head_cpu``, the int8 head's kernel, or the head module).

The C++ step must compute what the Python step computes, and the Python step runs each
``SparseLinear`` through its plan. So :meth:`Native.step_for` asks every sparse layer's plan which
backend it runs for the decode row bucket (once per bucket and dispatch state): ``"cpu"``: the C++
step calls the same kernel (nm_linear_run / bsr_linear_run); ``"dense"`` (measured dispatch may
pick it for small layers): the plan's dense copy goes to ``at::linear``, as ``F.linear`` in the
plan; anything else keeps the Python step, with the reason. Dense ``nn.Linear`` layers run
``at::linear`` in both steps. Layers that did not stack, another activation than SiLU, mixed
dtypes, a model off the CPU, an extension built without the op: the Python step, with the reason.

NOTE: the Python step spends ~90 us per block in ~14 Python-level torch calls (module docstring of
decoder.py); the C++ step runs the linears' kernels directly and the small ops as its own loops
(csrc/cpu/lean_kernels.cpp), equal to the Python step within a few ulps. SmolLM2's 30 blocks and
heads at 8 dims per head (weights ~0), quiet 2-core Zen 4, bench_lean_decode.py: 2:4 fp32 0.8
ms/token against 4.4 (Python step), bf16 1.0 against 8.9.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern import _extension, dispatch
from sparsekern.nn.dense_head import DenseHead, gemv_isa
from sparsekern.nn.linear import SparseLinear
from sparsekern.nn.quant_linear import QuantLinear
from sparsekern.ops_quant import _has_cpu_kernel as _quant_cpu_kernel

OP = "sparsekern::_lean_step_cpu"
_DENSE, _NM, _BSR = 0, 1, 2
_SLOTS, _SPEC = 6, 5  # tensors and ints per linear in the op's weights / specs


def unavailable() -> str | None:
    """Why the C++ step cannot run at all here (None: it can)."""
    if not _extension.HAS_C_EXT:
        return f"compiled extension not loaded ({_extension.LOAD_ERROR})"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU"):
        return "the compiled extension predates _lean_step_cpu; rebuild it"
    return None


def pack_linear(mod: nn.Module, dtype: torch.dtype) -> tuple[list, list[int]] | str:
    """``(6 tensors, 5 ints)`` describing ``mod`` to the op (see csrc/cpu/lean_step_op.cpp), or why not."""
    if type(mod) is nn.Linear:
        if mod.weight.dtype != dtype:
            return f"nn.Linear of dtype {mod.weight.dtype}, the model's hidden states are {dtype}"
        bias = None if mod.bias is None else mod.bias.detach()
        return [mod.weight.detach(), bias, None, None, None, None], [_DENSE, 0, 0, 0, 0]
    if type(mod) is not SparseLinear:
        return f"{type(mod).__name__} (layers that did not stack into one linear)"
    if mod.dtype != dtype:
        return f"SparseLinear of dtype {mod.dtype}, the model's hidden states are {dtype}"
    p, b = mod._parameters, mod._buffers

    def flat(t):
        return None if t is None else t.detach().contiguous()

    # Quantized: the integers are a buffer, the scales a parameter, zeros a buffer if any.
    scales, zeros, bias = flat(p.get("scales")), flat(b.get("zeros")), flat(p.get("bias"))
    name = "values" if mod.block is None else "blocks"
    weight = flat(b[name] if scales is not None else p[name])
    if mod.block is None:
        return [weight, flat(b["meta"]), bias, scales, zeros, None], [_NM, mod.n, mod.m, mod.group_size, mod.act_block]
    return [flat(b["crow_indices"]), flat(b["col_indices"]), weight, bias, scales, zeros], [_BSR, 0, 0, 0, 0]


def head_weight(lm_head: nn.Module) -> torch.Tensor | None:
    """The LM head's weight where ``_lean_head_cpu`` runs it (a bias-free ``nn.Linear``, bf16 or fp32
    on a CPU with AVX2 at least), else None (the head module runs).

    NOTE: SmolLM2's tied head, 49152 x 576, 1 row, 2 threads, Zen 4: bf16 2.2 ms against 3.3 for
    F.linear (26 against 17 GB/s), 3 rows 2.8 against 4.8; fp32 3.9 against 9.7 (29 against 12)."""
    if type(lm_head) not in (nn.Linear, DenseHead) or lm_head.bias is not None:
        return None
    w = lm_head.weight
    if w.device.type != "cpu" or not w.is_contiguous() or not gemv_isa(w.dtype):
        return None
    return w.detach()


def head_fn(lm_head: nn.Module):
    """What the C++ step's caller runs for the LM head: ``_lean_head_cpu`` on the weight where
    :func:`head_weight` allows, ``_quant_linear_cpu`` for an int8 head (sparsify's ``head="int8"``:
    the op's own checks passed when the layer was built), else the head module."""
    w = head_weight(lm_head)
    if w is not None:
        return functools.partial(torch.ops.sparsekern._lean_head_cpu.default, weight=w)
    if type(lm_head) is QuantLinear and lm_head.device.type == "cpu" and _quant_cpu_kernel():
        p = lm_head._parameters
        return functools.partial(
            torch.ops.sparsekern._quant_linear_cpu.default, values=lm_head.values, scales=p["scales"],
            bias=p["bias"], act_block=lm_head.act_block,
        )  # fmt: skip
    return lm_head


def _decode_plan(mod: SparseLinear, x: torch.Tensor):
    """The plan ``mod`` runs for x's row bucket (made here if need be), or None."""
    mod(x)
    key = (dispatch.row_bucket(x.shape[0]), x.dtype, x.device, x.shape[-1])
    return mod.__dict__["_plans"].by_key.get(key)


class NativeStep:
    """``LeanDecoder.step`` as one C++ call, for one packing of the linears (see :class:`Native`)."""

    def __init__(self, dec, weights: list, specs: list[int]) -> None:
        self.dec, self.weights, self.specs = dec, weights, specs
        self.norms = [t for blk in dec.blocks for t in (blk.ln1, blk.ln2)]
        self.eps = [e for blk in dec.blocks for e in (blk.eps1, blk.eps2)]
        self.head = head_fn(dec.lm_head)

    def __call__(self, tokens: torch.Tensor, pos: int, kv: list) -> torch.Tensor:
        """Logits ``[B, vocab]``, as :meth:`LeanDecoder.step`."""
        dec = self.dec
        h = torch.ops.sparsekern._lean_step_cpu.default(
            tokens, pos, dec.embed, dec.cos, dec.sin, self.norms, self.eps, self.weights, self.specs,
            [k for k, _ in kv], [v for _, v in kv], dec.norm, dec.norm_eps, dec.scale,
        )  # fmt: skip
        return self.head(h)


class Native:
    """The decoder's linears packed for the op once (:meth:`build`); :meth:`step_for` gives the
    C++ step for a batch size, with each sparse layer run as its plan runs it."""

    def __init__(self, dec, weights: list, specs: list[int], sparse: list[tuple[str, SparseLinear, int, int]]) -> None:
        self.dec, self.weights, self.specs, self.sparse = dec, weights, specs, sparse
        # row bucket -> (dispatch state, step or None, why not): one entry per bucket, so a dense
        # copy taken from a plan of an old state is not kept alive.
        self._steps: dict[str, tuple] = {}

    @classmethod
    def build(cls, dec) -> tuple[Native | None, str | None]:
        """``(Native, None)``, or ``(None, why)`` when the model cannot take the C++ step."""
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
                if type(mod) is SparseLinear:
                    sparse.append((f"model.layers.{i}.{name}", mod, k, len(specs) // _SPEC))
                weights += packed[0]
                specs += packed[1]
        return cls(dec, weights, specs, sparse), None

    def step_for(self, batch: int) -> tuple[NativeStep | None, str | None]:
        """The C++ step for ``batch`` rows, or ``(None, why)`` where it would not compute what the
        Python step does (a sparse layer whose plan runs neither the CPU kernel nor F.linear on
        its dense copy). Asked once per row bucket and dispatch state."""
        bucket, state = dispatch.row_bucket(batch), dispatch.state()
        hit = self._steps.get(bucket)
        if hit is None or hit[0] != state:
            hit = self._steps[bucket] = (state, *self._make(batch))
        return hit[1], hit[2]

    def _make(self, batch: int) -> tuple[NativeStep | None, str | None]:
        dtype, device = self.dec.embed.dtype, self.dec.embed.device
        weights, specs = list(self.weights), list(self.specs)
        with torch.inference_mode():
            for name, mod, k, j in self.sparse:
                p = _decode_plan(mod, torch.zeros(batch, k, dtype=dtype, device=device))
                backend = None if p is None else p.backend
                if backend == "cpu":
                    continue
                # The dense fallback's plan runs F.linear(x, its dense copy, bias) (backends/dense.py)
                # except with int8 activations: the C++ step does that with at::linear.
                if backend == "dense" and not mod.act_block and len(p.held) == 1 and p.held[0].dtype == dtype:
                    bias = mod._parameters.get("bias")
                    weights[j * _SLOTS : (j + 1) * _SLOTS] = [p.held[0], bias, None, None, None, None]
                    specs[j * _SPEC : (j + 1) * _SPEC] = [_DENSE, 0, 0, 0, 0]
                    continue
                return None, f"{name}: its plan runs backend {backend!r} for {batch} rows, not the CPU kernel"
        return NativeStep(self.dec, weights, specs), None
