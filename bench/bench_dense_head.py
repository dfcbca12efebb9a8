"""The dense LM head at decode rows: torch's ``F.linear`` against ``_lean_head_cpu`` (sparsekern's
GEMV, what :class:`~sparsekern.nn.dense_head.DenseHead` runs), fp32 and bf16, side by side.

``python bench/bench_dense_head.py [--shapes 32000x2048,49152x576] [--rows 1,2,4,8,16,32]``
prints one line per case: the median of ``--reps`` back-to-back calls of each, their ratio and
the GEMV's read rate. The rows where the GEMV wins set ``dense_head.ROWS`` (AVX-512
loops) and ``ROWS_AVX2`` (AVX2 loops). Run it alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import sparsekern  # noqa: F401  (loads the ops)


def _median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="32000x2048,49152x576", help="OUTxIN heads (TinyLlama, SmolLM2)")
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    op = torch.ops.sparsekern._lean_head_cpu
    print(f"threads {torch.get_num_threads()}, _cpu_isa {int(torch.ops.sparsekern._cpu_isa())}")
    print("| head | dtype | rows | F.linear ms | GEMV ms | F.linear / GEMV | GEMV GB/s |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        n, k = (int(s) for s in shape.split("x"))
        for dtype in (torch.float32, torch.bfloat16):
            w = torch.randn(n, k, dtype=dtype)
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(rows, k, dtype=dtype)
                a = _median_ms(lambda x=x, w=w: F.linear(x, w), args.reps)
                b = _median_ms(lambda x=x, w=w: op(x, w), args.reps)
                gbs = w.numel() * w.element_size() / b / 1e6
                print(
                    f"| {shape} | {str(dtype)[6:]} | {rows} | {a:.2f} | {b:.2f} | {a / b:.2f} | {gbs:.1f} |", flush=True
                )


if __name__ == "__main__":
    main()
