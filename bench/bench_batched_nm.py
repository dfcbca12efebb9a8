"""Batched (prefill) N:M layers on the CPU without a dense copy, beside the dense layer.

One layer (default 11008x4096, the TinyLlama / Llama-7B MLP shape), x of 16, 65, 128 and 512
rows, ``sk.use_backend("cpu")`` so no dense copy is held: N:M variants (default 2:4 with bf16,
W8A16, W4A16 g128 and W4A16 g128 with int8 activations, which has no dense fallback at all)
against dense ``F.linear`` in the same dtype, interleaved in one process in a new random order
each round, median over rounds of two calls each.

    .venv/bin/python bench/bench_batched_nm.py [--shapes 11008x4096,...] [--rows 16,65,128,512] [--rounds 6]
        [--dtype fp32] [--variants 2:4,4:8,1:4+int8,2:8+int4g128,4:8+int8a32]

Variants are N:M patterns as ``sparsekern bench --patterns`` writes them (``+int8``,
``+int4g128``, ``a32``: int8 activations per 32 columns).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.bench.layer import _compress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="11008x4096", help="out x in, comma-separated")
    ap.add_argument("--rows", default="16,65,128,512")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--variants", default="2:4,2:4+int8,2:4+int4g128,2:4+int4g128a32")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype} x")
    for shape in args.shapes.split(","):
        out, k = (int(v) for v in shape.split("x"))
        one_shape(out, k, [int(r) for r in args.rows.split(",")], args.rounds, dtype, args.variants.split(","))


def one_shape(out: int, k: int, rows_list: list[int], rounds: int, dtype: torch.dtype, variants: list[str]) -> None:
    torch.manual_seed(0)
    rng = random.Random(0)
    dense = torch.randn(out, k) * 0.02
    cases = {"dense": dense.to(dtype), **{v: _compress(dense, v).to(dtype) for v in variants}}
    print(f"\n{out}x{k}\n")
    print(
        "| rows | "
        + " | ".join(f"{n} ms" for n in cases)
        + " | "
        + " | ".join(f"x dense ({n})" for n in list(cases)[1:])
        + " |"
    )
    print("|---" * (2 * len(cases)) + "|")
    for rows in rows_list:
        x = torch.randn(rows, k).to(dtype)
        times = {n: [] for n in cases}
        with torch.no_grad(), sk.use_backend("cpu"):
            order = list(cases)
            for _ in range(rounds):
                rng.shuffle(order)  # torch's GEMM right before a variant slows our pool (spinning OpenMP threads)
                for name in order:
                    wt = cases[name]
                    op = F.linear if name == "dense" else sk.ops.nm_linear
                    op(x, wt)
                    t = time.perf_counter()
                    op(x, wt)
                    op(x, wt)
                    times[name].append((time.perf_counter() - t) / 2 * 1e3)
        med = {n: statistics.median(v) for n, v in times.items()}
        base = med["dense"]
        cells = (
            " | ".join(f"{med[n]:.1f}" for n in cases)
            + " | "
            + " | ".join(f"{base / med[n]:.2f}" for n in list(cases)[1:])
        )
        print(f"| {rows} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
