"""The compiled CPU kernels (``csrc/cpu``): N:M and block-sparse linears.

Registered for ``nm_linear`` and ``bsr_linear``; they run when x is a CPU tensor and the
extension ``sparsekern._C`` is loaded. The instruction set (AVX2 or portable) is chosen in C++
at every call (``sparsekern info`` shows it; ``SPARSEKERN_CPU_ISA`` lowers it).
"""

from __future__ import annotations

import torch

from sparsekern import _extension, dispatch, plan
from sparsekern.formats.nm import SUPPORTED_DTYPES


def supports_cpu(first, *args) -> str | None:
    """Whether the compiled CPU kernels can run an op whose first argument is ``first``."""
    if not _extension.HAS_C_EXT:
        return f"compiled extension not loaded ({_extension.LOAD_ERROR})"
    if first.device.type != "cpu":
        return f"inputs are on {first.device}, not the CPU"
    if first.dtype not in SUPPORTED_DTYPES:
        return f"dtype {first.dtype} not handled (float32, float16, bfloat16)"
    return None


def _nm_linear(x, values, meta, n, m, bias=None, scales=None, zeros=None, group_size=0, act_block=0):
    return torch.ops.sparsekern._nm_linear_cpu(x, values, meta, n, m, bias, scales, zeros, group_size, act_block)


def _bsr_linear(x, crow, col, blocks, bias=None, scales=None, zeros=None):
    return torch.ops.sparsekern._bsr_linear_cpu(x, crow, col, blocks, bias, scales, zeros)


def _plan_nm(*args):
    # A plan calls the C++ op's overload directly: one Python frame less per call.
    return torch.ops.sparsekern._nm_linear_cpu.default, ()


def _plan_bsr(*args):
    return torch.ops.sparsekern._bsr_linear_cpu.default, ()


# Both ops recompute rows of x holding NaN/Inf with dense semantics in C++ (*_linear_op.cpp).
dispatch.register("nm_linear", "cpu", _nm_linear, supports_cpu, nonfinite_exact=True)
plan.register_hook("nm_linear", "cpu", _plan_nm)
dispatch.register("bsr_linear", "cpu", _bsr_linear, supports_cpu, nonfinite_exact=True)
plan.register_hook("bsr_linear", "cpu", _plan_bsr)
