"""Plumbing shared by token pruning and KV-cache eviction: sparsekern attention inside HF models.

HF attention modules (BERT, RoBERTa, DistilBERT, ViT, Llama, ...) project q/k/v themselves and
then call ``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)``.
We register our attention functions under their own names and point *one module* at them by
giving that module a shallow copy of its config with a different ``_attn_implementation``. The
model-level config is untouched, so mask creation and every other layer keep their usual
path, and restoring the module's original config object undoes the patch exactly.
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from sparsekern import ops


def register(name: str, fn: Callable) -> None:
    """Register ``fn`` as an HF attention implementation called ``name`` (idempotent)."""
    AttentionInterface.register(name, fn)


def swap_attention(module: nn.Module, name: str) -> Callable[[], None]:
    """Make ``module`` use attention implementation ``name``; returns the undo function."""
    original = module.config
    patched = copy.copy(original)
    # Set the backing field directly: the property setter would also rewrite sub-configs, which
    # a shallow copy shares with the original config.
    patched._attn_implementation_internal = name
    module.config = patched
    # Kept on the module (not in a closure) so a deep copy of the model restores its own copy.
    module._sparsekern_orig_config = original
    module._sparsekern_fallback_impl = original._attn_implementation
    return lambda: restore_attention(module)


def restore_attention(module: nn.Module) -> None:
    """Undo :func:`swap_attention` on ``module`` (no-op if it was not swapped)."""
    original = getattr(module, "_sparsekern_orig_config", None)
    if original is None:
        return
    module.config = original
    del module._sparsekern_orig_config, module._sparsekern_fallback_impl


def fallback_attention(module: nn.Module) -> Callable:
    """The attention function ``module`` used before :func:`swap_attention`."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    impl = getattr(module, "_sparsekern_fallback_impl", None) or "eager"
    if impl == "eager":
        if eager is None:
            raise RuntimeError(f"{type(module).__name__}: no eager attention to fall back to")
        return eager
    return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)


@functools.cache
def _has_return_scores() -> bool:
    # The kernel work may add return_scores=True to pruned_attention (scores from the same launch
    # sequence as the attention); until it lands, scores come from a separate token_scores call.
    return "return_scores" in inspect.signature(ops.pruned_attention).parameters


def attention_with_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
    cls_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over all keys through sparsekern, plus the key scores.

    Returns ``(out [B, H, Sq, D], scores fp32 [B, H, Sk])`` where ``scores`` is
    ``ops.token_scores(q, k, causal, scale, cls_only)``: the mean attention each key receives.
    No ``[Sq, Sk]`` probability matrix is materialised by the caller.
    """
    b, h, sk = k.shape[0], k.shape[1], k.shape[2]
    keep_idx = torch.arange(sk, device=q.device).expand(b, h, sk).contiguous()
    if _has_return_scores() and not cls_only:
        out, scores = ops.pruned_attention(q, k, v, keep_idx, causal, scale, return_scores=True)
        return out, scores.float()
    out = ops.pruned_attention(q, k, v, keep_idx, causal, scale)
    return out, ops.token_scores(q, k, causal, scale, cls_only)
