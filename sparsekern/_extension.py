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
