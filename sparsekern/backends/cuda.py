"""CUDA backend: 2:4 ``nm_linear`` on the sparse tensor cores (``csrc/cuda/nm24_mma*.cu``).

Off by default (``auto=False``) until it has passed tests/gpu/test_cuda_nm24.py on a real GPU;
``sparsekern info`` lists it as "(off by default)" and ``use_backend("cuda")`` forces it.

The kernel reads the weight in the hardware layout of :mod:`sparsekern.formats.sm80`, derived
once per weight and cached in a ``WeakIdKeyDictionary`` keyed by the ``values`` tensor:

- identity, not content: hashing a weight per call would cost more than the GEMM, and a
  plain ``WeakKeyDictionary`` calls ``Tensor.__eq__`` (elementwise) on lookups;
- weak: when a layer's weight is freed its derived copy goes with it;
- each entry records ``meta`` and both tensors' version counters, so an in-place update
  (``copy_`` from ``load_state_dict``, a fine-tuning step) rebuilds the layout instead of
  running on a stale one.
When N % 128 == 0 and K % 64 == 0 (most LLM shapes) ``values_hw`` is ``values`` itself and only
the metadata (1/8 of the values' bytes) is extra memory.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from sparsekern import dispatch
from sparsekern.formats.nm import NMSparseWeight
from sparsekern.formats.sm80 import HW_DTYPES, hw_layout

OP = "sparsekern::_nm24_mma"

_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()


def has_kernel() -> bool:
    """True when the compiled extension registered a CUDA kernel for ``_nm24_mma``."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CUDA"))
    except RuntimeError:  # op not defined (ops.py not loaded) or no such key
        return False


def supports(x, values, meta, n, m, bias=None) -> str | None:
    if (n, m) != (2, 4):
        return f"only the 2:4 pattern (got {n}:{m})"
    if not x.is_cuda:
        return f"needs CUDA tensors (got {x.device})"
    if x.dtype not in HW_DTYPES:
        return f"needs float16 or bfloat16 (got {x.dtype})"
    if not has_kernel():
        return "the compiled extension has no CUDA kernels (CPU-only torch or SPARSEKERN_SKIP_CUDA_BUILD=1)"
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return "needs sparse tensor cores (sm_80 or newer)"
    return None


def hw_weight(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached ``(values_hw, meta_hw)`` of a 2:4 weight, rebuilt if either tensor changed."""
    key = (id(meta), values._version, meta._version)
    hit = _cache.get(values)
    if hit is not None and hit[0] == key:
        return hit[1]
    rows, kept = values.shape
    layout = hw_layout(NMSparseWeight(values.detach(), meta.detach(), 2, 4, (rows, kept * 2)))
    _cache[values] = (key, layout)
    return layout


def nm_linear(x, values, meta, n, m, bias=None):
    values_hw, meta_hw = hw_weight(values, meta)
    return torch.ops.sparsekern._nm24_mma(x, values_hw, meta_hw, values.shape[0], bias)


dispatch.register("nm_linear", "cuda", nm_linear, supports, auto=False)
