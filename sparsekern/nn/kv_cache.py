"""H2O-style KV-cache eviction for HF decoder models during ``model.generate``.

Design. ``H2OCache`` is a ``transformers.Cache`` whose layers (``H2OLayer``) hold at most
``budget`` tokens per (batch, KV head) after every forward: the ``recent`` newest tokens plus
the ``budget - recent`` older tokens with the largest accumulated attention ("heavy hitters",
Zhang et al. 2023). The scores come from the attention computation itself: the model's
attention modules are pointed (per module, see ``_attn_patch.swap_attention``) at
``_h2o_attention``, which runs ``ops.pruned_attention`` over the cached keys and
``ops.token_scores`` on the same q/k, adds the attention mass each cached key received this
step to its running sum, and then evicts. So the current step attends to at most ``budget``
cached tokens plus the new ones (as in H2O), and the stored cache is back within budget before
the next layer or step. Keys are stored after RoPE, so evicting never changes positions;
``get_seq_length`` reports the number of tokens seen (positions keep counting), while
``get_mask_sizes`` reports what is stored (the mask of the attention that actually runs).

For a model whose forward is called with any other cache (or none), the patched modules fall
back to the model's own attention implementation, so ``enable_kv_eviction`` is harmless to
leave on; ``disable_kv_eviction(model)`` restores the modules exactly.

Limits: no padded batches (a 2D attention mask with zeros is refused: with per-example
padding the kept slots would differ per example); grouped-query attention is supported (scores
are averaged over the query heads that share a KV head).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from sparsekern.nn import _attn_patch
from sparsekern.nn._attn_patch import attention_with_scores, fallback_attention

IMPL_NAME = "sparsekern_h2o"


class H2OLayer(DynamicLayer):
    """One layer's cache: heavy hitters by accumulated attention + a window of recent tokens."""

    is_croppable = False

    def __init__(self, budget: int, recent: int):
        super().__init__()
        self.budget, self.recent = budget, recent
        self.cumulative_length = 0
        self.scores: torch.Tensor | None = None  # fp32 [B, Hkv, n]: attention mass received so far
        self.positions: torch.Tensor | None = None  # int64 [B, Hkv, n]: absolute position of each entry

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            b, h = key_states.shape[:2]
            self.scores = key_states.new_zeros((b, h, 0), dtype=torch.float32)
            self.positions = torch.zeros((b, h, 0), dtype=torch.long, device=key_states.device)
        b, h, n_new = key_states.shape[:3]
        new_pos = torch.arange(self.cumulative_length, self.cumulative_length + n_new, device=key_states.device)
        self.positions = torch.cat([self.positions, new_pos.expand(b, h, n_new)], dim=-1)
        self.scores = torch.cat([self.scores, self.scores.new_zeros((b, h, n_new))], dim=-1)
        self.cumulative_length += n_new
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def accumulate(self, scores: torch.Tensor) -> None:
        """Add ``scores`` (fp32 ``[B, Hkv, n]``: attention mass each stored key just received)."""
        if self.scores is None or scores.shape != self.scores.shape:
            raise ValueError(f"scores: expected shape {tuple(self.scores.shape)}, got {tuple(scores.shape)}")
        self.scores += scores

    def evict(self) -> None:
        """Shrink to ``budget`` entries: the ``recent`` newest + the top-scored older ones."""
        n = self.keys.shape[-2]
        if n <= self.budget:
            return
        b, h = self.keys.shape[:2]
        older = n - self.recent
        heavy = self.scores[..., :older].topk(self.budget - self.recent, dim=-1).indices.sort(dim=-1).values
        recent = torch.arange(older, n, device=heavy.device).expand(b, h, self.recent)
        idx = torch.cat([heavy, recent], dim=-1)  # ascending: the newest tokens stay at the end
        kv_idx = idx[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, kv_idx)
        self.values = self.values.gather(2, kv_idx)
        self.scores = self.scores.gather(2, idx)
        self.positions = self.positions.gather(2, idx)

    def get_seq_length(self) -> int:
        return self.cumulative_length  # tokens seen: generate derives positions from this

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers before ~5.2 pass cache_position
            query_length = query_length.shape[0]
        stored = 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]
        return stored + query_length, 0

    def get_max_length(self) -> int:
        return self.budget

    def reset(self) -> None:
        super().reset()
        self.scores = self.positions = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("H2OLayer: cropping an evicting cache is not supported")

    def _select_batch(self, fn) -> None:
        if self.get_seq_length() > 0:
            self.keys, self.values = fn(self.keys), fn(self.values)
            self.scores, self.positions = fn(self.scores), fn(self.positions)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(lambda t: t[indices, ...])


