"""sparsekern: make pruned models fast. See README.md and DESIGN.md."""

__version__ = "0.1.0"

from sparsekern import ops  # noqa: E402  (defines the op schemas before any kernel registers)
from sparsekern._extension import HAS_C_EXT  # noqa: E402
from sparsekern.backends import reference as _reference_backend  # noqa: E402, F401
from sparsekern.dispatch import use_backend  # noqa: E402
from sparsekern.formats import BlockSparseWeight, NMSparseWeight  # noqa: E402

__all__ = ["HAS_C_EXT", "BlockSparseWeight", "NMSparseWeight", "ops", "use_backend", "__version__"]
