"""``torch.ops.sparsekern.quant_linear``: a dense int8 linear with int8 activations.

The layer :class:`sparsekern.nn.quant_linear.QuantLinear` runs (``sparsify(..., head="int8")``
puts one in place of the LM head: at 2:4 + int4 the dense bf16 head is a quarter of a token's
bytes). Contract: ``values`` int8 ``[out, K]``, ``scales`` ``[out]`` in x's dtype (one per output
row), ``bias`` ``[out]`` or None, ``act_block`` > 0 dividing K; x (any leading dims) is rounded to
int8 per block of ``act_block`` columns (:func:`sparsekern.reference.quantize_x`), then
``y = x_q @ (values * scales).T + bias`` in fp32, cast to x's dtype (:func:`reference.quant_linear`).

On the CPU the compiled kernel runs (csrc/cpu/quant_linear_op.cpp); elsewhere, or without the
extension, the reference. No measured dispatch: there is no other kernel that computes the same
rounding, and the dense layer it replaced is not kept.
"""

from __future__ import annotations

import torch

from sparsekern import _extension, reference
from sparsekern.checks import check_tensor
from sparsekern.ops import _check_linear_common, lib  # ops.py imports this module at its end

SCHEMA = "(Tensor x, Tensor values, Tensor scales, Tensor? bias=None, int act_block=32) -> Tensor"
lib.define("quant_linear" + SCHEMA)
lib.define("_quant_linear_cpu" + SCHEMA)
# Whether _quant_linear_cpu runs its integer-dot kernel here for this act_block (AVX-512 VBMI + VNNI,
# act_block 32, the active ISA at least AVX-512); elsewhere it runs a portable loop.
lib.define("_quant_linear_fast(int act_block) -> bool")


def check_act_block(act_block, k: int) -> None:
    """``act_block``: a block of columns > 0 that divides ``k`` (x is always rounded here)."""
    if not isinstance(act_block, int) or isinstance(act_block, bool):
        raise TypeError(f"act_block: expected int, got {type(act_block).__name__}")
    if act_block <= 0 or k % act_block:
        raise ValueError(f"act_block: expected a block size > 0 that divides in_features {k}, got {act_block}")


def check_quant_linear(x, values, scales, bias, act_block) -> None:
    """Every check that reads no tensor data (the fake implementation runs these too)."""
    check_tensor("values", values, (torch.int8,))
    if values.dim() != 2:
        raise ValueError(f"values: expected a 2-D int8 [out, in] tensor, got shape {tuple(values.shape)}")
    out, k = values.shape
    check_tensor("scales", scales)
    if tuple(scales.shape) != (out,):
        raise ValueError(f"scales: expected shape {(out,)} (one per output row), got {tuple(scales.shape)}")
    check_act_block(act_block, k)
    _check_linear_common(x, scales, "scales", out, k, bias)
    if values.device != x.device:
        raise ValueError(f"values: expected device {x.device} (that of x), got {values.device}")


def _has_cpu_kernel() -> bool:
    return _extension.HAS_C_EXT and torch._C._dispatch_has_kernel_for_dispatch_key(
        "sparsekern::_quant_linear_cpu", "CPU"
    )


def fast_here(act_block: int = 32) -> bool:
    """Whether the CPU kernel runs integer dot products here (else a portable loop, slower than a
    dense bf16/fp32 head: :func:`sparsekern.nn.swap.sparsify` then keeps the head dense)."""
    return _has_cpu_kernel() and bool(torch.ops.sparsekern._quant_linear_fast(act_block))


def _quant_linear_impl(x, values, scales, bias=None, act_block=32):
    check_quant_linear(x, values, scales, bias, act_block)
    x2 = x.reshape(-1, x.shape[-1])
    if x.device.type == "cpu" and _has_cpu_kernel():
        y = torch.ops.sparsekern._quant_linear_cpu.default(x2, values.contiguous(), scales, bias, act_block)
    else:
        y = reference.quant_linear(x2, values, scales, bias, act_block)
    return y.reshape(*x.shape[:-1], values.shape[0])


@torch.library.register_fake("sparsekern::quant_linear")
def _quant_linear_fake(x, values, scales, bias=None, act_block=32):
    check_quant_linear(x, values, scales, bias, act_block)
    return x.new_empty((*x.shape[:-1], values.shape[0]))


torch.library.register_fake("sparsekern::_quant_linear_cpu")(_quant_linear_fake)
lib.impl("quant_linear", _quant_linear_impl, "CompositeExplicitAutograd")


def _setup(ctx, inputs, output):
    x, values, scales, bias = inputs[:4]
    ctx.save_for_backward(values, scales)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """Gradients for x (straight through the rounding of x, as nm_linear's int8 activations) and
    bias; the integer weights and their scales take none."""
    values, scales = ctx.saved_tensors
    gx = grad @ (values.to(grad.dtype) * scales.to(grad.dtype)[:, None]) if ctx.needs_input_grad[0] else None
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return gx, None, None, gb, None


torch.library.register_autograd("sparsekern::quant_linear", _backward, setup_context=_setup)


def quant_linear(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, bias=None, act_block: int = 32):
    """``torch.ops.sparsekern.quant_linear`` (see the module docstring)."""
    return torch.ops.sparsekern.quant_linear(x, values, scales, bias, act_block)
