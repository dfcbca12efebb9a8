"""Quantized + sparse decode, one row, side by side: dense, N:M float (2:4 unless ``--patterns``
says), N:M int8 / int4 with float activations (W8A16 / W4A16) and with int8 activations
(``act_block=32``); bf16 activations and scales, or fp32 with ``--dtype fp32``.

Every variant is timed interleaved in one run, in a new random order each round (min of rounds
of ``--calls`` calls each, weights rotated through copies larger than the L3 so no call finds
them cached), on the machine's threads. The roofline is the weight bytes as stored (values, meta, scales, zeros) over the
bandwidth measured in the same run (``sparsekern.bench.roofline``: large copy or large read).

    .venv/bin/python bench/bench_quant_decode.py [--shapes 11008x4096,4096x4096] [--rounds 7]
        [--patterns 2:4,4:8,1:4,2:8] [--only "int4 g32 +a8,int8 +a8"] [--dtype fp32]
        [--matmul-precision high]
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

import sparsekern as sk

VARIANTS = (  # name (after the pattern), quantize() arguments (None: the float weight, named by its dtype)
    ("float", None),
    ("int8", ("int8", 0, True, 0)),
    ("int8 g128", ("int8", 128, True, 0)),
    ("int4 g128", ("int4", 128, True, 0)),
    ("int4 g32", ("int4", 32, True, 0)),
    ("int8 +a8", ("int8", 0, True, 32)),
    ("int4 g128 +a8", ("int4", 128, True, 32)),
    ("int4 g64 +a8", ("int4", 64, True, 32)),
    ("int4 g32 +a8", ("int4", 32, True, 32)),
    ("int4 g128 zp +a8", ("int4", 128, False, 32)),
)


def bandwidth_gbs() -> float:
    """The layer benchmark's roofline bandwidth: the better of a large copy and a large read."""
    from sparsekern.bench.roofline import measure_roofline

    return measure_roofline(torch.device("cpu"), torch.float32).bandwidth_gbs


def nm_ratio(best: dict, name: str, dtype: str) -> str:
    """Speed of ``name`` over the float weight of its own pattern (named ``"{pattern} {dtype}"``;
    "-" for dense)."""
    pattern = name.split(" ")[0]
    base = best.get(f"{pattern} {dtype}")
    return "-" if base is None or pattern == "dense" else f"{base / best[name]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="11008x4096,4096x4096")
    ap.add_argument("--patterns", default="2:4", help="N:M patterns, e.g. 2:4,4:8,1:4,2:8")
    ap.add_argument("--only", default="", help="comma-separated variant names, e.g. 'int8 +a8' (default: all)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="activations, scales, dense weight")
    ap.add_argument(
        "--matmul-precision",
        choices=("highest", "high"),
        default="highest",
        help="torch.set_float32_matmul_precision (fp32 x: 'high' lets the quantized kernels take x as two bf16 parts)",
    )
    args = ap.parse_args()
    torch.set_float32_matmul_precision(args.matmul_precision)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    bw = bandwidth_gbs()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, roofline bandwidth {bw:.1f} GB/s, "
        f"float32 matmul precision {args.matmul_precision}\n"
    )
    print(f"| shape | weights | ms | weight MB | GB/s | % roofline | x dense {args.dtype} | x N:M {args.dtype} |")
    print("|---|---|---|---|---|---|---|---|")
    patterns = args.patterns.split(",")
    for shape in args.shapes.split(","):
        out, k = (int(v) for v in shape.split("x"))
        dense = torch.randn(out, k) * 0.02
        dense_name = f"dense {args.dtype}"
        cases = {dense_name: [dense.to(dtype) for _ in range(3)]}
        for pattern in patterns:
            n, m = (int(v) for v in pattern.split(":"))
            w_nm = sk.NMSparseWeight.from_dense(dense, n, m, prune=True)
            for name, q in VARIANTS:
                if args.only and name not in args.only.split(",") and q is not None:
                    continue
                w = w_nm if q is None else w_nm.quantize(*q)
                label = args.dtype if q is None else name
                cases[f"{pattern} {label}"] = [sk.SparseLinear(w.to(dtype)) for _ in range(3)]
        x = torch.randn(1, k).to(dtype)
        best = {name: float("inf") for name in cases}
        rng = random.Random(0)
        with torch.no_grad(), sk.use_backend("cpu"):
            for ws in cases.values():  # warm up (plans, pools)
                for w in ws:
                    F.linear(x, w) if isinstance(w, torch.Tensor) else w(x)
            order = list(cases)
            for _ in range(args.rounds):
                # A new order each round: right after torch's GEMM (dense), whose OpenMP threads
                # still spin, the sparse kernels' pool is often preempted; a fixed order would
                # always charge that to the same variant.
                rng.shuffle(order)
                for name in order:
                    ws = cases[name]
                    t = time.perf_counter()
                    for i in range(args.calls):
                        w = ws[i % len(ws)]
                        F.linear(x, w) if isinstance(w, torch.Tensor) else w(x)
                    best[name] = min(best[name], (time.perf_counter() - t) / args.calls)
        for name, ws in cases.items():
            w = ws[0]
            nbytes = w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.sparse_weight.nbytes()
            ms = best[name] * 1e3
            gbs = nbytes / best[name] / 1e9
            print(
                f"| {shape} | {name} | {ms:.3f} | {nbytes / 1e6:.1f} | {gbs:.1f} | {100 * gbs / bw:.0f}% | "
                f"{best[dense_name] / best[name]:.2f} | {nm_ratio(best, name, args.dtype)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
