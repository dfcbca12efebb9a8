"""Layer suite: real model linear shapes x rows x sparsity patterns x every available backend.

Per (shape, rows, pattern) it times: every registered backend of the op that can run the
arguments (called directly, no dispatch), torch's own sparse formats where they run (CSR / BSR,
and ``to_sparse_semi_structured`` on CUDA), and ``"auto"``: the swapped layer itself (a
``SparseLinear``: measured dispatch, dense fallback and per-call overhead included) timed call by
call against the ``nn.Linear`` it replaced. The auto row names the backend dispatch picked and
whether the swapped layer keeps the promise (>= 0.95x dense).
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern import dispatch
from sparsekern.bench.common import PROMISE, Case, Context, feed_dispatch, result_row, time_rows
from sparsekern.bench.timing import copies_to_flush, measure_interleaved

# [out_features, in_features] as in nn.Linear.
SHAPES: dict[str, tuple[int, int]] = {
    "llama7b.attn": (4096, 4096),
    "llama7b.up": (11008, 4096),
    "llama7b.down": (4096, 11008),
    "llama13b.attn": (5120, 5120),
    "llama13b.up": (13824, 5120),
    "llama13b.down": (5120, 13824),
    "opt6.7b.fc1": (16384, 4096),
    "opt6.7b.fc2": (4096, 16384),
    "vit-b.attn": (768, 768),
    "vit-b.fc1": (3072, 768),
    "vit-b.fc2": (768, 3072),
}
ROWS = (1, 8, 64, 512, 4096)
PATTERNS = (
    "dense",
    "2:4",
    "1:4",
    "2:8",
    "4:8",
    *(f"block{b}x{b}:{s}" for b in (32, 64) for s in (0.5, 0.8, 0.9)),
    "2:4+int8",
    "2:4+int8g128",
    "2:4+int4g128",
    "2:4+int8a32",
    "2:4+int4g128a32",
    "1:4+int8",
    "2:8+int4g128",
    "block32x32:0.9+int8",
    "block32x32:0.9+int4",
)
QUICK_SHAPES = ("llama7b.attn", "llama7b.up")
QUICK_ROWS = (1, 512)
QUICK_PATTERNS = ("dense", "2:4", "1:4", "block32x32:0.9", "2:4+int8", "2:4+int4g128", "2:4+int4g128a32")


_QUANT_SPEC = re.compile(r"(int8|int4)(?:g(\d+))?(z?)(?:a(\d+))?")


def parse_quant(spec: str) -> tuple[str, int, bool, int]:
    """``"int8"`` -> ("int8", 0, True, 0); ``"int4g128"`` -> ("int4", 128, True, 0); ``z``: zero
    points (``"int4g128z"``); ``a32``: int8 activations per 32 columns (``"int4g128a32"``)."""
    found = _QUANT_SPEC.fullmatch(spec)
    if found is None:
        raise ValueError(f"pattern: expected a quant suffix like '+int8', '+int4g128', '+int4g128za32', got {spec!r}")
    quant, group, zeros, act = found.groups()
    return quant, int(group or 0), not zeros, int(act or 0)


def parse_pattern(pattern: str) -> tuple[str, tuple]:
    """``"2:4"`` -> ("nm", (2, 4)); ``"2:4+int4g128"`` -> ("nm", (2, 4, ("int4", 128, True, 0)));
    ``"block32x32:0.9"`` -> ("bsr", ((32, 32), 0.9)); ``"block32x32:0.9+int4g16"`` -> ("bsr",
    ((32, 32), 0.9, ("int4", 16, True, 0))) (the group counts columns of a block row; no ``a``);
    "dense"."""
    base, plus, spec = pattern.partition("+")
    if plus:
        kind, params = parse_pattern(base)
        if kind == "dense":
            raise ValueError(f"pattern: quantized values need an N:M or block pattern, got {pattern!r}")
        quant = parse_quant(spec)
        if kind == "bsr" and quant[3]:
            raise ValueError(f"pattern: int8 activations ('a') are N:M only, got {pattern!r}")
        return kind, (*params, quant)
    if pattern == "dense":
        return "dense", ()
    if pattern.startswith("block"):
        dims, _, sparsity = pattern[len("block") :].partition(":")
        bm, _, bk = dims.partition("x")
        return "bsr", ((int(bm), int(bk or bm)), float(sparsity))
    n, _, m = pattern.partition(":")
    if not (n.isdigit() and m.isdigit()):
        raise ValueError(f"pattern: expected 'dense', 'N:M' or 'blockBMxBK:SPARSITY', got {pattern!r}")
    return "nm", (int(n), int(m))


def _compress(dense: torch.Tensor, pattern: str):
    kind, params = parse_pattern(pattern)
    if kind == "nm":
        w = sk.NMSparseWeight.from_dense(dense, n=params[0], m=params[1], prune=True)
        return w if len(params) == 2 else w.quantize(*params[2])
    w = sk.BlockSparseWeight.from_dense(dense, block=params[0], sparsity=params[1])
    return w if len(params) == 2 else w.quantize(*params[2][:3])


def _parts(w) -> tuple:
    """The op's weight arguments after x, in schema order (no bias)."""
    if isinstance(w, sk.NMSparseWeight):
        return (w.values, w.meta, w.n, w.m, None) + (() if w.quant is None else w.quant_args())
    return (w.crow_indices, w.col_indices, w.blocks, None) + (() if w.quant is None else w.quant_args())


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    """An ``nn.Linear`` (no bias) holding ``weight`` itself."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    return layer


def _clone(w):
    if isinstance(w, sk.NMSparseWeight):
        quant = (
            () if w.quant is None else (w.scales.clone(), None if w.zeros is None else w.zeros.clone(), w.group_size)
        )
        return sk.NMSparseWeight(w.values.clone(), w.meta.clone(), w.n, w.m, w.shape, *quant)
    quant = () if w.quant is None else (w.scales.clone(), None if w.zeros is None else w.zeros.clone())
    return sk.BlockSparseWeight(w.crow_indices.clone(), w.col_indices.clone(), w.blocks.clone(), w.shape, *quant)


def _density(w) -> float:
    if isinstance(w, sk.NMSparseWeight):
        return w.n / w.m
    return w.density


def _weights(ctx: Context, name: str, pattern: str):
    """Dense weight of ``name`` and its ``pattern`` form, built once and kept while in use."""
    key = (name, pattern)
    if ctx.scratch.get("layer.key") != key:
        if ctx.scratch.get("layer.dense_name") != name:
            out, k = SHAPES[name]
            ctx.scratch["layer.dense_name"] = name
            ctx.scratch["layer.dense"] = (torch.randn(out, k, device=ctx.device) * 0.02).to(ctx.dtype)
        dense = ctx.scratch["layer.dense"]
        sparse = None if pattern == "dense" else _compress(dense, pattern)
        pruned = dense if sparse is None else sparse.to_dense()
        ctx.scratch["layer.key"] = key
        ctx.scratch["layer.weights"] = (pruned, sparse)
    return ctx.scratch["layer.weights"]


def _torch_baselines(ctx: Context, pattern: str, pruned: torch.Tensor, n_copies: int, rows: int) -> list[tuple]:
    """torch's own sparse paths for the same weight: (name, fn, [weights])."""
    out = []
    kind, params = parse_pattern(pattern)
    if ctx.device.type == "cuda" and pattern == "2:4" and ctx.dtype in (torch.float16, torch.bfloat16):
        try:
            from torch.sparse import to_sparse_semi_structured

            ws = [to_sparse_semi_structured(pruned.clone()) for _ in range(n_copies)]
            out.append(("torch-2:4", lambda x, w: F.linear(x, w), ws))
        except Exception as exc:  # noqa: BLE001
            ctx.note(f"torch-2:4 unavailable: {type(exc).__name__}: {exc}")
    if ctx.device.type == "cpu" and ctx.dtype == torch.float32:
        # torch's CPU CSR/BSR matmul goes through MKL and has no bf16/fp16 kernel.
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            # NOTE: --quick skips CSR past 64 rows: at 512 rows of 11008x4096 one call is ~10 s
            # here (0.06x dense), a third of the whole quick budget for a known loser.
            if not (ctx.quick and rows > 64):
                out.append(("torch-csr", lambda x, w: torch.mm(w, x.t()).t(), [pruned.to_sparse_csr()]))
            if kind == "bsr":
                out.append(("torch-bsr", lambda x, w: torch.mm(w, x.t()).t(), [pruned.to_sparse_bsr(params[0])]))
    return out


