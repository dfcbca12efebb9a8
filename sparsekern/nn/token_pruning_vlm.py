"""Visual-token pruning inside a LLaVA decoder (FastV-style), behind ``sparsekern.prune_tokens``.

``prune_tokens(llava, keep=0.25, layers=(2,), modality="image")``: during the prefill, after
decoder layer ``l`` of the language model, the image tokens (``input_ids ==
config.image_token_id``) are ranked by the attention they receive in layer ``l`` (mean over
heads and over all queries, causal: ``ops.token_scores(q, k, causal=True)`` on that layer's own
q/k, next to ``ops.pruned_attention`` for its output). All text tokens and the top
``ceil(keep * n_image)`` image tokens survive, in their original order; layers after ``l`` run
on them only. Each kept token keeps its original position id, so rotary embeddings see the
same positions as in the dense model.

Generation then runs on the shorter cache: at the end of the prefill every layer's KV cache
(layers ``0..l`` are trimmed to the same tokens) holds only the kept tokens. The tokens that
follow need the positions they would have in the dense model (prompt length + t):
``generate`` in transformers 5.x passes ``position_ids`` itself (grown from the prefill's), so
that already holds; a caller that passes none gets them here (the language model's pre-hook
adds the number of dropped tokens to what the cache length alone would give). The decode
mask needs no change: every cached key is in the past of a new token.

How it hooks the model (all undone by ``handle.remove()``):
- the base model (``LlavaModel``): a pre-hook finds the image tokens and starts a prefill, a
  post-hook (always called) ends it and publishes ``kept_indices``;
- the language model: a pre-hook records the prefill's position ids, and on a step over a cache
  this handle pruned fills in ``position_ids`` / drops an all-ones 2D mask;
- layer ``l``'s attention module gets the ``"sparsekern_vlm_prune"`` implementation
  (``_attn_patch.swap_attention``); a forward hook on layer ``l`` gathers the kept tokens and
  trims the cache; pre-hooks on later layers pass them the kept tokens' mask and positions.

Limits: batch > 1 only without padding and with the same number of image tokens per example
(a 2D mask with zeros is refused); the prefill must start on an empty cache (images in a later
chunk are refused); transformers' default ``DynamicCache`` only; Llama text models only.
"""

from __future__ import annotations

import inspect
import math
import weakref

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import create_causal_mask
from transformers.utils import ModelOutput

from sparsekern.nn import _attn_patch
from sparsekern.nn._attn_patch import attention_with_scores, fallback_attention
from sparsekern.nn.kv_cache import _CACHE_ARGS, _bound_arg
from sparsekern.nn.token_pruning import TokenPruningHandle, _check_args

IMPL_NAME = "sparsekern_vlm_prune"


def _supported():
    """Base model classes whose forward merges image features then calls ``language_model``."""
    import transformers as t

    return (t.LlavaModel, t.LlavaNextModel)


