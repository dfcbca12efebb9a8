"""Every backend of ``nm_grouped_linear`` and ``bsr_grouped_linear`` (the MoE ops,
:mod:`sparsekern.ops_moe`); the BSR op's mirror the N:M op's below.

- ``cpu``: the compiled kernel ``_nm_grouped_linear_cpu`` (csrc/cpu/nm_grouped_linear_op.cpp).
- ``triton``: ``sparsekern.kernels.nm_grouped_linear``, off by default (``auto=False``) like the
  other Triton kernels until it has passed on a real GPU.
- ``dense``: the experts decompressed once (``[E, out, K]``, cached like the dense fallback of
  ``nm_linear``, dropped when it loses a measurement), one GEMM per expert with rows.
- ``reference``: decompress per call (:func:`sparsekern.reference.nm_grouped_linear`).

Each handles NaN/Inf in x as the dense op does, itself: the op has no plan to do it for them.
"""

from __future__ import annotations

import importlib

import torch

from sparsekern import dispatch, reference
from sparsekern.backends import dense
from sparsekern.backends.cpu import supports_cpu
from sparsekern.backends.triton import _device_reason
from sparsekern.formats.bsr import bsr_to_dense
from sparsekern.formats.nm import nm_to_dense
from sparsekern.ops import new_output
from sparsekern.ops_moe import BSR_OP, OP


def _cpu(x, values, meta, offsets, n, m):
    return torch.ops.sparsekern._nm_grouped_linear_cpu(x, values, meta, offsets, n, m)


def _triton_supports(x, *args) -> str | None:
    return _device_reason(x)


def _triton(x, values, meta, offsets, n, m):
    kernels = importlib.import_module("sparsekern.kernels.nm_grouped_linear")
    return kernels.nm_grouped_linear(x, values, meta, offsets, n, m)


def dense_experts(values, meta, n: int, m: int) -> torch.Tensor:
    """The dense ``[E, out, K]`` copy of stacked experts, from the cache while still current."""
    e, out, kept = values.shape

    def build():
        flat = nm_to_dense(values.reshape(e * out, kept), meta.reshape(e * out, -1), n, m)
        return flat.view(e, out, -1)

    return dense._cached(values, dense.weight_stamp(values, meta, n, m), build)


def _expert_gemms(x, w, offsets):
    """``x[lo:hi] @ w[e].T`` per expert with rows, into one ``[T, out]`` output."""
    out = new_output((x.shape[0], w.shape[1]), x)
    bounds = offsets.tolist()
    for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi > lo:
            torch.mm(x[lo:hi], w[e].t(), out=out[lo:hi])
    return out


def _dense(x, values, meta, offsets, n, m):
    return _expert_gemms(x, dense_experts(values, meta, n, m), offsets)


def _dense_supports(x, values, *rest) -> str | None:
    from sparsekern import plan

    return None if plan.dense_allowed(values) else "these experts were made with dense_fallback=False"


def _release_dense(x, values, *rest) -> None:
    dense._drop(id(values))


# -- bsr_grouped_linear: the same four, keyed on blocks (the float tensor, as values above) --------


def _bsr_cpu(x, crow, col, blocks, offsets):
    return torch.ops.sparsekern._bsr_grouped_linear_cpu(x, crow, col, blocks, offsets)


def _bsr_triton(x, crow, col, blocks, offsets):
    kernels = importlib.import_module("sparsekern.kernels.bsr_grouped_linear")
    return kernels.bsr_grouped_linear(x, crow, col, blocks, offsets)


def dense_bsr_experts(crow, col, blocks, k: int) -> torch.Tensor:
    """The dense ``[E, out, K]`` copy of stacked BSR experts, from the cache while still current."""

    def build():
        ws = []
        for e in range(crow.shape[0]):
            lo, hi = int(crow[e, 0]), int(crow[e, -1])
            ws.append(bsr_to_dense(crow[e] - lo, col[lo:hi], blocks[lo:hi], k))
        return torch.stack(ws)

    return dense._cached(blocks, dense.weight_stamp(blocks, crow, col, k), build)


def _bsr_dense(x, crow, col, blocks, offsets):
    return _expert_gemms(x, dense_bsr_experts(crow, col, blocks, x.shape[1]), offsets)


def _bsr_dense_supports(x, crow, col, blocks, offsets) -> str | None:
    return _dense_supports(x, blocks)


def _bsr_release_dense(x, crow, col, blocks, offsets) -> None:
    dense._drop(id(blocks))


dispatch.register(OP, "cpu", _cpu, supports_cpu, nonfinite_exact=True)
dispatch.register(OP, "triton", _triton, _triton_supports, auto=False, nonfinite_exact=True)
dispatch.register(OP, "dense", _dense, _dense_supports, release=_release_dense, nonfinite_exact=True)
dispatch.register(OP, "reference", reference.nm_grouped_linear, nonfinite_exact=True)

dispatch.register(BSR_OP, "cpu", _bsr_cpu, supports_cpu, nonfinite_exact=True)
dispatch.register(BSR_OP, "triton", _bsr_triton, _triton_supports, auto=False, nonfinite_exact=True)
dispatch.register(BSR_OP, "dense", _bsr_dense, _bsr_dense_supports, release=_bsr_release_dense, nonfinite_exact=True)
dispatch.register(BSR_OP, "reference", reference.bsr_grouped_linear, nonfinite_exact=True)
