"""2:4 GEMM on the sparse tensor cores: sparsekern's mma.sp kernel vs cuBLAS and cuSPARSELt.

    .venv/bin/python bench/bench_nm24_gpu.py [--dtype bfloat16] [--out bench/results/nm24_<gpu>.json]

For each Llama-7B / 13B linear shape (N x K) and M in 1..8192 rows: median and 20/80 % times
(CUDA events, interleaved repetitions) of
  - dense     F.linear(x, W)                                  (cuBLAS)
  - cslt      torch._cslt_sparse_mm on to_sparse_semi_structured(W)   (cuSPARSELt; if present)
  - cutlass   the same through torch's CUTLASS 2:4 path                (if present)
  - nm24      torch.ops.sparsekern._nm24_mma on the sm80 hardware layout
plus TFLOP/s (dense-equivalent 2*M*N*K) and speedup vs dense. Every kernel's output is checked
against the dense result before it is timed. Needs a GPU; writes JSON rows with the device
name, torch version and git sha.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsekern
from sparsekern.backends import cuda as cuda_backend

SHAPES = {  # (N, K) of one decoder layer's linears
    "llama7b.qkvo": (4096, 4096),
    "llama7b.up": (11008, 4096),
    "llama7b.down": (4096, 11008),
    "llama13b.qkvo": (5120, 5120),
    "llama13b.up": (13824, 5120),
    "llama13b.down": (5120, 13824),
}
ROWS = (1, 16, 64, 256, 1024, 2048, 4096, 8192)


def time_fns(fns: dict, reps: int = 50, warmup: int = 10) -> dict[str, list[float]]:
    """Interleaved timing (ms per call) so clock and thermal drift hit every kernel alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return times


def candidates(x, w, dense):
    fns = {"dense": lambda: F.linear(x, dense)}
    try:
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

        SparseSemiStructuredTensor._FORCE_CUTLASS = False
        sp = to_sparse_semi_structured(dense)
        fns["cslt"] = lambda: torch._cslt_sparse_mm(sp.packed, x.T).T  # W @ x^T, as torch does
        SparseSemiStructuredTensor._FORCE_CUTLASS = True
        spc = to_sparse_semi_structured(dense)
        fns["cutlass"] = lambda: F.linear(x, spc)
    except Exception as exc:  # noqa: BLE001  (no cuSPARSELt in this torch build, or shape refused)
        print(f"  torch 2:4 paths unavailable: {exc}")
    values_hw, meta_hw = cuda_backend.hw_weight(w.values, w.meta)
    fns["nm24"] = lambda: torch.ops.sparsekern._nm24_mma(x, values_hw, meta_hw, dense.shape[0], None)
    return fns


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available() or not cuda_backend.has_kernel():
        raise SystemExit("needs a CUDA GPU and sparsekern built with CUDA")
    dtype = getattr(torch, args.dtype)
    dev = torch.cuda.get_device_name()
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    out = args.out or Path("bench/results") / f"nm24_{dev.replace(' ', '_')}_{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for shape_name, (n, k) in SHAPES.items():
        w = sparsekern.NMSparseWeight.from_dense(torch.randn(n, k, device="cuda", dtype=dtype), prune=True)
        dense = w.to_dense()
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            fns = candidates(x, w, dense)
            ref = fns["dense"]().float()
            tol = 2e-2 * ref.abs().max().item()
            for name, fn in list(fns.items()):
                try:
                    err = (fn().float() - ref).abs().max().item()
                except RuntimeError as exc:  # e.g. cuSPARSELt refusing a shape on this device
                    print(f"  {shape_name} M={m} {name}: {str(exc).splitlines()[0][:160]}; not timed")
                    fns.pop(name)
                    continue
                if not err <= tol:
                    print(f"  {shape_name} M={m} {name}: max error {err:.3g} > {tol:.3g}; not timed")
                    fns.pop(name)
            times = time_fns(fns, reps=args.reps)
            base = statistics.median(times["dense"])
            for name, ts in times.items():
                q = statistics.quantiles(ts, n=10)
                med = statistics.median(ts)
                row = dict(
                    shape=shape_name, N=n, K=k, M=m, kernel=name, dtype=args.dtype, ms_median=med, ms_p20=q[1],
                    ms_p80=q[7], tflops=2 * m * n * k / med / 1e9, speedup_vs_dense=base / med, device=dev,
                    torch=torch.__version__, git_sha=sha,
                )  # fmt: skip
                rows.append(row)
                print(
                    f"{shape_name:14s} M={m:5d} {name:8s} {med:8.4f} ms {row['tflops']:7.1f} TFLOP/s x{row['speedup_vs_dense']:.2f}"
                )
            out.write_text(json.dumps(rows, indent=1))  # partial results survive a timeout
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
