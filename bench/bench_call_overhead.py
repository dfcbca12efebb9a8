"""Per-call overhead of the public linears and SparseLinear over the bare C++ kernel, CPU, 1 row.

For 2:4 and block32x32 at 90% sparsity, 384x384 and 4096x4096, fp32, x of one row:

- bare kernel: ``torch.ops.sparsekern._nm_linear_cpu`` / ``_bsr_linear_cpu``
- public op: ``sk.ops.nm_linear`` / ``sk.ops.bsr_linear`` (a plan, sparsekern/plan.py)
- SparseLinear: the layer (its own plans)
- nn.Linear: the dense layer it replaced

The CPU backend is forced so every row runs the same kernel; overhead = row - bare kernel.
Variants alternate call batch by call batch, so load from other processes hits all alike; the
minimum over batches is the figure to compare (the median shows the noise).

    .venv/bin/python bench/bench_call_overhead.py [--reps 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sparsekern as sk


def _cases(size: int):
    torch.manual_seed(0)
    lin = torch.nn.Linear(size, size)
    yield "2:4", sk.SparseLinear.from_linear(lin, "2:4").requires_grad_(False), lin
    yield "block32x32:0.9", sk.SparseLinear.from_linear(lin, "block32x32:0.9").requires_grad_(False), lin


def _variants(layer: sk.SparseLinear, lin: torch.nn.Linear, x: torch.Tensor) -> dict:
    bias = layer.bias
    if layer.block is None:
        w, bare, op = layer.sparse_weight, torch.ops.sparsekern._nm_linear_cpu, sk.ops.nm_linear
        args = (layer.values, layer.meta, layer.n, layer.m, bias)
    else:
        w, bare, op = layer.sparse_weight, torch.ops.sparsekern._bsr_linear_cpu, sk.ops.bsr_linear
        args = (layer.crow_indices, layer.col_indices, layer.blocks, bias)
    return {
        "bare kernel": lambda: bare(x, *args),
        "public op": lambda: op(x, w, bias),
        "SparseLinear": lambda: layer(x),
        "nn.Linear": lambda: lin(x),
    }


def _measure(variants: dict, reps: int, calls: int) -> dict[str, list[float]]:
    for fn in variants.values():  # warm-up: plans, caches
        for _ in range(3):
            fn()
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            out[name].append((time.perf_counter() - t0) / calls * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, sparsekern {sk.__version__}")
    print(f"{'case':<26} {'variant':<14} {'min us':>9} {'median us':>10} {'min - bare':>11}")
    with torch.no_grad(), sk.use_backend("cpu"):
        for size in (384, 4096):
            calls = 20 if size <= 1024 else 2
            for pattern, layer, lin in _cases(size):
                x = torch.randn(1, size)
                times = _measure(_variants(layer, lin, x), args.reps, calls)
                bare = min(times["bare kernel"])
                for name, ts in times.items():
                    case = f"{pattern} {size}x{size}"
                    print(f"{case:<26} {name:<14} {min(ts):9.2f} {statistics.median(ts):10.2f} {min(ts) - bare:+11.2f}")


if __name__ == "__main__":
    main()
