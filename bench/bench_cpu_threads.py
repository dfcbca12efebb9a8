"""CPU kernels' threads on a machine that is not all theirs: hot, first call after idle, and with
a busy competing process, vs dense ``F.linear`` in the same conditions.

``python bench/bench_cpu_threads.py [--reps 30] [--idle-ms 200]`` prints one row per case:
2:4 (4096x4096, 11008x4096) and block32x32 90% (4096x4096), fp32, 1 row of x, raw CPU kernel
(``torch.ops.sparsekern._*_cpu``, no dispatch) and ``F.linear``:

- hot: minimum of back-to-back calls;
- idle: median of calls each made ``--idle-ms`` after the previous one (helper threads asleep);
- busy: median of hot calls while one busy-loop subprocess spins (it stops itself after
  ``--busy-s`` seconds, or when this script ends);
- cold: median of calls each made right after a single-threaded ``memset`` of 256 MiB, which
  evicts the caches without sleeping: what idle costs that no thread runtime can save (a weight
  that fit in the caches when hot comes from memory again). ``--threads 1`` shows the same
  without a second thread.

"x" columns: dense time / sparse time in the same condition. Targets (issue 13): idle <= 1.3x hot; 2:4 fp32 decode under one busy process >= 1.8x dense.
Run it on a quiet machine; on a shared one the numbers mean little.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import sparsekern as sk

CASES = (("2:4", 4096, 4096), ("2:4", 11008, 4096), ("block32x32:0.9", 4096, 4096))
# Pinned to the last CPU this process may use ("the other core" of a 2-core machine).
BUSY_LOOP = (
    "import os, sys, time\n"
    "os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "while time.monotonic() < end: pass\n"
)


def make_case(pattern: str, out: int, k: int):
    """(sparse kernel call, dense call) for one row of fp32 x."""
    dense = torch.randn(out, k)
    x = torch.randn(1, k)
    if pattern.startswith("block"):
        shape, sparsity = pattern[len("block") :].split(":")
        bm, bk = (int(s) for s in shape.split("x"))
        w = sk.BlockSparseWeight.from_dense(dense, block=(bm, bk), sparsity=float(sparsity))
        args = (x, w.crow_indices, w.col_indices, w.blocks, None)
        sparse = lambda: torch.ops.sparsekern._bsr_linear_cpu(*args)  # noqa: E731
    else:
        n, m = (int(s) for s in pattern.split(":"))
        w = sk.NMSparseWeight.from_dense(dense, n=n, m=m, prune=True)
        args = (x, w.values, w.meta, n, m, None)
        sparse = lambda: torch.ops.sparsekern._nm_linear_cpu(*args)  # noqa: E731
    wd = w.to_dense()
    return sparse, lambda: F.linear(x, wd)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def hot(fn, reps: int) -> list[float]:
    for _ in range(3):
        fn()
    return [timed(fn) for _ in range(reps)]


def after_sweep(fn, reps: int, sweep: bytearray) -> list[float]:
    fn()
    addr = ctypes.addressof(ctypes.c_char.from_buffer(sweep))
    times = []
    for i in range(reps):
        ctypes.memset(addr, i & 0xFF, len(sweep))
        times.append(timed(fn))
    return times


def after_idle(fn, reps: int, idle_s: float) -> list[float]:
    fn()
    times = []
    for _ in range(reps):
        time.sleep(idle_s)
        times.append(timed(fn))
    return times


class BusyProcess:
    """One spinning Python process; ends itself after busy_s even if this script dies."""

    def __init__(self, busy_s: float):
        self.proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(busy_s)])
        time.sleep(0.3)  # let it start spinning

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--idle-ms", type=float, default=200.0)
    ap.add_argument("--busy-s", type=float, default=120.0, help="upper bound on the busy process's life")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: as it is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sweep = bytearray(256 << 20)
    if not sk.HAS_C_EXT:
        raise SystemExit("sparsekern._C is not built: nothing to measure")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, reps {args.reps}")
    head = f"{'case':<28}{'':>8}{'hot ms':>9}{'idle ms':>9}{'idle/hot':>9}{'cold ms':>9}{'cold/hot':>9}{'busy ms':>9}"
    print(head + f"{'hot x':>8}{'idle x':>8}{'busy x':>8}")
    for pattern, out, k in CASES:
        sparse, dense = make_case(pattern, out, k)
        rows = {}
        for name, fn in (("sparse", sparse), ("dense", dense)):
            h = min(hot(fn, args.reps))
            idle = statistics.median(after_idle(fn, max(5, args.reps // 3), args.idle_ms / 1e3))
            cold = statistics.median(after_sweep(fn, max(5, args.reps // 3), sweep))
            rows[name] = (h, idle, cold)
        with BusyProcess(args.busy_s):
            for name, fn in (("sparse", sparse), ("dense", dense)):
                rows[name] += (statistics.median(hot(fn, args.reps)),)
        (sh, si, _, sb), (dh, di, _, db) = rows["sparse"], rows["dense"]
        label = f"{pattern} {out}x{k}"
        for name, (h, i, c, b) in rows.items():
            line = f"{label:<28}{name:>8}{h * 1e3:>9.3f}{i * 1e3:>9.3f}{i / h:>9.2f}{c * 1e3:>9.3f}{c / h:>9.2f}{b * 1e3:>9.3f}"
            if name == "sparse":
                line += f"{dh / sh:>8.2f}{di / si:>8.2f}{db / sb:>8.2f}"
            print(line)
            label = ""


if __name__ == "__main__":
    main()
