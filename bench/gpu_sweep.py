"""Where a Triton decode linear spends its time on a GPU, and which split / config is fastest.

    python3 bench/gpu_sweep.py OUT.json

For the Llama-7B shapes at 1 and 16 rows of bf16 x, 2:4 and block 64x64 at 90 %, times (CUDA
graphs of 20 calls over rotating weight copies, as bench_linear_gpu.py) of
  - dense         F.linear (cuBLAS)
  - op            the whole Triton wrapper (kernel + split-K reduce + NaN/Inf pass)
  - no-nan        the wrapper without the NaN/Inf pass (kernels/nonfinite.py)
  - nan-pass      the NaN/Inf pass alone
  - split=S       no-nan with the split count forced to S
  - cfg=...       no-nan with one config pinned: the tuner's, then a few outside its lists
Every variant's output is checked against F.linear on the masked weight before it is timed.
First, the host (CPU) microseconds per eager call of each piece at decode: what a decode loop
without CUDA graphs pays.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from bench_linear_gpu import _max_rel_err, _rotating, _sparse_weight, time_fns

import sparsekern as sk
from sparsekern.kernels import _common as kc
from sparsekern.kernels import bsr_linear as kb
from sparsekern.kernels import nm_linear as kn
from sparsekern.kernels import nonfinite as nf

SHAPES = {"llama7b.qkvo": (4096, 4096), "llama7b.up": (11008, 4096), "llama7b.down": (4096, 11008)}
ROWS = (1, 16)
PATTERNS = ("2:4", "block64x64:0.9")
SPLITS = (1, 2, 4, 8, 16)
DTYPE = torch.bfloat16


@contextlib.contextmanager
def patched(no_nan: bool = False, split: int | None = None):
    saved = (kn.nm_nonfinite_, kb.bsr_nonfinite_, kn.splits_for, kb.splits_for)
    if no_nan:
        kn.nm_nonfinite_ = lambda x, meta, n, m, y: y
        kb.bsr_nonfinite_ = lambda x, crow, col, block, y: y
    if split is not None:
        kn.splits_for = kb.splits_for = lambda programs, tiles, device: split
    try:
        yield
    finally:
        kn.nm_nonfinite_, kb.bsr_nonfinite_, kn.splits_for, kb.splits_for = saved


def _call(x, w, config=None):
    if isinstance(w, sk.BlockSparseWeight):
        return lambda: kb.bsr_linear(x, w.crow_indices, w.col_indices, w.blocks, config=config)
    return lambda: kn.nm_linear(x, w.values, w.meta, w.n, w.m, config=config)


def _under(fn, **patch):
    def run():
        with patched(**patch):
            return fn()

    return run


def _configs(w, rows):
    bucket = kc.rows_bucket(rows)
    if isinstance(w, sk.BlockSparseWeight):
        return kb.bsr_configs(min(bucket, 4096), 64, 64, 2)
    if rows <= kn.GEMV_MAX_ROWS:
        return kn.nm_gemv_configs(bucket)
    return kn.nm_gemm_configs(min(bucket, 4096), 2)


def _extra_configs(w, rows):
    """Configs outside the tuner's lists: more / fewer warps and narrower or wider output tiles,
    to see whether decode is short of parallel work (the tuner's gemv uses 4 warps, 16-32 rows)."""
    bucket = kc.rows_bucket(rows)
    if isinstance(w, sk.BlockSparseWeight):
        if bucket > 16:
            return []
        tile = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}
        return [triton.Config(tile, num_warps=wp, num_stages=st) for wp, st in ((2, 3), (8, 3), (4, 2), (4, 5))]
    if rows > kn.GEMV_MAX_ROWS:
        return []
    out = []
    for block_n, warps in ((8, 4), (8, 2), (16, 2), (16, 8), (32, 8), (64, 4)):
        block_j = 16 * 32 * warps // bucket // block_n  # 16 fp32 products per thread, as the tuner's
        out.append(triton.Config({"BLOCK_N": block_n, "BLOCK_J": block_j}, num_warps=warps, num_stages=3))
    return out


def _nan_pass(x, w, y):
    if isinstance(w, sk.BlockSparseWeight):
        return lambda: nf.bsr_nonfinite_(x, w.crow_indices, w.col_indices, (64, 64), y)
    return lambda: nf.nm_nonfinite_(x, w.meta, w.n, w.m, y)


