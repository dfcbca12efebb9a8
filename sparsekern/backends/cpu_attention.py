"""The compiled CPU attention kernels (``csrc/cpu/attention*.cpp``).

Registered for ``token_scores``, ``pruned_attention`` and ``pruned_attention_with_scores``; they
run on CPU tensors when the extension ``sparsekern._C`` is loaded. The instruction set (AVX2 or
portable) is chosen in C++ at every call (``SPARSEKERN_CPU_ISA`` lowers it).
"""

from __future__ import annotations

import torch

from sparsekern import dispatch
from sparsekern.backends.cpu import supports_cpu as _supports


def _token_scores(q, k, causal=False, scale=None, cls_only=False):
    return torch.ops.sparsekern._token_scores_cpu(q, k, causal, scale, cls_only)


def _pruned_attention(q, k, v, keep_idx, causal=False, scale=None):
    return torch.ops.sparsekern._pruned_attention_cpu(q, k, v, keep_idx, causal, scale)


def _pruned_attention_with_scores(q, k, v, keep_idx, causal=False, scale=None):
    return torch.ops.sparsekern._pruned_attention_scores_cpu(q, k, v, keep_idx, causal, scale)


dispatch.register("token_scores", "cpu", _token_scores, _supports)
dispatch.register("pruned_attention", "cpu", _pruned_attention, _supports)
dispatch.register("pruned_attention_with_scores", "cpu", _pruned_attention_with_scores, _supports)