class H2OCache(Cache):
    """KV cache with H2O eviction, for ``model.generate(..., past_key_values=H2OCache(model, ...))``.

    ``budget``: tokens kept per layer and KV head after every forward; ``recent``: how many of
    them are the newest tokens (default ``budget // 4``, at least 1). Constructing one calls
    :func:`enable_kv_eviction` on ``model`` (idempotent). See the module docstring.
    """

    def __init__(self, model: nn.Module, budget: int, recent: int | None = None):
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise TypeError(f"budget: expected an int number of tokens, got {type(budget).__name__}")
        if budget < 2:
            raise ValueError(f"budget: expected at least 2 tokens (1 recent + 1 heavy hitter), got {budget}")
        recent = max(1, budget // 4) if recent is None else recent
        if isinstance(recent, bool) or not isinstance(recent, int):
            raise TypeError(f"recent: expected an int number of tokens, got {type(recent).__name__}")
        if not 1 <= recent < budget:
            raise ValueError(f"recent: expected 1 <= recent < budget={budget}, got {recent}")
        enable_kv_eviction(model)
        n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[H2OLayer(budget, recent) for _ in range(n_layers)])
        self.budget, self.recent = budget, recent


def _decoder_parts(model: nn.Module):
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(blk, "self_attn") for blk in layers):
        raise TypeError(
            f"model: expected an HF decoder whose base model has .layers[i].self_attn (Llama family), "
            f"got {type(model).__name__}"
        )
    return base, [layer.self_attn for layer in layers]


def enable_kv_eviction(model: nn.Module) -> None:
    """Route ``model``'s self-attention through sparsekern so an ``H2OCache`` sees the scores."""
    base, attns = _decoder_parts(model)
    if getattr(base, "_sparsekern_kv_enabled", False):
        return
    _attn_patch.register(IMPL_NAME, _h2o_attention)
    for a in attns:
        _attn_patch.swap_attention(a, IMPL_NAME)
        a._sparsekern_kv_cache = None
    # Module-level hook functions that reach the attention modules through their `module`
    # argument: a deep copy of the model then drives its own modules, never the original's.
    base.register_forward_pre_hook(_kv_pre_hook, with_kwargs=True)
    base.register_forward_hook(_kv_post_hook)
    base._sparsekern_kv_enabled = True


def disable_kv_eviction(model: nn.Module) -> None:
    """Undo :func:`enable_kv_eviction` (no-op if it was not enabled)."""
    base, attns = _decoder_parts(model)
    if not getattr(base, "_sparsekern_kv_enabled", False):
        return
    for hooks, extra in (
        (base._forward_pre_hooks, (base._forward_pre_hooks_with_kwargs,)),
        (base._forward_hooks, (base._forward_hooks_with_kwargs, base._forward_hooks_always_called)),
    ):
        for key in [k for k, fn in hooks.items() if fn in (_kv_pre_hook, _kv_post_hook)]:
            del hooks[key]
            for d in extra:
                d.pop(key, None)
    for a in attns:
        _attn_patch.restore_attention(a)
        a.__dict__.pop("_sparsekern_kv_cache", None)
    del base._sparsekern_kv_enabled


# transformers 5.x names the cache argument ``cache`` (``past_key_values`` is a deprecated alias,
# renamed by a decorator around forward); 4.x calls it ``past_key_values``. Either may arrive
# bound to its own parameter or inside the forward's ``**kwargs``.
_CACHE_ARGS = ("cache", "past_key_values")


def _bound_arg(bound: dict, name: str):
    value = bound.get(name)
    extra = bound.get("kwargs")
    return extra.get(name) if value is None and isinstance(extra, dict) else value


def _kv_pre_hook(module, args, kwargs):
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    cache = next((c for c in (_bound_arg(bound, n) for n in _CACHE_ARGS) if c is not None), None)
    cache = cache if isinstance(cache, H2OCache) else None
    mask = _bound_arg(bound, "attention_mask")
    if cache is not None and mask is not None:
        if mask.dim() != 2:
            raise ValueError(f"attention_mask: H2OCache expects a 2D mask, got shape {tuple(mask.shape)}")
        if not bool(mask.all()):
            raise ValueError("attention_mask: H2OCache does not support padded batches (the mask has zeros)")
    for layer in module.layers:
        layer.self_attn._sparsekern_kv_cache = cache


def _kv_post_hook(module, args, output):
    for layer in module.layers:
        layer.self_attn._sparsekern_kv_cache = None


def _h2o_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF attention function: sparsekern attention over the cache, then score + evict."""
    cache = getattr(module, "_sparsekern_kv_cache", None)
    if cache is None:
        fn = fallback_attention(module)
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    b, h, sq, d = query.shape
    h_kv, sk = key.shape[1], key.shape[2]
    group = h // h_kv
    if sq == 1:
        # Decode: every cached key is in the past, so no causal mask, and the `group` query heads
        # sharing a KV head become `group` query rows of that head (no K/V repeat).
        q = query.reshape(b, h_kv, group, d)
        out, scores = attention_with_scores(q, key, value, causal=False, scale=scaling)
        out = out.reshape(b, h, 1, d)
        # token_scores averages over the group's rows = the mean over the heads of the group,
        # which is the per-KV-head mass this one query step adds (H2O sums over steps).
        mass = scores
    else:
        # Prefill (or a chunk): causal over the stored keys (the new ones are the last sq).
        k = key.repeat_interleave(group, dim=1)
        v = value.repeat_interleave(group, dim=1)
        out, scores = attention_with_scores(query, k, v, causal=True, scale=scaling)
        mass = (scores * sq).view(b, h_kv, group, sk).mean(2)
    layer = cache.layers[module.layer_idx]
    layer.accumulate(mass)
    layer.evict()
    return out.transpose(1, 2).contiguous(), None
