"""``sk.generate``: greedy decoding of an HF Llama-family causal LM through the lean decode step.

Prefill runs through the HF model itself (one call per prompt, so exactly what ``model.generate``
computes); its cache is copied into static K/V buffers and every further token runs
:meth:`LeanDecoder.step` (or the same step in one C++ call, :mod:`sparsekern.lean.native`) under
``torch.inference_mode()``. The decoder (stacked q/k/v and
gate/up weights, rope tables) is built on the first call and kept for the model until its
weights change (a swapped module, a ``.to()``, an in-place edit: all checked on every call).
"""

from __future__ import annotations

import weakref
from itertools import chain

import torch
from torch import nn

from sparsekern.hugepages import rehome_module
from sparsekern.lean.decoder import LeanDecoder, check_model

# Keyword arguments of model.generate that sk.generate accepts, with the one value that is greedy.
_GREEDY = {"do_sample": False, "num_beams": 1, "use_cache": True}
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Default of eos_token_id / pad_token_id: the model's generation config (None means none, as in HF).
_CONFIG = object()


def _stamp(model: nn.Module) -> tuple:
    """Identity of every module and tensor of ``model`` (what the decoder's copies came from)."""
    tensors = chain(model.parameters(), model.buffers())
    return tuple(id(m) for m in model.modules()), tuple(
        (id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in tensors
    )


def decoder_for(model: nn.Module) -> LeanDecoder:
    """The model's :class:`LeanDecoder`, rebuilt when any of its modules or weights changed. Before
    a build the model's weights move to huge pages (:mod:`sparsekern.hugepages`; values unchanged),
    so the stamp the decoder is kept under is that of the moved weights."""
    stamp = _stamp(model)
    held = _DECODERS.get(model)
    if held is None or held[0] != stamp:
        rehome_module(model)
        stamp = _stamp(model)
        with torch.no_grad():
            held = _DECODERS[model] = (stamp, LeanDecoder(model))
    return held[1]


def _token_ids(name: str, value, vocab: int) -> list[int]:
    ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"{name}: expected an int or a list of ints, got {value!r}")
    if any(not 0 <= i < vocab for i in ids):
        raise ValueError(f"{name}: expected token ids in [0, {vocab}), got {value!r}")
    return list(ids)


def _check_args(model, input_ids, max_new_tokens, attention_mask, kwargs) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an HF causal LM (torch.nn.Module), got {type(model).__name__}")
    for name, value in kwargs.items():
        if name not in _GREEDY or (value is not None and value != _GREEDY[name]):
            raise ValueError(
                f"{name}: sk.generate decodes greedily (one sequence per prompt, argmax, no logits "
                f"processors), got {name}={value!r}; use model.generate for sampling, beams and the rest"
            )
    if model.training:
        raise ValueError(
            "model: expected eval mode (the lean step has no dropout), got training mode; call model.eval()"
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids: expected an int64 or int32 tensor, got {got}")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids: expected a non-empty [batch, length] tensor, got shape {tuple(input_ids.shape)}")
    vocab = model.get_input_embeddings().weight.shape[0]
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"input_ids: expected token ids in [0, {vocab}), got values in [{lo}, {hi}]")
    device = model.get_input_embeddings().weight.device
    if input_ids.device != device:
        raise ValueError(f"input_ids: expected device {device} (the model's), got {input_ids.device}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            raise ValueError(f"attention_mask: expected None or shape {tuple(input_ids.shape)}, got {got}")
        if not bool((attention_mask == 1).all()):
            raise ValueError(
                "attention_mask: padded batches are not supported by the lean decode path (every prompt must "
                "have the same length, mask all ones); use model.generate or one prompt per call"
            )


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 20,
    eos_token_id: int | list[int] | None = _CONFIG,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = _CONFIG,
    **kwargs,
) -> torch.Tensor:
    """Greedy decoding, token for token what ``model.generate(input_ids, do_sample=False, ...)``
    returns (fp32; in bf16/fp16 the two may round differently), with less work per token.

    - ``model``: an HF Llama, Qwen2 or Mistral causal LM in eval mode, dense or with
      :class:`~sparsekern.SparseLinear` layers (``sk.sparsify``).
    - ``input_ids``: ``[batch, length]``; every row the same length (no padding).
    - ``eos_token_id``: stop a row at these tokens (default: the model's generation config;
      ``None``: never stop early). Finished rows are filled with ``pad_token_id`` (default: the
      generation config's, else the first eos) until every row is done, as ``model.generate`` does.
    - ``attention_mask``: ``None`` or all ones.

    Returns ``[batch, length + generated]`` int64 token ids, prompt included. Sampling, beams,
    padded batches, logits processors (repetition penalty, ...) are refused or not applied: this
    is plain argmax decoding; ``model.generate`` covers the rest.
    """
    _check_args(model, input_ids, max_new_tokens, attention_mask, kwargs)
    batch, length = input_ids.shape
    total = length + max_new_tokens
    check_model(model, total)
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = getattr(model, "generation_config", None)
    if eos_token_id is _CONFIG:
        eos_token_id = getattr(gen, "eos_token_id", None)
    eos = [] if eos_token_id is None else _token_ids("eos_token_id", eos_token_id, vocab)
    if pad_token_id is _CONFIG:
        pad_token_id = getattr(gen, "pad_token_id", None)
    pad = eos[0] if pad_token_id is None and eos else pad_token_id
    if eos:
        pad = _token_ids("pad_token_id", pad, vocab)[0]
    dec = decoder_for(model)

    out = input_ids.new_empty((batch, total), dtype=torch.int64)
    out[:, :length] = input_ids
    eos_ids = torch.tensor(eos, dtype=torch.int64, device=input_ids.device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    end = total
    with torch.inference_mode():
        pre = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
        cache = getattr(pre, "cache", None) or pre.past_key_values
        kv = dec.start(cache, batch, length, total)
        step = dec.stepper(batch)
        token = pre.logits[:, -1].argmax(-1)
        del pre, cache
        for pos in range(length, total):
            if eos:
                token = torch.where(unfinished, token, pad)
            out[:, pos] = token
            if eos:
                unfinished &= ~torch.isin(token, eos_ids)
                if not bool(unfinished.any()):
                    end = pos + 1
                    break
            if pos + 1 < total:
                token = step(token, pos, kv).argmax(-1)
    return out[:, :end]