def _run_case(ctx: Context, name: str, rows: int, pattern: str) -> list[dict]:
    out_f, k = SHAPES[name]
    pruned, sparse = _weights(ctx, name, pattern)
    esize = pruned.element_size()
    xs = [
        torch.randn(rows, k, device=ctx.device, dtype=ctx.dtype)
        for _ in range(copies_to_flush(rows * k * esize, ctx.device, 4))
    ]
    base = {
        "suite": "layer",
        "case": name,
        "out": out_f,
        "k": k,
        "rows": rows,
        "pattern": pattern,
        "dtype": str(ctx.dtype).removeprefix("torch."),
    }
    io_bytes = (rows * k + rows * out_f) * esize
    dense_key = ("layer.dense_ms", name, rows)

    if pattern == "dense":
        ws = [pruned] + [pruned.clone() for _ in range(copies_to_flush(pruned.numel() * esize, ctx.device) - 1)]
        sets = [(xs[i % len(xs)], ws[i % len(ws)]) for i in range(max(len(xs), len(ws)))]
        rows_out = time_rows(
            base,
            [("torch-dense", "baseline", F.linear, sets)],
            ctx,
            2.0 * rows * out_f * k,
            pruned.numel() * esize + io_bytes,
            None,
        )
        for r in rows_out:
            r["speedup"] = 1.0
            ctx.scratch[dense_key] = r["median_ms"]
        return rows_out

    dense_ms = ctx.scratch.get(dense_key)  # cases() always runs dense first: the yardstick
    op = "nm_linear" if isinstance(sparse, sk.NMSparseWeight) else "bsr_linear"
    n_w = copies_to_flush(sparse.nbytes(), ctx.device)
    ws = [sparse] + [_clone(sparse) for _ in range(n_w - 1)]
    n_sets = max(len(xs), len(ws))
    raw_sets = [(xs[i % len(xs)], *_parts(ws[i % len(ws)])) for i in range(n_sets)]
    flops = 2.0 * rows * out_f * k * _density(sparse)
    nbytes = sparse.nbytes() + io_bytes

    variants = []
    for backend, impl in sorted(dispatch.implementations(op).items()):
        if not ctx.wants(backend) or impl.supports(*raw_sets[0]) is not None:
            continue
        if backend == "reference" and ctx.quick:
            continue  # decompress + dense GEMM: the dense fallback row shows the same GEMM
        variants.append((backend, "backend", impl.fn, raw_sets))
    n_dense = copies_to_flush(pruned.numel() * esize, ctx.device)
    for tname, fn, tw in _torch_baselines(ctx, pattern, pruned, n_dense, rows):
        variants.append(
            (tname, "baseline", fn, [(xs[i % len(xs)], tw[i % len(tw)]) for i in range(max(len(xs), len(tw)))])
        )

    # The swapped layer as a model runs it: a SparseLinear per weight copy (sharing its tensors).
    swapped = [sk.SparseLinear(w) for w in ws]
    auto_sets = [(swapped[i % len(ws)], xs[i % len(xs)]) for i in range(n_sets)]
    results = time_rows(base, variants, ctx, flops, nbytes, dense_ms)
    with dispatch.use_backend("auto"):
        feed_dispatch(ctx, op, raw_sets[0], results)
        with torch.no_grad():
            swapped[0](xs[0])  # with no stored choice: measures and stores one, as a user's first call
        pick = dispatch.select(op, *raw_sets[0]).backend
        # The promise row: the swapped layer timed call by call against the nn.Linear it replaced
        # (same x buffers), so the ratio holds even while other work comes and goes on the machine.
        dense_layers = [_linear(pruned)] + [_linear(pruned.clone()) for _ in range(n_dense - 1)]
        dense_sets = [(dense_layers[i % n_dense], xs[i % len(xs)]) for i in range(max(len(xs), n_dense))]
        t_dense, t_auto = measure_interleaved(
            [(torch.nn.Module.__call__, dense_sets), (torch.nn.Module.__call__, auto_sets)], ctx.device, ctx.budget
        )
    auto = result_row(base, "auto", "auto", t_auto, flops, nbytes, ctx, t_dense.median_ms)
    auto.update(auto_pick=pick, dense_ms_paired=t_dense.median_ms, promise_ok=auto["speedup"] >= PROMISE)
    return results + [auto]


def cases(ctx: Context, shapes=None, rows=None, patterns=None) -> list[Case]:
    shapes = shapes or (QUICK_SHAPES if ctx.quick else tuple(SHAPES))
    rows = rows or (QUICK_ROWS if ctx.quick else ROWS)
    patterns = patterns or (QUICK_PATTERNS if ctx.quick else PATTERNS)
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"shapes: expected names from {sorted(SHAPES)}, got {s!r}")
    for p in patterns:
        parse_pattern(p)
    # Dense first in each (shape, rows) so sparse rows find their yardstick.
    ordered = ["dense", *(p for p in patterns if p != "dense")]
    return [
        Case("layer", f"{s} rows={r} {p}", lambda c, s=s, r=r, p=p: _run_case(c, s, r, p))
        for s in shapes
        for p in ordered
        for r in rows
        if p in patterns or p == "dense"
    ]
