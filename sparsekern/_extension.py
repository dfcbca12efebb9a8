"""Loading the compiled extension ``sparsekern._C``: optional, logged, never a crash."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("sparsekern")

HAS_C_EXT = False
LOAD_ERROR: str | None = None

if os.environ.get("SPARSEKERN_DISABLE_C_EXT") == "1":
    LOAD_ERROR = "disabled by SPARSEKERN_DISABLE_C_EXT=1"
else:
    try:
        from sparsekern import _C  # noqa: F401  (registers TORCH_LIBRARY_IMPL kernels on import)

        HAS_C_EXT = True
    except ImportError as exc:  # built with SPARSEKERN_SKIP_BUILD=1, or a broken build
        LOAD_ERROR = str(exc)
if not HAS_C_EXT:
    log.info("sparsekern: compiled kernels not loaded (%s); using the reference path", LOAD_ERROR)

# The CPU kernels' instruction sets (csrc/cpu/isa.h), as SPARSEKERN_CPU_ISA names them.
CPU_ISAS = {"portable": 0, "avx2": 1, "avx512": 2, "avx512bf16": 3}


def detected_cpu_isa() -> int:
    """The best level of :data:`CPU_ISAS` this CPU runs, whatever ``SPARSEKERN_CPU_ISA`` asks for
    (the variable only lowers it per call); 0 without the extension."""
    if not HAS_C_EXT:
        return 0
    import torch

    saved = os.environ.pop("SPARSEKERN_CPU_ISA", None)
    try:
        return int(torch.ops.sparsekern._cpu_isa())
    finally:
        if saved is not None:
            os.environ["SPARSEKERN_CPU_ISA"] = saved