def vlm_base(model) -> nn.Module | None:
    """The LLaVA-family base model inside ``model``, or None if ``model`` is not one."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, _supported()) else None


def _check_vlm(model: nn.Module, base: nn.Module, modality, score: str) -> int:
    """Checks specific to a decoder; returns the image token id."""
    from transformers import LlamaModel

    if modality not in (None, "image"):
        raise ValueError(
            f"modality: {type(model).__name__} prunes image tokens; expected 'image' (or None), got {modality!r}"
        )
    if score != "mean":
        raise ValueError(
            f"score: a decoder ranks image tokens by the mean attention they receive; expected 'mean', got {score!r}"
        )
    lm = base.language_model
    if not isinstance(lm, LlamaModel):
        raise TypeError(f"model: expected a LLaVA model with a Llama text model, got text model {type(lm).__name__}")
    image_id = getattr(base.config, "image_token_id", None)
    vocab = lm.get_input_embeddings().num_embeddings
    if isinstance(image_id, bool) or not isinstance(image_id, int) or not 0 <= image_id < vocab:
        raise ValueError(
            f"image_token_id: expected the model's config.image_token_id in [0, {vocab}), got {image_id!r}"
        )
    return image_id


class _Prefill:
    """What the current prefill has pruned (reset by the base model's hooks)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.active = False
        self.image: torch.Tensor | None = None  # bool [B, S]: image-token positions
        self.pos: torch.Tensor | None = None  # int64 [B, S]: position ids of the prefill
        self.scores: torch.Tensor | None = None  # fp32 [B, S] from the pruning layer
        self.layer_kwargs: dict | None = None  # mask / positions of the kept tokens, once pruned


def prune_vlm_tokens(model: nn.Module, base: nn.Module, keep, layers, modality, score: str) -> TokenPruningHandle:
    """:func:`sparsekern.prune_tokens` for a LLaVA-family model (see the module docstring)."""
    image_id = _check_vlm(model, base, modality, score)
    lm = base.language_model
    keep, layers = _check_args(keep, layers, len(lm.layers), score)
    if len(layers) != 1:
        raise ValueError(f"layers: expected one pruning layer for a decoder (FastV-style), got {layers}")
    if hasattr(base, "_sparsekern_token_pruning"):
        raise ValueError("model: token pruning is already applied; call .remove() on its handle first")

    _attn_patch.register(IMPL_NAME, _score_attention)
    handle = TokenPruningHandle(base, keep, layers, score, keep_cls=False)
    run = handle._run = _Prefill()
    # Caches this handle pruned -> tokens dropped; weak, so a finished generation frees its cache.
    handle._dropped = weakref.WeakKeyDictionary()
    base_sig, lm_sig = inspect.signature(base.forward), inspect.signature(lm.forward)
    (layer,) = layers

    def base_pre(module, args, kwargs):
        if module.training:
            raise RuntimeError("prune_tokens: the model is in training mode; call model.eval() (inference only)")
        run.reset()
        bound = base_sig.bind_partial(*args, **kwargs).arguments
        cache = next((c for c in (_bound_arg(bound, n) for n in _CACHE_ARGS) if c is not None), None)
        past = cache.get_seq_length() if cache is not None else 0
        if past:
            # A step after the prefill (decode): the language model's pre-hook handles a pruned
            # cache. An image token id here without images is embedded as text, as in the dense
            # model (a generated token may be that id), so only new images are refused.
            if _bound_arg(bound, "pixel_values") is not None or _bound_arg(bound, "mm_encoder_outputs"):
                raise ValueError(
                    f"pixel_values: images are pruned in the prefill on an empty cache; got images with a cache "
                    f"already holding {past} tokens"
                )
            return
        image = _image_mask(module, image_id, bound.get("input_ids"), bound.get("inputs_embeds"))
        if image is None:
            return
        n_image = image.sum(1)
        if not bool(n_image.any()):
            raise ValueError(
                f"image_token_id: expected image tokens (input_ids == config.image_token_id = {image_id}) "
                "in the prefill, got none"
            )
        if bool((n_image != n_image[0]).any()):
            raise ValueError(
                f"input_ids: expected the same number of image tokens in every example, got {n_image.tolist()}"
            )
        _check_prefill_mask(_bound_arg(bound, "attention_mask"))
        _check_cache(cache)
        run.active, run.image = True, image

    def base_post(module, args, kwargs, output):
        if run.active and isinstance(output, ModelOutput) and handle.kept_indices is not None:
            output["kept_indices"] = handle.kept_indices
            output["kept_attention_mask"] = handle.attention_mask
        run.reset()
        return output

    def lm_pre(module, args, kwargs):
        bound = lm_sig.bind_partial(*args, **kwargs).arguments
        tokens = _bound_arg(bound, "inputs_embeds")
        tokens = _bound_arg(bound, "input_ids") if tokens is None else tokens
        if tokens is None:
            return None  # the model's own check names the missing input
        b, s, device = tokens.shape[0], tokens.shape[1], tokens.device
        pos = _bound_arg(bound, "position_ids")
        if run.active:
            if pos is None:
                pos = torch.arange(s, device=device)
            if pos.dim() != 2 and pos.dim() != 1:
                raise ValueError(f"position_ids: expected shape [batch, seq], got {tuple(pos.shape)}")
            run.pos = pos.reshape(-1, s).expand(b, s)
            return None
        cache = next((c for c in (_bound_arg(bound, n) for n in _CACHE_ARGS) if c is not None), None)
        dropped = handle._dropped.get(cache) if cache is not None else None
        if dropped is None:
            return None
        updates = {}
        if pos is None:
            start = cache.get_seq_length() + dropped
            updates["position_ids"] = torch.arange(start, start + s, device=device)[None]
        mask = _bound_arg(bound, "attention_mask")
        if mask is not None and mask.dim() == 2:
            if not bool(mask.all()):
                raise ValueError("attention_mask: a pruned cache does not support padding (the 2D mask has zeros)")
            updates["attention_mask"] = None  # its length counts the dropped tokens; all ones = no mask
        return _with_updates(args, kwargs, lm_sig, updates) if updates else None

    def layer_post(module, args, kwargs, output):
        if not run.active or run.scores is None:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        idx = _kept_indices(run.scores, run.image, keep)
        run.scores = None
        hidden = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        cos, sin = kwargs["position_embeddings"]
        b = idx.shape[0]
        run.layer_kwargs = {
            # cache=None and no 2D mask: a plain causal mask over the kept tokens, which is right
            # because they stay in order (no padding, empty cache before the prefill).
            "attention_mask": create_causal_mask(
                config=lm.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=None
            ),
            "position_ids": run.pos.gather(1, idx),
            "position_embeddings": tuple(_gather_rows(t.expand(b, -1, -1), idx) for t in (cos, sin)),
        }
        cache = next((kwargs.get(n) for n in _CACHE_ARGS if kwargs.get(n) is not None), None)
        if cache is not None:
            for cached in cache.layers[: layer + 1]:
                cached.keys, cached.values = _gather_kv(cached.keys, idx), _gather_kv(cached.values, idx)
            handle._dropped[cache] = run.image.shape[1] - idx.shape[1]
        handle.kept_indices = idx
        handle.attention_mask = torch.ones_like(idx)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def later_pre(module, args, kwargs):
        if not (run.active and run.layer_kwargs):
            return None
        return args, {**kwargs, **run.layer_kwargs}

    handle._hooks.append(base.register_forward_pre_hook(base_pre, with_kwargs=True))
    handle._hooks.append(base.register_forward_hook(base_post, with_kwargs=True, always_call=True))
    handle._hooks.append(lm.register_forward_pre_hook(lm_pre, with_kwargs=True))
    attn = lm.layers[layer].self_attn
    attn._sparsekern_vlm_run = run
    handle._undo.append(_attn_patch.swap_attention(attn, IMPL_NAME))
    handle._undo.append(lambda: delattr(attn, "_sparsekern_vlm_run"))
    handle._undo.append(handle._dropped.clear)
    handle._hooks.append(lm.layers[layer].register_forward_hook(layer_post, with_kwargs=True))
    for later in list(lm.layers)[layer + 1 :]:
        handle._hooks.append(later.register_forward_pre_hook(later_pre, with_kwargs=True))
    base._sparsekern_token_pruning = handle
    return handle


def _image_mask(base: nn.Module, image_id: int, input_ids, inputs_embeds) -> torch.Tensor | None:
    """bool [B, S] of image-token positions, by the rule the model itself uses to place features."""
    if input_ids is not None:
        return input_ids == image_id
    if inputs_embeds is None:
        return None
    emb = base.get_input_embeddings()(torch.tensor(image_id, device=inputs_embeds.device))
    return (inputs_embeds == emb).all(-1)


def _check_prefill_mask(mask) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask: expected a 2D [batch, seq] mask, got {shape}")
    if not bool(mask.all()):
        raise ValueError(
            "attention_mask: image-token pruning in a decoder does not support padded batches (the mask has "
            "zeros); run the examples one at a time or unpadded"
        )


def _check_cache(cache) -> None:
    if cache is None:
        return
    kinds = {type(layer).__name__ for layer in getattr(cache, "layers", ())}
    if not hasattr(cache, "layers") or kinds - {DynamicLayer.__name__}:
        got = type(cache).__name__ + (f" with {sorted(kinds)} layers" if kinds else "")
        raise TypeError(
            f"cache: image-token pruning trims the cache; expected a DynamicCache of DynamicLayers, got {got}"
        )


def _kept_indices(scores: torch.Tensor, image: torch.Tensor, keep: float) -> torch.Tensor:
    """int64 [B, K], ascending: every text token + the top ceil(keep * n_image) image tokens."""
    b, s = image.shape
    n_image = int(image[0].sum())
    # ceil with a small guard so 0.25 * 576 counts as 144 even if the product rounds up.
    n_keep = max(1, math.ceil(keep * n_image - 1e-9))
    k = s - n_image + n_keep
    rank = scores.float().masked_fill(~image, float("inf"))  # text tokens always survive
    return rank.argsort(dim=1, descending=True, stable=True)[:, :k].sort(dim=1).values


def _gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


def _gather_kv(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Keep the positions ``idx [B, K]`` of a cached ``[B, Hkv, S, D]`` tensor."""
    return t.gather(2, idx[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))


def _with_updates(args: tuple, kwargs: dict, sig: inspect.Signature, updates: dict):
    """(args, kwargs) with the named arguments replaced, wherever the caller put them."""
    names = [p for p in sig.parameters if p != "self"]
    args = list(args)
    for name, value in updates.items():
        i = names.index(name) if name in names else len(args)
        if i < len(args):
            args[i] = value
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def _score_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF attention function of the pruning layer: sparsekern causal attention + key scores."""
    run = getattr(module, "_sparsekern_vlm_run", None)
    if run is None or not run.active or key.shape[2] != query.shape[2]:
        fn = fallback_attention(module)
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    group = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    out, scores = attention_with_scores(query, k, v, causal=True, scale=scaling)
    run.scores = scores.mean(1)  # [B, S]: mean over heads of the mean over queries
    return out.transpose(1, 2).contiguous(), None
