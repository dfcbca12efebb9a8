"""The Triton backend: ``nm_linear`` and ``bsr_linear`` kernels from ``sparsekern.kernels``.

``bsr_linear`` is a dispatch candidate on CUDA tensors (``auto=blocks_on_cuda``): with float
blocks it passed tests/gpu on an H200 (2026-11-27) and beat cuBLAS at 64x64 blocks, 90 % sparse,
in all 12 Llama-7B cases measured there, 1.6-4.0x in CUDA graphs
(bench/results/gpu-h200-2026-11-27.md); with int8 / int4 blocks it passed
tests/gpu/test_quant_triton_gpu.py there and, once one-scale-per-row blocks went to ``tl.dot`` as
integers (``kernels.bsr_linear.scales_after_dot``), ran 1.5-2.8x cuBLAS bf16 at decode and
1.8-2.2x at 4096 rows (bench/results/gpu-h200-2026-11-27-quant.md). The measured dispatcher
still keeps ``dense`` where it wins (eager decode, where the Triton launches cost more host time
than the GPU work).

``nm_linear`` passed the same tests (int8 / int4 values too) but lost to cuBLAS at 2:4 in every
case (0.05-0.74x; quantized 0.04-0.65x) and beat it only at 1 row for 1:4 / 2:8 (1.0-1.25x), so
it stays ``auto=False``: it runs only when forced with ``sparsekern.use_backend("triton")`` or
``SPARSEKERN_BACKEND=triton``.

``import sparsekern`` imports this module for every user, so it imports neither triton nor the
kernels until a kernel is asked for: a CPU-only user without triton pays nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from sparsekern import dispatch

_NEEDS = "triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors"


def _triton_missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def _device_reason(x) -> str | None:
    missing = _triton_missing()
    if missing:
        return missing
    if x.device.type == "cuda":
        return None
    if x.device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
        return f"{_NEEDS}; got {x.device.type} tensors"
    # Triton picks interpreter or compiler for the whole process when triton.language is
    # first imported (kernels/_common.py), so the variable must be set before that.
    tl = sys.modules.get("triton.language")
    if tl is not None and type(tl.cdiv).__name__ != "InterpretedFunction":
        return "triton was imported before TRITON_INTERPRET=1 was set; set it before the first import of triton"
    return None


def blocks_on_cuda(x, *_) -> bool:
    """A dispatch candidate for CUDA tensors, float or quantized blocks: what passed tests/gpu.
    The interpreter on CPU is for tests, never a candidate."""
    return x.device.type == "cuda"


def _nm_supports(x, values, meta, n, m, bias=None, *quant) -> str | None:
    return _device_reason(x)


def _bsr_supports(x, crow, col, blocks, bias=None, *quant) -> str | None:
    return _device_reason(x)


def _nm_linear(x, values, meta, n, m, bias=None, *quant):
    # quant: (scales, zeros, group_size, act_block) of quantized values, dequantized in the kernels
    return importlib.import_module("sparsekern.kernels.nm_linear").nm_linear(x, values, meta, n, m, bias, *quant)


def _bsr_linear(x, crow, col, blocks, bias=None, scales=None, zeros=None):
    # scales / zeros of quantized (int8 / int4) blocks, dequantized in the kernel
    kernel = importlib.import_module("sparsekern.kernels.bsr_linear").bsr_linear
    return kernel(x, crow, col, blocks, bias, scales, zeros)


# NaN/Inf in x come out as in the dense op from the kernels themselves (kernels/nonfinite.py), so
# the public op adds no all_finite() scan: that is a host sync per call, and no CUDA graphs.
dispatch.register("nm_linear", "triton", _nm_linear, _nm_supports, auto=False, nonfinite_exact=True)
dispatch.register("bsr_linear", "triton", _bsr_linear, _bsr_supports, auto=blocks_on_cuda, nonfinite_exact=True)
