"""The dense fallback: ``F.linear`` with the decompressed weight, decompressed once per weight;
for ``pruned_attention``, torch's SDPA on the gathered keys.

This is what a swapped layer runs where no sparse kernel beats the dense layer it replaced by
``dispatch.MARGIN`` (5%), or, from ``dispatch.PREFILL_ROWS`` rows of x on, where every sparse
kernel is more than that slower: the same GEMM as ``nn.Linear``, so the layer is never more than
5% slower than dense (give or take the measurement noise). The measured chooser is its only intended caller; in the
``first`` order it comes after every sparse kernel.

Plans (:mod:`sparsekern.plan`) that pick this backend hold the copy themselves and call
``F.linear`` on it; ``sparsekern.plan.dense_copy_bytes`` counts what they hold.

Memory: the decompressed ``[out, K]`` copy (``out * K * dtype size`` bytes, e.g. 64 MiB for a
4096x4096 fp32 weight) is kept, weakly keyed on the weight's ``values`` / ``blocks`` tensor, only
for weights this backend actually ran on. When ``dense`` loses a measurement the dispatcher calls
:func:`release` and the copy is dropped, so dense copies exist only for shapes where dense won.
A copy is rebuilt when any of the weight's tensors is modified in place (``tensor._version``)
or replaced, and dies with the weight.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F

from sparsekern import dispatch, plan
from sparsekern.formats.bsr import bsr_to_dense, dequantize_blocks
from sparsekern.formats.nm import nm_to_dense
from sparsekern.formats.quant import dequantize
from sparsekern.reference import linear_a8

# id(key tensor) -> (weakref to it, stamp of every tensor the dense copy came from, dense copy)
_cache: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}
_lock = threading.Lock()


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter
        return None


def weight_stamp(*parts) -> tuple | None:
    """Identity, storage and version of each tensor (plus plain values); None when a version is
    unknown. The data pointer catches ``param.data = ...`` (what ``Module.to``/``.half()`` do),
    which keeps the Parameter object and its version counter."""
    out = []
    for p in parts:
        if isinstance(p, torch.Tensor):
            v = _version(p)
            if v is None:
                return None
            out.append((id(p), p.data_ptr(), p.dtype, v))
        else:
            out.append(p)
    return tuple(out)


def _cached(key: torch.Tensor, stamp: tuple | None, build) -> torch.Tensor:
    if stamp is None:  # cannot tell whether it changed: never reuse
        with torch.no_grad():
            return build()
    with _lock:
        hit = _cache.get(id(key))
        if hit is not None and hit[0]() is key and hit[1] == stamp:
            return hit[2]
    with torch.no_grad():
        dense = build()
    with _lock:
        fresh = id(key) not in _cache
        _cache[id(key)] = (weakref.ref(key), stamp, dense)
    if fresh:
        weakref.finalize(key, _drop, id(key), weakref.ref(key))
    return dense


def _drop(key_id: int, ref: weakref.ref | None = None) -> None:
    with _lock:
        hit = _cache.get(key_id)
        # Only drop the entry that belongs to this (dead or released) tensor, not a later one
        # that reused the id.
        if hit is not None and (ref is None or hit[0] is ref or hit[0]() is None):
            del _cache[key_id]


def cached_bytes() -> int:
    """Bytes held by dense copies right now (reported by the benchmark)."""
    with _lock:
        return sum(d.numel() * d.element_size() for _, _, d in _cache.values())


def nm_weight(values, meta, n: int, m: int, scales=None, zeros=None, fp32: bool = False) -> torch.Tensor:
    """The dense ``[out, K]`` copy of an N:M weight (dequantized when quantized, in fp32 with
    ``fp32``), from the cache when it is still current."""

    def build():
        if scales is None:
            return nm_to_dense(values, meta, n, m)
        return nm_to_dense(dequantize(values, scales.float() if fp32 else scales, zeros), meta, n, m)

    return _cached(values, weight_stamp(values, meta, n, m, scales, zeros, fp32), build)


def bsr_weight(crow, col, blocks, k: int, scales=None, zeros=None) -> torch.Tensor:
    """The dense ``[out, k]`` copy of a BSR weight (dequantized when quantized), from the cache
    when it is still current."""

    def build():
        w = blocks if scales is None else dequantize_blocks(blocks, scales, zeros)
        return bsr_to_dense(crow, col, w, k)

    return _cached(blocks, weight_stamp(blocks, crow, col, k, scales, zeros), build)


def nm_linear(x, values, meta, n: int, m: int, bias=None, scales=None, zeros=None, group_size=0, act_block=0):
    if act_block:  # int8 activations: the reference's product, on the cached fp32 weight
        return linear_a8(x, nm_weight(values, meta, n, m, scales, zeros, fp32=True), bias, act_block)
    return F.linear(x, nm_weight(values, meta, n, m, scales, zeros), bias)


def bsr_linear(x, crow, col, blocks, bias=None, scales=None, zeros=None):
    return F.linear(x, bsr_weight(crow, col, blocks, x.shape[-1], scales, zeros), bias)


def _plan_nm(x, values, meta, n: int, m: int, bias=None, scales=None, zeros=None, group_size=0, act_block=0):
    # The copy lives in the plan (and in the cache above while this backend holds the choice).
    if act_block:
        return nm_linear, (nm_weight(values, meta, n, m, scales, zeros, fp32=True),)
    w = nm_weight(values, meta, n, m, scales, zeros)
    return (lambda x, values, meta, n, m, bias=None, *quant: F.linear(x, w, bias)), (w,)


def _plan_bsr(x, crow, col, blocks, bias=None, scales=None, zeros=None):
    w = bsr_weight(crow, col, blocks, x.shape[-1], scales, zeros)
    return (lambda x, crow, col, blocks, bias=None, *quant: F.linear(x, w, bias)), (w,)


def _release_nm(x, values, *rest) -> None:
    _drop(id(values))


def _release_bsr(x, crow, col, blocks, *rest) -> None:
    _drop(id(blocks))


def pruned_attention(q, k, v, keep_idx, causal: bool = False, scale=None):
    """torch's own attention on the kept keys: gather them, then ``F.scaled_dot_product_attention``
    (flash / memory-efficient kernels on a GPU). What a user writes without sparsekern, and the
    yardstick a sparse attention kernel must beat by ``dispatch.MARGIN``. Causal masks go in as a
    boolean ``attn_mask``; a query that sees no kept key gets a zero row, as the op's contract says
    (SDPA would give NaN there)."""
    idx = keep_idx.unsqueeze(-1).expand(-1, -1, -1, q.shape[-1])
    kk, vv = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
    if not causal:
        return F.scaled_dot_product_attention(q, kk, vv, scale=scale)
    qpos = torch.arange(q.shape[2], device=q.device).view(1, 1, -1, 1) + (k.shape[2] - q.shape[2])
    seen = keep_idx.unsqueeze(-2) <= qpos  # [B, H, Sq, kept]
    out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=seen, scale=scale)
    return out.masked_fill(~seen.any(-1, keepdim=True), 0.0)


dispatch.register("nm_linear", "dense", nm_linear, release=_release_nm, nonfinite_exact=True)
plan.register_hook("nm_linear", "dense", _plan_nm)
dispatch.register("bsr_linear", "dense", bsr_linear, release=_release_bsr, nonfinite_exact=True)
plan.register_hook("bsr_linear", "dense", _plan_bsr)
dispatch.register("pruned_attention", "dense", pruned_attention, nonfinite_exact=True)