def sweep_case(name, out_f, k, rows, pattern):
    torch.manual_seed(0)
    x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
    dense = torch.randn(out_f, k, device="cuda", dtype=DTYPE)
    copies = max(1, min(8, math.ceil((256 << 20) / (dense.numel() * 2))))
    dws = [dense, *(torch.randn_like(dense) for _ in range(copies - 1))]
    ws = [_sparse_weight(d, pattern) for d in dws]
    ref = F.linear(x, ws[0].to_dense())
    y = torch.empty(rows, out_f, device="cuda", dtype=DTYPE)
    fns = {"dense": _rotating(lambda i: lambda: F.linear(x, dws[i]), copies)}
    fns["op"] = _rotating(lambda i: _call(x, ws[i]), copies)
    fns["no-nan"] = _under(_rotating(lambda i: _call(x, ws[i]), copies), no_nan=True)
    fns["nan-pass"] = _rotating(lambda i: _nan_pass(x, ws[i], y), copies)
    for s in SPLITS:
        fns[f"split={s}"] = _under(_rotating(lambda i: _call(x, ws[i]), copies), no_nan=True, split=s)
    for cfg in [*_configs(ws[0], rows), *_extra_configs(ws[0], rows)]:
        label = "cfg=" + ",".join(f"{k}{v}" for k, v in cfg.kwargs.items()) + f",w{cfg.num_warps},s{cfg.num_stages}"
        fns[label] = _under(_rotating(lambda i, cfg=cfg: _call(x, ws[i], cfg), copies), no_nan=True)
    errs = {}
    for label, fn in list(fns.items()):
        if label in ("dense", "nan-pass"):
            continue
        try:
            err = _max_rel_err(fn(), ref)
        except Exception as exc:  # noqa: BLE001
            print(f"{name} {rows} {pattern} {label}: {type(exc).__name__}: {exc}")
            fns.pop(label)
            continue
        errs[label] = err
        if not err < 2e-2:
            print(f"{name} {rows} {pattern} {label}: max rel err {err:.2e}; not timed")
            fns.pop(label)
    times = time_fns(fns)
    out = []
    for label, t in times.items():
        row = dict(shape=name, out=out_f, k=k, rows=rows, pattern=pattern, variant=label, **t)
        row.update(speedup=times["dense"]["ms"] / t["ms"], max_rel_err=errs.get(label))
        out.append(row)
        print(f"{name:13} {rows:3} {pattern:15} {label:44} {t['ms'] * 1e3:8.2f} us  x{row['speedup']:.2f}")
    return out


def _cpu_us(fn, calls: int = 300) -> float:
    """Host microseconds per eager call (launches are asynchronous: this is the CPU's share)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return best


def launch_costs() -> list[dict]:
    """Eager host cost per call of each piece at decode (llama7b.qkvo, 1 row): without CUDA graphs
    a decode step pays these, and the GPU work of these shapes is 6-30 us."""
    x = torch.randn(1, 4096, device="cuda", dtype=DTYPE)
    dense = torch.randn(4096, 4096, device="cuda", dtype=DTYPE)
    out = []
    for pattern in PATTERNS:
        w = _sparse_weight(dense, pattern)
        y = torch.empty(1, 4096, device="cuda", dtype=DTYPE)
        bsr = isinstance(w, sk.BlockSparseWeight)
        op = sk.ops.bsr_linear if bsr else sk.ops.nm_linear
        cfg = _configs(w, 1)[0]

        def forced(op=op, w=w):
            with sk.use_backend("triton"):
                return op(x, w)

        ws = torch.zeros(2, 1, 4096, device="cuda", dtype=torch.float32)
        pieces = {
            "F.linear": lambda: F.linear(x, dense),
            "public op, auto": lambda op=op, w=w: op(x, w),
            "public op, triton forced": forced,
            "kernel wrapper (autotuner)": _call(x, w),
            "kernel wrapper, config pinned": _call(x, w, cfg),
            "wrapper, no NaN pass": _under(_call(x, w), no_nan=True),
            "NaN pass alone": _nan_pass(x, w, y),
            "split-K reduce alone": lambda ws=ws, y=y: kc.splitk_reduce(ws, None, y),
            "torch.empty": lambda: torch.empty(2, 1, 4096, device="cuda"),
        }
        for label, fn in pieces.items():
            try:
                us = _cpu_us(fn)
            except Exception as exc:  # noqa: BLE001
                print(f"launch {pattern} {label}: {type(exc).__name__}: {exc}")
                continue
            out.append(dict(pattern=pattern, piece=label, host_us=us))
            print(f"launch {pattern:15} {label:32} {us:8.1f} us host")
    return out


def main() -> None:
    out_path = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_sweep.json")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    rows_out = []
    launch = launch_costs()
    out_path.write_text(json.dumps(dict(meta=meta, launch=launch, rows=rows_out), indent=1))
    for pattern in PATTERNS:
        for name, (out_f, k) in SHAPES.items():
            for rows in ROWS:
                try:
                    rows_out += sweep_case(name, out_f, k, rows, pattern)
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
                out_path.write_text(json.dumps(dict(meta=meta, launch=launch, rows=rows_out), indent=1))


if __name__ == "__main__":
    main()
