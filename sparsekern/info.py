"""What `sparsekern info` reports: versions, backends, compiled extension, CPU ISA, GPU."""

from __future__ import annotations

import platform

import torch

import sparsekern
from sparsekern import dispatch
from sparsekern._extension import HAS_C_EXT, LOAD_ERROR
from sparsekern.plan import dense_copy_bytes

ISA_NAMES = {0: "portable", 1: "avx2", 2: "avx512", 3: "avx512bf16"}


def cpu_isa() -> str:
    """Instruction set the compiled CPU kernels use now, or why there is none."""
    if not HAS_C_EXT:
        return "none (compiled extension not loaded)"
    return ISA_NAMES.get(int(torch.ops.sparsekern._cpu_isa()), "unknown")


def gather() -> dict[str, object]:
    info: dict[str, object] = {
        "sparsekern": sparsekern.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "extension": "loaded" if HAS_C_EXT else f"not loaded: {LOAD_ERROR}",
        "cpu_isa": cpu_isa(),
        "threads": torch.get_num_threads(),
        "cpu_parallel_team": torch.ops.sparsekern._cpu_parallel_team() if HAS_C_EXT else "none",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
    else:
        info["gpu"] = "none"
    for op in (
        "nm_linear",
        "bsr_linear",
        "nm_grouped_linear",
        "bsr_grouped_linear",
        "token_scores",
        "pruned_attention",
    ):
        impls = dispatch.implementations(op)
        info[f"backends.{op}"] = ", ".join(name + _auto_note(impl) for name, impl in sorted(impls.items()))
    info["backend in force"] = dispatch.current_backend()
    # What the dense fallback holds for this process's layers (a fresh `sparsekern info`: none).
    info["dense copies"] = f"{dense_copy_bytes()} bytes"
    return info


def render() -> str:
    rows = gather()
    width = max(len(k) for k in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows.items())


def _auto_note(impl) -> str:
    if callable(impl.auto):  # auto for some arguments only, e.g. backends.triton.blocks_on_cuda
        return f" (auto: {impl.auto.__name__})"
    return "" if impl.auto else " (off by default)"
