"""Quantized block-sparse decode on the CPU per instruction set: the same op
(``torch.ops.sparsekern._bsr_linear_cpu``, no dispatch) under ``SPARSEKERN_CPU_ISA`` =
portable / avx2 / avx512 / avx512bf16 (each level this CPU has), in one process.

Each round times every (case, ISA) pair in a new random order, ``--calls`` calls each through
weight copies rotated so that no call finds its weight cached (>= 3x the L3 in rotation);
the table gives the median and 20/80 quantiles of the rounds in us per call, GB/s of the stored
weight (blocks, scales, zeros, indices), and each ISA's speed over the portable loop.

    flock /tmp/sk-bench.lock .venv/bin/python bench/bench_bsr_quant_decode.py \\
        [--shapes 4096x4096,11008x4096] [--rows 1,4] [--rounds 7] [--isas portable,avx2,avx512]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import time

import torch

import sparsekern as sk
from sparsekern._extension import CPU_ISAS as ISAS
from sparsekern._extension import detected_cpu_isa

CACHE_BYTES = 96 << 20  # 3x this machine's 32 MiB L3
QUANTS = (("int8 g32", ("int8", 32, True)), ("int4 g32", ("int4", 32, True)), ("int4 g32 zp", ("int4", 32, False)))


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or "unknown CPU"
    try:  # the family and model name the core when the model name does not (VMs: "AMD EPYC")
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0].splitlines()
        info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first if ":" in line)}
        name += f" (family {info['cpu family']} model {info['model']})"
    except (OSError, KeyError):
        pass
    return f"{name}, {os.cpu_count()} CPUs"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def weight_bytes(w: sk.BlockSparseWeight) -> int:
    parts = [w.blocks, w.scales, w.zeros, w.crow_indices, w.col_indices]
    return sum(t.numel() * t.element_size() for t in parts if t is not None)


def call(x: torch.Tensor, w: sk.BlockSparseWeight) -> torch.Tensor:
    return torch.ops.sparsekern._bsr_linear_cpu(x, w.crow_indices, w.col_indices, w.blocks, None, w.scales, w.zeros)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--quants", default=",".join(name for name, _ in QUANTS))
    ap.add_argument("--isas", default="portable,avx2,avx512,avx512bf16")
    ap.add_argument("--block", default="32x32")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--portable-calls", type=int, default=2, help="calls per round for the (slow) portable loop")
    args = ap.parse_args()
    have = detected_cpu_isa()
    isas = [i for i in args.isas.split(",") if ISAS[i] <= have]
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
    bm, bk = (int(v) for v in args.block.split("x"))
    torch.manual_seed(0)

    cases = []  # (label, x, weight copies, bytes)
    for shape in args.shapes.split(","):
        out, k = (int(v) for v in shape.split("x"))
        base = sk.BlockSparseWeight.from_dense(torch.randn(out, k) * 0.02, block=(bm, bk), sparsity=args.sparsity)
        for qname, q in QUANTS:
            if qname not in args.quants.split(","):
                continue
            for dname in args.dtypes.split(","):
                w = base.quantize(*q).to(dtypes[dname])
                nbytes = weight_bytes(w)
                copies = [w] + [
                    sk.BlockSparseWeight(
                        w.crow_indices.clone(),
                        w.col_indices.clone(),
                        w.blocks.clone(),
                        w.shape,
                        w.scales.clone(),
                        None if w.zeros is None else w.zeros.clone(),
                    )  # fmt: skip
                    for _ in range(max(0, -(-CACHE_BYTES // nbytes) - 1))
                ]
                for rows in (int(r) for r in args.rows.split(",")):
                    x = torch.randn(rows, k).to(dtypes[dname])
                    cases.append((f"{shape} {qname} {dname} x, {rows} row{'s' if rows > 1 else ''}", x, copies, nbytes))

    # Check every ISA against the first on one weight, warm up.
    for label, x, ws, _ in cases:
        ys = {}
        for isa in isas:
            os.environ["SPARSEKERN_CPU_ISA"] = isa
            ys[isa] = call(x, ws[0]).float()
        ref = ys[isas[0]]
        for isa, y in ys.items():
            err = (y - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
            assert err < 2e-2, f"{label}: {isa} differs from {isas[0]} by {err:.2e} (relative to max |y|)"

    times = {(label, isa): [] for label, *_ in cases for isa in isas}
    pairs = [(c, isa) for c in range(len(cases)) for isa in isas]
    rng = random.Random(0)
    pos = {label: 0 for label, *_ in cases}
    for _ in range(args.rounds):
        rng.shuffle(pairs)
        for c, isa in pairs:
            label, x, ws, _ = cases[c]
            os.environ["SPARSEKERN_CPU_ISA"] = isa
            n = args.portable_calls if isa == "portable" else args.calls
            t = time.perf_counter()
            for _ in range(n):
                call(x, ws[pos[label] % len(ws)])
                pos[label] += 1
            times[(label, isa)].append((time.perf_counter() - t) / n)
    os.environ.pop("SPARSEKERN_CPU_ISA", None)

    print(f"{cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; git {git_sha()}")
    print(f"block {bm}x{bk} at {args.sparsity:.0%}, {args.rounds} rounds, median us per call [20%, 80%]\n")
    others = [i for i in isas if i != "portable"] if "portable" in isas else []
    cols = [f"{i} us | {i} GB/s" for i in isas] + [f"{i} / portable" for i in others]
    print(f"| case | {' | '.join(cols)} |")
    print("|---|" + "---|" * (2 * len(isas) + len(others)))
    for label, _, _, nbytes in cases:
        med = {}
        cells = []
        for isa in isas:
            ts = times[(label, isa)]
            q = statistics.quantiles(ts, n=5)
            med[isa] = statistics.median(ts)
            cells.append(f"{med[isa] * 1e6:.0f} [{q[0] * 1e6:.0f}, {q[3] * 1e6:.0f}] | {nbytes / med[isa] / 1e9:.1f}")
        cells += [f"{med['portable'] / med[i]:.1f}x" for i in others]
        print(f"| {label} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
