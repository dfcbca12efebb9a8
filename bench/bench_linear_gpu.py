"""Triton N:M and block-sparse linears vs cuBLAS (and torch's 2:4) on a GPU, side by side.

    .venv/bin/python bench/bench_linear_gpu.py bench/results/linear_gpu_<gpu>.json

For the Llama-7B linear shapes (out x K) and 1, 4, 16, 4096 rows of bf16 x, times
  - dense    F.linear(x, W)                                          (cuBLAS)
  - semi24   F.linear(x, to_sparse_semi_structured(W_2:4))           (torch 2:4, where it runs)
  - triton   the sparsekern Triton kernels: 2:4, 1:4, 2:8, block 64x64 at 90 % (--patterns:
             any of these, and quantized values as PATTERN+int8 or PATTERN+int4g128 (g64 for
             64-wide blocks): symmetric round to nearest, per row or per group of columns)
  - cuda 2:4 the sparsekern mma.sp kernel (where the extension was built with CUDA)
Every sparse result is checked against F.linear on the same (masked) weight before timing.
Times are CUDA-event medians with 20/80 % quantiles of interleaved repetitions, each a CUDA
graph of CALLS calls (decode is launch-bound otherwise; real decoders replay graphs too) that
rotates over enough weight copies to exceed L2, so weights stream from HBM as in a model.
Also reports achieved GB/s (bytes that must move), TFLOP/s (dense-equivalent 2*rows*out*K),
% of the memory roofline (copy bandwidth measured in the same run) and speedup vs dense.
A case that fails is recorded with its error; the run goes on. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsekern as sk

SHAPES = {"llama7b.qkvo": (4096, 4096), "llama7b.up": (11008, 4096), "llama7b.down": (4096, 11008)}
ROWS = (1, 4, 16, 4096)
PATTERNS = ("2:4", "1:4", "2:8", "block64x64:0.9")
DTYPE = torch.bfloat16
CALLS = 20  # calls per timed graph replay
L2_FLUSH_BYTES = 256 << 20  # weight copies per case add up to at least this


def _git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, cwd=Path(__file__).parent).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s (read + write), the memory roofline of this run."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * 10 * a.numel() / (start.elapsed_time(end) * 1e-3) / 1e9


def _graph_or_eager(fn):
    """(runner, mode): runner() does CALLS calls; a CUDA graph when capture works."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            for _ in range(CALLS):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        return graph.replay, "graph"
    except Exception:  # noqa: BLE001  (some torch paths cannot be captured; time them eagerly)
        torch.cuda.synchronize()

        def eager():
            for _ in range(CALLS):
                fn()

        return eager, "eager"


def time_fns(fns: dict, reps: int = 30) -> dict[str, dict]:
    """Interleaved timing, ms per call: clock and thermal drift hit every kernel alike."""
    runners = {name: _graph_or_eager(fn) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, (run, _) in runners.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / CALLS)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5)
        out[name] = dict(ms=statistics.median(ts), q20=q[0], q80=q[3], mode=runners[name][1])
    return out


def _rotating(make, copies: int):
    """fn() that calls make(i)() for i = 0, 1, ... copies-1, 0, ... (distinct weights each call)."""
    fns = [make(i) for i in range(copies)]
    state = {"i": 0}

    def fn():
        f = fns[state["i"]]
        state["i"] = (state["i"] + 1) % copies
        return f()

    return fn


def _sparse_weight(dense: torch.Tensor, pattern: str):
    pattern, _, quant = pattern.partition("+")
    if pattern.startswith("block"):
        size, sparsity = pattern[len("block") :].split(":")
        bm, bk = (int(v) for v in size.split("x"))
        w = sk.BlockSparseWeight.from_dense(dense, block=(bm, bk), sparsity=float(sparsity))
    else:
        n, m = (int(v) for v in pattern.split(":"))
        w = sk.NMSparseWeight.from_dense(dense, n=n, m=m, prune=True)
    if quant:  # int8 (per row) or int4g128 (per group of 128 columns)
        kind, _, group = quant.partition("g")
        w = w.quantize(kind, int(group or 0)).to(dense.dtype)
    return w


def _triton_call(x, w):
    """The Triton wrapper on pre-checked tensors (what the op runs after its Python checks)."""
    if isinstance(w, sk.BlockSparseWeight):
        from sparsekern.kernels.bsr_linear import bsr_linear

        return lambda: bsr_linear(x, w.crow_indices, w.col_indices, w.blocks, None, w.scales, w.zeros)
    from sparsekern.kernels.nm_linear import nm_linear

    return lambda: nm_linear(x, w.values, w.meta, w.n, w.m, None, w.scales, w.zeros, w.group_size or 0)


