"""CPU N:M and block-sparse linears (a SparseLinear on the CPU kernels) vs dense ``F.linear``, side by side.

pytest-benchmark: ``pytest bench/bench_linear_cpu.py`` (CI: ``--benchmark-disable``).
Table: ``python bench/bench_linear_cpu.py [--quick]`` prints shape, pattern, rows, dtype, dense
and sparse ms (median, 20/80 quantiles), speedup, torch CSR/BSR speedup, achieved GB/s and % of
the memory roofline (bandwidth measured in the same run with a large ``sum``). Weights are
rotated over enough copies that they never sit in the last-level cache between calls.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import subprocess
import time

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.info import cpu_isa

LLAMA_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (out_features, in_features)
PATTERNS = ("2:4", "1:4", "2:8", "block32x32:0.9")
CACHE_BYTES = 96 << 20  # rotate weights over at least this many bytes (L3 here is 32 MiB)


def make_weight(pattern: str, out: int, k: int, dtype: torch.dtype):
    """(sparse weight, dense masked weight) for a pattern string."""
    dense = torch.randn(out, k)
    if pattern.startswith("block"):
        shape, sparsity = pattern[len("block") :].split(":")
        bm, bk = (int(s) for s in shape.split("x"))
        w = sk.BlockSparseWeight.from_dense(dense, block=(bm, bk), sparsity=float(sparsity)).to(dtype)
    else:
        n, m = (int(s) for s in pattern.split(":"))
        w = sk.NMSparseWeight.from_dense(dense, n=n, m=m, prune=True).to(dtype)
    return w, w.to_dense()


def run_sparse(x, layer):
    """The swapped layer as a model calls it (SparseLinear, no grad), on the CPU kernels."""
    with sk.use_backend("cpu"), torch.no_grad():
        return layer(x)


def _copies(nbytes: int) -> int:
    return max(1, math.ceil(CACHE_BYTES / max(nbytes, 1)))


def time_rotating(fn, args_list, reps: int) -> list[float]:
    """Per-call seconds of fn(*args) cycling through args_list (one warm-up pass)."""
    for args in args_list:
        fn(*args)
    times = []
    for i in range(reps):
        args = args_list[i % len(args_list)]
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return times


def bandwidth_gbs(nbytes: int = 512 << 20, reps: int = 5) -> float:
    """Read bandwidth of a large fp32 sum (what the decode kernels are limited by)."""
    t = torch.randn(nbytes // 4)
    times = time_rotating(lambda: t.sum(), [()], reps)
    return nbytes / min(times) / 1e9


def quantiles(times: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def torch_sparse(pattern: str, dense: torch.Tensor):
    """What a CPU user tries first: torch CSR (N:M) or BSR (blocks) matmul, or None."""
    try:
        if pattern.startswith("block"):
            bm, bk = (int(s) for s in pattern[len("block") :].split(":")[0].split("x"))
            ws = dense.to_sparse_bsr((bm, bk))
        else:
            ws = dense.to_sparse_csr()
        probe = torch.randn(1, dense.shape[1], dtype=dense.dtype)
        ws @ probe.T
        return ws
    except (RuntimeError, NotImplementedError):
        return None


def measure(pattern: str, out: int, k: int, rows: int, dtype: torch.dtype, bw: float, reps: int) -> dict:
    w, dense = make_weight(pattern, out, k, dtype)
    n_copies = _copies(dense.numel() * dense.element_size())
    x = torch.randn(rows, k).to(dtype)
    ref = F.linear(x.float(), dense.float())
    err = (run_sparse(x, sk.SparseLinear(w)).float() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    dense_args = [(x, dense.clone()) for _ in range(n_copies)]
    t_dense = time_rotating(F.linear, dense_args, reps)
    sparse_args = [(x, sk.SparseLinear(_clone_weight(w))) for _ in range(_copies(w.nbytes()))]
    t_sparse = time_rotating(run_sparse, sparse_args, reps)
    ts = torch_sparse(pattern, dense)
    t_torch = None
    if ts is not None and rows <= 8 or (ts is not None and pattern.startswith("block")):
        t_torch = statistics.median(time_rotating(lambda a: ts @ a.T, [(x,)], max(3, reps // 3)))
    med_d, _, _ = quantiles(t_dense)
    med_s, q20, q80 = quantiles(t_sparse)
    moved = w.nbytes() + 2 * x.numel() * x.element_size() + rows * out * x.element_size()
    return {
        "shape": f"{out}x{k}",
        "pattern": pattern,
        "rows": rows,
        "dtype": str(dtype).replace("torch.", ""),
        "dense_ms": med_d * 1e3,
        "sparse_ms": med_s * 1e3,
        "q20_80": f"{q20 * 1e3:.2f}-{q80 * 1e3:.2f}",
        "speedup": med_d / med_s,
        "torch_sparse": (med_d / t_torch) if t_torch else None,
        "gbs": moved / med_s / 1e9,
        "roofline": (moved / (bw * 1e9)) / med_s if rows <= 8 else None,
        "rel_err": err,
    }


def _clone_weight(w):
    if isinstance(w, sk.BlockSparseWeight):
        return sk.BlockSparseWeight(w.crow_indices.clone(), w.col_indices.clone(), w.blocks.clone(), w.shape)
    return sk.NMSparseWeight(w.values.clone(), w.meta.clone(), w.n, w.m, w.shape)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, fewer repetitions")
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 512])
    ap.add_argument("--patterns", nargs="*", default=list(PATTERNS), help=f"default: {' '.join(PATTERNS)}")
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--shapes", nargs="*", default=None, help="OUTxIN, e.g. 4096x4096 (default: the Llama-7B three)")
    args = ap.parse_args()
    shapes = LLAMA_SHAPES[:1] if args.quick else LLAMA_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    dtypes = [getattr(torch, d) for d in args.dtypes]
    bw = bandwidth_gbs()
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"# git {sha}, cpu isa {cpu_isa()}, measured read bandwidth {bw:.1f} GB/s")
    head = "| shape | pattern | rows | dtype | dense ms | sparse ms (q20-q80) | speedup | torch csr/bsr | GB/s | % roofline |"
    print(head)
    print("|---|---|---|---|---|---|---|---|---|---|")
    for out, k in shapes:
        for pattern in args.patterns:
            for rows in args.rows:
                for dtype in dtypes:
                    reps = (6 if args.quick else 10) if rows > 8 else (20 if args.quick else 40)
                    r = measure(pattern, out, k, rows, dtype, bw, reps)
                    print(
                        f"| {r['shape']} | {r['pattern']} | {r['rows']} | {r['dtype']} | {r['dense_ms']:.2f} | "
                        f"{r['sparse_ms']:.2f} ({r['q20_80']}) | {r['speedup']:.2f}x | "
                        f"{_fmt(r['torch_sparse'], '.2f')}x | {r['gbs']:.1f} | {_fmt(r['roofline'] and 100 * r['roofline'], '.0f')} |",
                        flush=True,
                    )


# -- pytest-benchmark: one small matrix of cases (CI runs it with --benchmark-disable) ---------


@pytest.mark.parametrize("rows", [1, 64])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_bench_sparse(benchmark, pattern, rows):
    w, _ = make_weight(pattern, 1024, 1024, torch.float32)
    x = torch.randn(rows, 1024)
    benchmark(run_sparse, x, sk.SparseLinear(w))


@pytest.mark.parametrize("rows", [1, 64])
def test_bench_dense(benchmark, rows):
    x, dense = torch.randn(rows, 1024), torch.randn(1024, 1024)
    benchmark(F.linear, x, dense)


if __name__ == "__main__":
    main()
