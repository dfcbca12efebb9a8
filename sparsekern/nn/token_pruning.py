"""Encoder token pruning for HF BERT-family and ViT-family models: ``sparsekern.prune_tokens``.

Supported: BERT, RoBERTa, DistilBERT (text); ViT, DeiT, ViT-MSN, DINOv2, DINOv2 with registers
(images), and task models built on them. The special leading tokens -- CLS, DeiT's distillation
token, DINOv2's register tokens -- are kept (``keep_cls``), never ranked against the patches.

After each chosen layer, every token gets an importance score from that layer's own attention
(the mean attention it receives, averaged over heads; or the attention the CLS token pays it),
the top ``keep`` fraction of tokens survive in their original order, and later layers run on
fewer tokens. The pruning layer's attention runs through ``sparsekern.ops`` (``pruned_attention``
over all keys plus ``token_scores`` on the same q/k), so no eager ``[S, S]`` weights are built.

How it hooks the model (all undone by ``handle.remove()``):
- the pruning layer's attention module gets the ``"sparsekern_token_prune"`` implementation
  (see ``_attn_patch.swap_attention``); it records the scores for its layer;
- a forward hook on the pruning layer gathers the hidden states of the kept tokens;
- forward pre-hooks on later layers swap in the attention mask of the kept tokens, built by
  the model's own ``create_bidirectional_mask`` (so eager/sdpa/flash mask formats all work);
- hooks on the base model read the 2D padding mask and publish the kept indices.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import ModelOutput

from sparsekern import ops
from sparsekern.nn import _attn_patch
from sparsekern.nn._attn_patch import attention_with_scores, fallback_attention

IMPL_NAME = "sparsekern_token_prune"
SCORES = ("mean", "cls")
MODALITIES = ("text", "image")


def _supported():
    """(base model class, layers of a base model, attention module of a layer, modality) rows.

    Each listed model's layers call ``layer(hidden, attention_mask)`` and its attention module
    calls the HF attention interface with no extra bias; a model is added only once tested.
    """
    import transformers as t

    encoder_layer, layers = (lambda m: m.encoder.layer), (lambda m: m.layers)
    return (
        (t.BertModel, encoder_layer, lambda layer: layer.attention.self, "text"),
        (t.RobertaModel, encoder_layer, lambda layer: layer.attention.self, "text"),
        (t.DistilBertModel, lambda m: m.transformer.layer, lambda layer: layer.attention, "text"),
        (t.ViTModel, layers, lambda layer: layer.attention, "image"),
        (t.DeiTModel, layers, lambda layer: layer.attention, "image"),
        (t.ViTMSNModel, layers, lambda layer: layer.attention, "image"),
        (t.Dinov2Model, encoder_layer, lambda layer: layer.attention, "image"),
        (t.Dinov2WithRegistersModel, encoder_layer, lambda layer: layer.attention, "image"),
    )


def special_tokens(base: nn.Module) -> int:
    """How many leading tokens are special: CLS, plus DeiT's distillation token and register tokens."""
    emb = getattr(base, "embeddings", None)
    n = 1
    if isinstance(getattr(emb, "distillation_token", None), torch.Tensor):
        n += 1
    registers = getattr(emb, "register_tokens", None)
    if isinstance(registers, torch.Tensor):
        n += registers.shape[1]
    return n


def _resolve(model, modality):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    base = getattr(model, "base_model", model)
    for cls, layers_of, attention_of, kind in _supported():
        if isinstance(base, cls):
            if getattr(base.config, "is_decoder", False):
                raise ValueError("model: token pruning needs an encoder; got a model with config.is_decoder=True")
            if modality not in (None, kind):
                raise ValueError(
                    f"modality: {type(model).__name__} holds {kind} tokens; expected {kind!r} (or None), got {modality!r}"
                )
            return base, layers_of(base), attention_of
    names = ", ".join(row[0].__name__ for row in _supported())
    raise TypeError(
        f"model: expected one of {names}, LlavaModel, LlavaNextModel (or a model built on one), got {type(model).__name__}"
    )