def _max_rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def bench_case(name, out_f, k, rows, bw_gbs, patterns=PATTERNS) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
    dense = torch.randn(out_f, k, device="cuda", dtype=DTYPE)
    dense_bytes = dense.numel() * dense.element_size()
    copies = max(1, min(8, math.ceil(L2_FLUSH_BYTES / dense_bytes)))
    dense_ws = [torch.randn_like(dense) for _ in range(copies)]
    fns = {"dense": _rotating(lambda i: lambda: F.linear(x, dense_ws[i]), copies)}
    moved = {"dense": dense_bytes}
    errors, checks = {}, {}
    for pattern in patterns:
        label = f"triton {pattern}"
        try:
            ws = [_sparse_weight(d, pattern) for d in [dense, *dense_ws[1:]]]
            ref = F.linear(x, ws[0].to_dense().to(DTYPE))
            with sk.use_backend("triton"):
                checks[label] = _max_rel_err(
                    sk.ops.nm_linear(x, ws[0]) if pattern[0] != "b" else sk.ops.bsr_linear(x, ws[0]), ref
                )
            fns[label] = _rotating(lambda i, ws=ws: _triton_call(x, ws[i]), copies)
            moved[label] = ws[0].nbytes()
        except Exception as exc:  # noqa: BLE001
            errors[label] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        if pattern == "2:4":
            try:
                from torch.sparse import to_sparse_semi_structured

                masked = [w.to_dense() for w in ws]
                semi = [to_sparse_semi_structured(d) for d in masked]
                checks["semi24"] = _max_rel_err(F.linear(x, semi[0]), ref)
                fns["semi24"] = _rotating(lambda i, semi=semi: lambda: F.linear(x, semi[i]), copies)
                moved["semi24"] = ws[0].nbytes()
            except Exception as exc:  # noqa: BLE001
                errors["semi24"] = f"{type(exc).__name__}: {exc}"
            try:  # the CUDA mma.sp kernel, where the extension was built with CUDA
                from sparsekern.backends import cuda as cuda_backend

                if cuda_backend.has_kernel():
                    hw = [cuda_backend.hw_weight(w.values, w.meta) for w in ws]
                    mma = torch.ops.sparsekern._nm24_mma
                    checks["cuda 2:4"] = _max_rel_err(mma(x, *hw[0], out_f, None), ref)
                    fns["cuda 2:4"] = _rotating(lambda i, hw=hw, mma=mma: lambda: mma(x, *hw[i], out_f, None), copies)
                    moved["cuda 2:4"] = ws[0].nbytes()
            except Exception as exc:  # noqa: BLE001
                errors["cuda 2:4"] = f"{type(exc).__name__}: {exc}"
    times = time_fns(fns)
    rows_out = []
    flops = 2 * rows * out_f * k
    io = (rows * k + rows * out_f) * x.element_size()
    for label in [*fns, *errors]:
        row = dict(shape=name, out=out_f, k=k, rows=rows, dtype=str(DTYPE).replace("torch.", ""), kernel=label)
        if label in times:
            t = times[label]
            gbs = (moved[label] + io) / (t["ms"] * 1e-3) / 1e9
            row.update(t, gbs=gbs, tflops=flops / (t["ms"] * 1e-3) / 1e12, roofline_pct=100 * gbs / bw_gbs)
            row.update(speedup=times["dense"]["ms"] / t["ms"], max_rel_err=checks.get(label))
        else:
            row["error"] = errors[label]
        rows_out.append(row)
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "out", nargs="?", default=None, help="JSON output path (default bench/results/linear_gpu_<gpu>.json)"
    )
    ap.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated (default: %(default)s)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated (default: %(default)s)")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated (default: %(default)s)")
    args = ap.parse_args()
    patterns = tuple(args.patterns.split(","))
    shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    rows_list = tuple(int(r) for r in args.rows.split(","))
    if not torch.cuda.is_available():
        raise SystemExit("bench_linear_gpu: needs a CUDA GPU")
    import triton

    device = torch.cuda.get_device_name()
    out_path = Path(args.out or f"bench/results/linear_gpu_{device.replace(' ', '_')}.json")
    bw = copy_bandwidth()
    meta = dict(
        device=device, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, git_sha=_git_sha(),
        date=time.strftime("%Y-%m-%d %H:%M:%S"), host=platform.node(), copy_bandwidth_gbs=bw, calls_per_replay=CALLS,
    )  # fmt: skip
    print(f"{device}  torch {torch.__version__}  triton {triton.__version__}  copy bandwidth {bw:.0f} GB/s")
    print(
        f"{'shape':14} {'rows':>5} {'kernel':22} {'ms':>9} {'q20':>9} {'q80':>9} {'GB/s':>7} {'TFLOP/s':>8} {'%roof':>6} {'x dense':>8} {'err':>8}"
    )
    results = []
    for name, (out_f, k) in shapes.items():
        for rows in rows_list:
            try:
                case = bench_case(name, out_f, k, rows, bw, patterns)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                case = [dict(shape=name, out=out_f, k=k, rows=rows, kernel="*", error=f"{type(exc).__name__}: {exc}")]
            for r in case:
                if "error" in r:
                    print(f"{name:14} {rows:5} {r['kernel']:22} ERROR {r['error'][:80]}")
                else:
                    err = "" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
                    print(
                        f"{name:14} {rows:5} {r['kernel']:22} {r['ms']:9.4f} {r['q20']:9.4f} {r['q80']:9.4f}"
                        f" {r['gbs']:7.0f} {r['tflops']:8.1f} {r['roofline_pct']:6.1f} {r['speedup']:8.2f} {err:>8}"
                    )
            results += case
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(dict(meta=meta, rows=results), indent=1))  # partial results survive a crash
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
