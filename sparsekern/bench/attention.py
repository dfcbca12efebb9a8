"""Attention suite: ``pruned_attention`` keeping 10..100% of the keys vs full SDPA.

Rows per case: ``sdpa`` (full attention over every key: the dense yardstick), ``gather+sdpa``
(index the kept keys/values, then SDPA: what users write today), every registered backend of
``pruned_attention`` called directly, and ``auto`` (the public op, measured dispatch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern import dispatch
from sparsekern.bench.common import Case, Context, feed_dispatch, time_rows

KEEPS = (0.1, 0.25, 0.5, 0.75, 1.0)


def _shapes(ctx: Context) -> list[tuple[str, int, int, int, int]]:
    """(name, heads, q_len, k_len, head_dim): prefill (Sq == Sk) and decode (Sq == 1)."""
    if ctx.quick:
        return [("decode", 32, 1, 4096, 128)]
    if ctx.device.type == "cuda":
        return [("prefill", 32, 4096, 4096, 128), ("decode", 32, 1, 8192, 128)]
    # NOTE: 8 heads at 2048 keys keeps one CPU prefill SDPA near 1 s on 2 cores.
    return [("prefill", 8, 2048, 2048, 128), ("decode", 32, 1, 8192, 128)]


def _gather_sdpa(q, k, v, keep_idx):
    idx = keep_idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
    return F.scaled_dot_product_attention(q, torch.gather(k, 2, idx), torch.gather(v, 2, idx))


def _run_case(ctx: Context, name: str, heads: int, sq: int, sk_len: int, d: int, keep: float) -> list[dict]:
    kept = max(1, round(keep * sk_len))
    q = torch.randn(1, heads, sq, d, device=ctx.device, dtype=ctx.dtype)
    k = torch.randn(1, heads, sk_len, d, device=ctx.device, dtype=ctx.dtype)
    v = torch.randn(1, heads, sk_len, d, device=ctx.device, dtype=ctx.dtype)
    # A different random keep set per head, in ascending key order (as a pruner emits it).
    keep_idx = torch.rand(1, heads, sk_len, device=ctx.device).topk(kept, dim=-1).indices.sort(-1).values
    esize = q.element_size()
    base = {
        "suite": "attention",
        "case": f"{name} h{heads} q{sq} k{sk_len} d{d}",
        "rows": sq,
        "pattern": f"keep{round(keep * 100)}%",
        "keep": keep,
        "kept": kept,
        "dtype": str(ctx.dtype).removeprefix("torch."),
    }
    full_flops = 4.0 * heads * sq * sk_len * d
    full_bytes = (2 * sq + 2 * sk_len) * heads * d * esize
    key = ("attention.sdpa", name, heads, sq, sk_len, d)
    if key in ctx.scratch:  # the yardstick does not depend on the keep fraction: time it once
        dense = [{**ctx.scratch[key], **base}]
    else:
        sdpa = [("sdpa", "baseline", F.scaled_dot_product_attention, [(q, k, v)])]
        dense = time_rows(base, sdpa, ctx, full_flops, full_bytes, None)
        if not dense:
            return []
        ctx.scratch[key] = dense[0]
    dense_ms = dense[0]["median_ms"]
    dense[0]["speedup"] = 1.0

    flops = 4.0 * heads * sq * kept * d
    nbytes = (2 * sq + 2 * kept) * heads * d * esize + keep_idx.numel() * 8
    args = (q, k, v, keep_idx, False, None)
    variants = [("gather+sdpa", "baseline", _gather_sdpa, [(q, k, v, keep_idx)])]
    for backend, impl in sorted(dispatch.implementations("pruned_attention").items()):
        if ctx.wants(backend) and impl.supports(*args) is None:
            variants.append((backend, "backend", impl.fn, [args]))
    rows = time_rows(base, variants, ctx, flops, nbytes, dense_ms)
    with dispatch.use_backend("auto"):
        feed_dispatch(ctx, "pruned_attention", args, rows)
        sk.ops.pruned_attention(q, k, v, keep_idx)
        pick = dispatch.select("pruned_attention", *args).backend
        auto = time_rows(
            base, [("auto", "auto", sk.ops.pruned_attention, [(q, k, v, keep_idx)])], ctx, flops, nbytes, dense_ms
        )
    for r in auto:
        r["auto_pick"] = pick
    return dense + rows + auto


def cases(ctx: Context, keeps=None) -> list[Case]:
    keeps = keeps or ((0.25,) if ctx.quick else KEEPS)
    return [
        Case("attention", f"{name} keep {kp:.0%}", lambda c, a=(name, h, sq, skl, d, kp): _run_case(c, *a))
        for name, h, sq, skl, d in _shapes(ctx)
        for kp in keeps
    ]