def _check_modality(modality) -> None:
    if modality is not None and not isinstance(modality, str):
        raise TypeError(f"modality: expected one of {MODALITIES} or None, got {type(modality).__name__}")
    if modality is not None and modality not in MODALITIES:
        raise ValueError(f"modality: expected one of {MODALITIES} or None, got {modality!r}")


def _check_args(keep, layers, n_layers: int, score: str) -> tuple[float, tuple[int, ...]]:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep: expected a float in (0, 1], got {type(keep).__name__}")
    if not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"keep: expected a fraction in (0, 1], got {keep}")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    if not isinstance(layers, Iterable):
        raise TypeError(f"layers: expected an int or a sequence of ints, got {type(layers).__name__}")
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers: expected at least one layer index, got an empty sequence")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layers: expected int layer indices, got {i!r} ({type(i).__name__})")
        if not 0 <= i < n_layers:
            raise ValueError(f"layers: expected indices in 0..{n_layers - 1} (the model has {n_layers}), got {i}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers: expected distinct indices, got {layers}")
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
    return float(keep), tuple(sorted(layers))


class _Run:
    """What one forward pass has pruned so far (reset by the base model's hooks)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.active = False
        self.valid: torch.Tensor | None = None  # bool [B, S] of the current tokens, None = all valid
        self.orig_pos: torch.Tensor | None = None  # int64 [B, S]: original position, -1 = padding slot
        self.mask = None  # model-format mask of the current tokens, once a layer pruned
        self.pruned = False


class TokenPruningHandle:
    """Returned by :func:`prune_tokens`. ``remove()`` (or leaving the ``with`` block) undoes it.

    After each forward: ``kept_indices`` (int64 ``[B, K]``, original token positions of the
    rows of ``last_hidden_state``, ``-1`` where a row is padding) and ``attention_mask`` (int64
    ``[B, K]``, 1 for a real kept token). The base model's output carries the same tensors as
    ``kept_indices`` and ``kept_attention_mask``.
    """

    def __init__(self, base: nn.Module, keep: float, layers: tuple[int, ...], score: str, keep_cls: bool):
        self.keep, self.layers, self.score, self.keep_cls = keep, layers, score, keep_cls
        self.special = special_tokens(base) if keep_cls else 0  # leading tokens never pruned
        self.kept_indices: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self._base = base
        self._run = _Run()
        self._hooks: list = []
        self._undo: list = []

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        for undo in self._undo:
            undo()
        self._hooks, self._undo = [], []
        if getattr(self._base, "_sparsekern_token_pruning", None) is self:
            del self._base._sparsekern_token_pruning

    def __enter__(self) -> TokenPruningHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def prune_tokens(
    model: nn.Module,
    keep: float = 0.5,
    layers: int | Iterable[int] = (2,),
    *,
    score: str = "mean",
    keep_cls: bool = True,
    modality: str | None = None,
) -> TokenPruningHandle:
    """Prune tokens inside an HF encoder (BERT, RoBERTa, DistilBERT, ViT, DeiT, ViT-MSN, DINOv2 and
    models built on them), or the image tokens inside a LLaVA decoder.

    ``modality``: ``"text"`` or ``"image"``, the tokens the model holds (checked), or None for the
    model's own. LLaVA / LLaVA-NeXT (``modality="image"``, one layer index into the language
    model's layers, ``score="mean"``): see ``token_pruning_vlm.py``; the rest of this docstring
    is about encoders.

    After each layer index in ``layers`` (0-based; "after layer 2" = the output of
    ``encoder.layer[2]``), keep ``ceil(keep * n_valid)`` tokens per example, where ``n_valid``
    counts the non-padding tokens present at that point (several layers compound). Tokens are
    ranked by ``score``: ``"mean"`` = mean attention received over that layer's (non-padding)
    queries, averaged over heads (``ops.token_scores``); ``"cls"`` = attention from the first
    token (``cls_only=True``). The first non-padding token (CLS) is always kept when
    ``keep_cls``, and with it the other special leading tokens (DeiT's distillation token,
    DINOv2's registers): at least that many tokens survive; padding is never kept; kept tokens
    stay in their original order.

    Outputs: ``last_hidden_state`` has ``K = max kept`` rows per example, the kept tokens of
    each example first-to-last followed by padding rows where an example kept fewer (mask them
    with ``handle.attention_mask`` / ``output.kept_attention_mask``; mean pooling with that mask
    averages over the kept tokens). CLS stays at row 0, so CLS poolers are unchanged. Inference
    only (the model must be in ``eval()`` mode). Modifies ``model`` in place until
    ``handle.remove()``.
    """
    from sparsekern.nn import token_pruning_vlm  # imports this module: loaded on first use

    _check_modality(modality)
    vlm = token_pruning_vlm.vlm_base(model) if isinstance(model, nn.Module) else None
    if vlm is not None:
        return token_pruning_vlm.prune_vlm_tokens(model, vlm, keep, layers, modality, score)
    base, layer_list, attention_of = _resolve(model, modality)
    keep, layers = _check_args(keep, layers, len(layer_list), score)
    if hasattr(base, "_sparsekern_token_pruning"):
        raise ValueError("model: token pruning is already applied; call .remove() on its handle first")

    _attn_patch.register(IMPL_NAME, _prune_layer_attention)
    handle = TokenPruningHandle(base, keep, layers, score, bool(keep_cls))
    run = handle._run
    sig = inspect.signature(base.forward)

    def base_pre(module, args, kwargs):
        if module.training:
            raise RuntimeError("prune_tokens: the model is in training mode; call model.eval() (inference only)")
        mask = sig.bind_partial(*args, **kwargs).arguments.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"attention_mask: expected a 2D [batch, seq] padding mask, got shape {tuple(mask.shape)}")
        run.reset()
        run.active = True
        run.valid = None if mask is None else mask.to(torch.bool)

    def base_post(module, args, kwargs, output):
        handle.kept_indices = run.orig_pos
        handle.attention_mask = None if run.orig_pos is None else (run.orig_pos >= 0).long()
        run.active = False
        if isinstance(output, ModelOutput) and handle.kept_indices is not None:
            output["kept_indices"] = handle.kept_indices
            output["kept_attention_mask"] = handle.attention_mask
        return output

    handle._hooks.append(base.register_forward_pre_hook(base_pre, with_kwargs=True))
    handle._hooks.append(base.register_forward_hook(base_post, with_kwargs=True))
    for i in layers:
        attn = attention_of(layer_list[i])
        attn._sparsekern_prune = _LayerState(run, score)
        handle._undo.append(_attn_patch.swap_attention(attn, IMPL_NAME))
        handle._undo.append(lambda a=attn: delattr(a, "_sparsekern_prune"))
        hook = _make_prune_hook(handle, attn._sparsekern_prune, base.config)
        handle._hooks.append(layer_list[i].register_forward_hook(hook))
    for layer in list(layer_list)[layers[0] + 1 :]:
        handle._hooks.append(layer.register_forward_pre_hook(_make_mask_hook(run), with_kwargs=True))
    base._sparsekern_token_pruning = handle
    return handle


class _LayerState:
    def __init__(self, run: _Run, score: str):
        self.run, self.score = run, score
        self.scores: torch.Tensor | None = None  # fp32 [B, S], -inf at padding


def _prune_layer_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF attention function of a pruning layer: sparsekern attention + token scores."""
    state = getattr(module, "_sparsekern_prune", None)
    if state is None or not state.run.active:  # called outside a hooked model forward
        fn = fallback_attention(module)
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    b, h, s, _ = query.shape
    valid = state.run.valid
    if valid is not None and tuple(valid.shape) != (b, s):
        raise ValueError(f"attention_mask: expected shape {(b, s)} to match the tokens, got {tuple(valid.shape)}")
    cls_only = state.score == "cls"
    if valid is None or bool(valid.all()):
        out, scores = attention_with_scores(query, key, value, causal=False, scale=scaling, cls_only=cls_only)
        state.scores = scores.mean(1)
    else:
        # Padding: keys that are padding must get no attention and no score, and queries that
        # are padding must not vote. pruned_attention needs one key count per call, so each
        # example runs with its own valid keys (no K/V copy: keep_idx indexes in place).
        # NOTE: a per-example loop; B small calls cost ~B x launch overhead, negligible next to
        # the layer's GEMMs at the batch sizes an encoder sees (8 x 256 tokens on MiniLM).
        out = torch.empty_like(query)
        state.scores = torch.full((b, s), float("-inf"), dtype=torch.float32, device=query.device)
        for i in range(b):
            idx = valid[i].nonzero().squeeze(1)
            keep_idx = idx.expand(1, h, idx.numel()).contiguous()
            out[i : i + 1] = ops.pruned_attention(
                query[i : i + 1], key[i : i + 1], value[i : i + 1], keep_idx, False, scaling
            )
            qv, kv = query[i : i + 1, :, idx], key[i : i + 1, :, idx]
            state.scores[i, idx] = ops.token_scores(qv, kv, False, scaling, cls_only)[0].mean(0)
    return out.transpose(1, 2).contiguous(), None


def _make_prune_hook(handle: TokenPruningHandle, state: _LayerState, config):
    run = state.run

    def hook(module, args, output):
        if not run.active or state.scores is None:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        scores, state.scores = state.scores, None
        b, s = scores.shape
        pos = torch.arange(s, device=hidden.device)
        valid = run.valid if run.valid is not None else torch.ones(b, s, dtype=torch.bool, device=hidden.device)
        if run.orig_pos is None:
            run.orig_pos = pos.expand(b, s)
        n_valid = valid.sum(1)
        # ceil(keep * n) with a small guard so 0.3 * 10 counts as 3, not ceil(3.0000000000000004).
        n_keep = torch.ceil(n_valid.double() * handle.keep - 1e-9).long().clamp(min=1)
        if handle.special:
            # Special tokens lead the valid tokens (after a prune too: kept rows come first, in order).
            first_valid = valid.to(torch.int8).argmax(1)
            special = (first_valid[:, None] + torch.arange(handle.special, device=pos.device)).clamp(max=s - 1)
            scores = scores.scatter(1, special, float("inf"))
            n_keep = torch.maximum(n_keep, n_valid.clamp(max=handle.special))
        order = scores.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, pos.expand(b, s).contiguous())
        kept = (rank < n_keep[:, None]) & valid
        k_max = int(n_keep.max())
        # Kept positions in original order first, then fillers (positions + s) for padding slots.
        slot = torch.where(kept, pos, pos + s).sort(dim=1).values[:, :k_max]
        new_valid = slot < s
        idx = torch.where(new_valid, slot, slot - s)
        hidden = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        run.orig_pos = torch.where(new_valid, run.orig_pos.gather(1, idx), -1)
        run.valid = new_valid
        run.mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=new_valid)
        run.pruned = True
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def _make_mask_hook(run: _Run):
    def hook(module, args, kwargs):
        if not (run.active and run.pruned):
            return None
        if len(args) > 1:
            args = (args[0], run.mask, *args[2:])
        else:
            kwargs["attention_mask"] = run.mask
        return args, kwargs

    return hook


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the rows of ``last_hidden_state [B, S, H]`` where ``attention_mask [B, S]`` is 1."""
    m = attention_mask.to(last_hidden_state.dtype).unsqueeze(-1)
    return (last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)
