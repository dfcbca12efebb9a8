"""sparsekern: make pruned models fast. See README.md and docs/DESIGN.md."""

__version__ = "0.1.0"

import importlib  # noqa: E402
import logging  # noqa: E402
import pkgutil  # noqa: E402

from sparsekern import backends as _backends  # noqa: E402
from sparsekern import ops  # noqa: E402  (defines the op schemas before any kernel registers)
from sparsekern._extension import HAS_C_EXT  # noqa: E402
from sparsekern.dispatch import use_backend  # noqa: E402
from sparsekern.formats import BlockSparseWeight, NMSparseWeight  # noqa: E402

# Every module in sparsekern/backends registers its implementations on import. One that cannot
# load (no triton, no compiled extension) is logged and skipped: the reference always remains.
for _mod in pkgutil.iter_modules(_backends.__path__):
    try:
        importlib.import_module(f"sparsekern.backends.{_mod.name}")
    except Exception as _exc:  # noqa: BLE001
        logging.getLogger("sparsekern").info("sparsekern: backend %s not loaded: %s", _mod.name, _exc)

# `from_pretrained` reads sparsekern folders once transformers loads its quantizer registry
# (registered then, not now: that import costs seconds).
from sparsekern import hf as _hf  # noqa: E402

_hf.install()

# Heavier parts load on first use (they pull transformers, safetensors, rich).
_LAZY = {
    "SparseLinear": "sparsekern.nn.linear",
    "SparseExperts": "sparsekern.nn.moe",
    "DenseHead": "sparsekern.nn.dense_head",
    "drop_experts": "sparsekern.prune.experts",
    "sparsify": "sparsekern.nn.swap",
    "quantize": "sparsekern.nn.swap",
    "prune_tokens": "sparsekern.nn.attention",
    "H2OCache": "sparsekern.nn.attention",
    "save": "sparsekern.checkpoint",
    "load": "sparsekern.checkpoint",
    "generate": "sparsekern.lean",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparsekern' has no attribute {name!r}")


__all__ = [
    "HAS_C_EXT",
    "BlockSparseWeight",
    "NMSparseWeight",
    "ops",
    "use_backend",
    "__version__",
    *_LAZY,
]
