"""CUDA backend: 2:4 ``nm_linear`` on the sparse tensor cores (``csrc/cuda/nm24_mma*.cu``).

Off by default (``auto=False``) until it has passed tests/gpu/test_cuda_nm24.py on a real GPU;
``sparsekern info`` lists it as "(off by default)" and ``use_backend("cuda")`` forces it.

The kernel reads the weight in the hardware layout of :mod:`sparsekern.formats.sm80`, derived
once per weight and cached in a ``WeakIdKeyDictionary`` keyed by the ``values`` tensor:

- identity, not content: hashing a weight per call would cost more than the GEMM, and a
  plain ``WeakKeyDictionary`` calls ``Tensor.__eq__`` (elementwise) on lookups;
- weak: when a layer's weight is freed its derived copy goes with it;
- each entry records what it was built from: data pointer, dtype, shape and device of both
  ``values`` and ``meta`` (``Module.half()`` / ``.to()`` swap ``param.data`` under the same
  Parameter object), plus their version counters where tensors have one, so an in-place update
  (``copy_`` from ``load_state_dict``, a fine-tuning step) rebuilds it. Inference tensors
  (``torch.inference_mode``) have no version counter; an in-place write to one inside
  inference mode is not seen (write through a new tensor, or call :func:`clear_cache`);
- one lock around lookup and build: threads serving the same layer build it once.
When N % 128 == 0 and K % 64 == 0 (most LLM shapes) ``values_hw`` is ``values`` itself and only
the metadata (1/8 of the values' bytes) is extra memory.

NaN/Inf in x: the mma kernel skips pruned weights; the Triton kernel of
``kernels/nonfinite.py`` then writes NaN where dense ``0 * inf`` would, on the device (no host
sync, so the layer can be captured in a CUDA graph). Without triton the backend is not
``nonfinite_exact`` and the public op's host-side scan runs instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading

import torch
from torch.utils.weak import WeakIdKeyDictionary

from sparsekern import dispatch
from sparsekern.formats.nm import NMSparseWeight
from sparsekern.formats.sm80 import HW_DTYPES, hw_layout

OP = "sparsekern::_nm24_mma"

_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()
_lock = threading.Lock()
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def has_kernel() -> bool:
    """True when the compiled extension registered a CUDA kernel for ``_nm24_mma``."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CUDA"))
    except RuntimeError:  # op not defined (ops.py not loaded) or no such key
        return False


def supports(x, values, meta, n, m, bias=None, scales=None, *quant) -> str | None:
    if scales is not None:
        return "quantized (int8/int4) values: no mma.sp kernel for them"
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


def _stamp(t: torch.Tensor) -> tuple:
    """What a derived layout depends on: storage, dtype, shape, device and, where tracked, version."""
    version = -1 if t.is_inference() else t._version
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.device, version)


def hw_weight(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached ``(values_hw, meta_hw)`` of a 2:4 weight, rebuilt if either tensor changed."""
    key = (_stamp(values), _stamp(meta))
    with _lock:
        hit = _cache.get(values)
        if hit is not None and hit[0] == key:
            return hit[1]
        rows, kept = values.shape
        layout = hw_layout(NMSparseWeight(values.detach(), meta.detach(), 2, 4, (rows, kept * 2)))
        _cache[values] = (key, layout)
        return layout


def clear_cache() -> None:
    """Drop every derived layout (after in-place writes to inference tensors)."""
    with _lock:
        _cache.clear()


def nm_linear(x, values, meta, n, m, bias=None, *quant):
    values_hw, meta_hw = hw_weight(values, meta)
    y = torch.ops.sparsekern._nm24_mma(x, values_hw, meta_hw, values.shape[0], bias)
    if HAVE_TRITON:
        y = importlib.import_module("sparsekern.kernels.nonfinite").nm_nonfinite_(x, meta, n, m, y)
    return y


dispatch.register("nm_linear", "cuda", nm_linear, supports, auto=False, nonfinite_exact=HAVE_TRITON)
