"""Decode attention for HF Llama-family decoders on the CPU: the G query heads that share a KV head
attend as G query rows of that head.

At decode (one query position) HF's ``sdpa`` attention hands torch ``[B, H, 1, D]`` queries
against ``[B, Hkv, S, D]`` keys (expanded to H heads, or ``enable_gqa``); torch's CPU attention
then runs H one-row problems. With one query position there is no causal mask, so the G = H / Hkv
heads of a KV head can go as G rows of one ``[B, Hkv, G, D]`` problem: the same products and
sums, the keys read once per KV head. The lean decode step does the same
(:mod:`sparsekern.lean.decoder`).

NOTE: TinyLlama-1.1B heads (32 / 4, D 64), 160 cached keys, 1 query, 2-core Zen 3 (AVX2), one
process, ``bench``-style best of 3: fp32 HF sdpa 240 us, as rows 51; bf16 749 against 116 (torch's
CPU attention kernel without AVX-512 BF16). 22 layers a token: ~4 ms (fp32) and ~14 ms (bf16) of
a 2:4 model's ~120 / ~87 ms decode step.

:func:`use_decode_attention` points a model's self-attention modules at :func:`decode_attention`
(one module at a time, through :mod:`sparsekern.nn._attn_patch`: the model config is untouched);
``sparsify`` and the loaders of sparsekern folders call it, as they make the LM head a DenseHead.
Every call that is not a plain one-position decode (prefill, a mask per head, a sliding window,
a soft cap, sinks, dropout, returned weights) goes to the attention the module had before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# NOTE: sparsekern.nn._attn_patch imports transformers (seconds, and a cycle while transformers'
# quantizer registry imports sparsekern's quantizer): imported where a model is swapped.

NAME = "sparsekern_decode"
# Model types whose self-attention modules are swapped (the lean decoder's families).
MODEL_TYPES = ("llama", "qwen2", "mistral")
# The attention implementations the swap replaces (and falls back to).
REPLACES = ("sdpa",)
# Extra keyword arguments HF passes that the fast path must see unset (None / False / 0).
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "output_attentions", "head_mask")


def _set(v) -> bool:
    return isinstance(v, torch.Tensor) or (v is not None and v is not False and v != 0)


def _mask_ok(mask: torch.Tensor | None, batch: int, keys: int) -> torch.Tensor | None | bool:
    """The mask as SDPA takes it for ``[B, Hkv, G, S]`` scores, or False where it does not fit."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[0] not in (1, batch):
        return False
    return mask if mask.shape[3] == keys else False


def decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
):
    """HF attention interface: ``(attn_output [B, q_len, H, D], None)``."""
    b, h, q_len, d = query.shape
    hkv = key.shape[1]
    if (
        q_len == 1
        and query.device.type == "cpu"
        and not dropout
        and hkv > 0
        and h % hkv == 0
        and key.shape[0] == b
        and not any(_set(kwargs.get(k)) for k in _UNSUPPORTED)
    ):
        mask = _mask_ok(attention_mask, b, key.shape[2])
        if mask is not False:
            q = query.reshape(b, hkv, h // hkv, d)
            out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
            return out.reshape(b, h, 1, d).transpose(1, 2), None
    from sparsekern.nn import _attn_patch

    fallback = getattr(module, "_sparsekern_decode_fallback", None) or "sdpa"
    fn = _attn_patch.ALL_ATTENTION_FUNCTIONS.get_interface(fallback, None)
    return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _is_self_attention(mod: nn.Module) -> bool:
    config = getattr(mod, "config", None)
    return (
        config is not None
        and getattr(mod, "is_causal", False) is True
        and hasattr(mod, "num_key_value_groups")
        and hasattr(mod, "k_proj")
        and getattr(config, "_attn_implementation", None) in REPLACES
    )


def use_decode_attention(model: nn.Module) -> int:
    """Point the self-attention modules of an HF Llama / Qwen2 / Mistral decoder at
    :func:`decode_attention`, in place; returns how many. Other models, modules already swapped
    (token pruning, KV eviction, this) and modules on another attention implementation than
    ``sdpa`` are left alone."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in MODEL_TYPES:
        return 0
    from sparsekern.nn import _attn_patch

    _attn_patch.register(NAME, decode_attention)
    count = 0
    for mod in model.modules():
        if not _is_self_attention(mod) or hasattr(mod, "_sparsekern_orig_config"):
            continue
        fallback = mod.config._attn_implementation
        _attn_patch.swap_attention(mod, NAME)
        mod._sparsekern_decode_fallback = fallback
        count += 1
    return count
