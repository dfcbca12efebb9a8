"""The Triton attention kernels (``kernels/attention.py``): token_scores and pruned_attention.

Registered with ``auto=False``: they have not yet passed on a real GPU (docs/DESIGN.md), so they run
only when forced (``use_backend("triton")``). Like ``backends/triton.py`` this module imports
neither triton nor the kernels until a kernel is asked for.
"""

from __future__ import annotations

import importlib

import torch

from sparsekern import dispatch
from sparsekern.backends.triton import _device_reason


def _supports(q, *args) -> str | None:
    reason = _device_reason(q)
    if reason is None and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return "the Triton interpreter mishandles bfloat16 (test bf16 on a GPU)"
    return reason


def _kernels():
    return importlib.import_module("sparsekern.kernels.attention")


def _token_scores(q, k, causal=False, scale=None, cls_only=False):
    return _kernels().token_scores(q, k, causal, scale, cls_only)


def _pruned_attention(q, k, v, keep_idx, causal=False, scale=None):
    return _kernels().pruned_attention(q, k, v, keep_idx, causal, scale)


def _pruned_attention_with_scores(q, k, v, keep_idx, causal=False, scale=None):
    return _kernels().pruned_attention_with_scores(q, k, v, keep_idx, causal, scale)


dispatch.register("token_scores", "triton", _token_scores, _supports, auto=False)
dispatch.register("pruned_attention", "triton", _pruned_attention, _supports, auto=False)
dispatch.register("pruned_attention_with_scores", "triton", _pruned_attention_with_scores, _supports, auto=False)
