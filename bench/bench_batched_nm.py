"""Batched (prefill) N:M layers on the CPU without a dense copy, beside the dense layer.

One layer (default 11008x4096, the TinyLlama / Llama-7B MLP shape), bf16 x of 16, 65, 128 and
512 rows, ``sk.use_backend("cpu")`` so no dense copy is held: 2:4 bf16, W8A16, W4A16 g128 and
W4A16 g128 with int8 activations (which has no dense fallback at all) against dense
``F.linear``, interleaved in one process in a new random order each round, median over rounds of
two calls each.

    .venv/bin/python bench/bench_batched_nm.py [--shapes 11008x4096,...] [--rows 16,65,128,512] [--rounds 6]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

import sparsekern as sk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="11008x4096", help="out x in, comma-separated")
    ap.add_argument("--rows", default="16,65,128,512")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 x")
    for shape in args.shapes.split(","):
        out, k = (int(v) for v in shape.split("x"))
        one_shape(out, k, [int(r) for r in args.rows.split(",")], args.rounds)


def one_shape(out: int, k: int, rows_list: list[int], rounds: int) -> None:
    torch.manual_seed(0)
    rng = random.Random(0)
    w = sk.NMSparseWeight.from_dense(torch.randn(out, k) * 0.02, 2, 4, prune=True)
    cases = {
        "dense bf16": torch.randn(out, k).bfloat16(),
        "2:4 bf16": w.to(torch.bfloat16),
        "2:4 int8": w.quantize("int8").to(torch.bfloat16),
        "2:4 int4 g128": w.quantize("int4", 128).to(torch.bfloat16),
        "2:4 int4 g128 +a8": w.quantize("int4", 128, True, 32).to(torch.bfloat16),
    }
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
        x = torch.randn(rows, k).bfloat16()
        times = {n: [] for n in cases}
        with torch.no_grad(), sk.use_backend("cpu"):
            order = list(cases)
            for _ in range(rounds):
                rng.shuffle(order)  # torch's GEMM right before a variant slows our pool (spinning OpenMP threads)
                for name in order:
                    wt = cases[name]
                    op = F.linear if name == "dense bf16" else sk.ops.nm_linear
                    op(x, wt)
                    t = time.perf_counter()
                    op(x, wt)
                    op(x, wt)
                    times[name].append((time.perf_counter() - t) / 2 * 1e3)
        med = {n: statistics.median(v) for n, v in times.items()}
        base = med["dense bf16"]
        cells = (
            " | ".join(f"{med[n]:.1f}" for n in cases)
            + " | "
            + " | ".join(f"{base / med[n]:.2f}" for n in list(cases)[1:])
        )
        print(f"| {rows} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
