"""Issue 13: a dispatch decision made while another process holds a core must not stick.

    .venv/bin/python bench/bench_busy_start.py [--out bench/results/NAME.json]

With an empty dispatch cache (a temporary SPARSEKERN_CACHE_DIR), for every case of
``sparsekern bench --quick``'s layer suite (Llama-7B attn / up, 1 and 512 rows, fp32, each
sparse pattern):
  1. busy: a spinning process runs on the machine while each case's SparseLinear makes its first
     call, which measures the candidates and stores the choice (``pick_busy``);
  2. the busy process stops; each layer runs ``--calls`` more calls as a model would (the drift
     check samples 1 call in 64 and re-measures after two samples more than 2x off), and the
     choice is read again (``pick_after``);
  3. quiet: the layer (auto, as a model runs it) and every backend it could use (called directly)
     are timed call by call in turn, in two orders (the layer first, then last; medians averaged:
     a call right after the dense backend's pays for it); ``auto / best`` is the target (<= 1.10).
Run it alone: the spinning process is the only load it means to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("SPARSEKERN_CACHE_DIR", tempfile.mkdtemp(prefix="sk-busy-start-"))

import sparsekern as sk  # noqa: E402  (after the cache directory is chosen)
from sparsekern import dispatch  # noqa: E402
from sparsekern.bench.layer import QUICK_PATTERNS, QUICK_ROWS, QUICK_SHAPES, SHAPES, _clone, _compress, _parts  # noqa: E402
from sparsekern.bench.timing import FULL, copies_to_flush, measure_interleaved  # noqa: E402

SPIN = "import time\nend = time.time() + 600\nwhile time.time() < end: pass\n"


def _cases():
    for name in QUICK_SHAPES:
        for rows in QUICK_ROWS:
            for pattern in QUICK_PATTERNS:
                if pattern != "dense":
                    yield name, rows, pattern


def _build(name, rows, pattern):
    out_f, k = SHAPES[name]
    torch.manual_seed(0)
    w = _compress(torch.randn(out_f, k), pattern)
    ws = [w] + [_clone(w) for _ in range(copies_to_flush(w.nbytes(), torch.device("cpu")) - 1)]
    xs = [torch.randn(rows, k) for _ in range(copies_to_flush(rows * k * 4, torch.device("cpu"), 4))]
    layers = [sk.SparseLinear(v) for v in ws]
    return ws, xs, layers


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = dict((k.strip(), v) for k, v in (line.split(":", 1) for line in f if ":" in line))
        return f"{info['model name'].strip()} (family {info['cpu family'].strip()} model {info['model'].strip()})"
    except (OSError, KeyError):
        return platform.machine()


def _op(w) -> str:
    return "nm_linear" if isinstance(w, sk.NMSparseWeight) else "bsr_linear"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--calls", type=int, default=200, help="calls per layer after the busy process stops")
    args = ap.parse_args()
    built = {case: _build(*case) for case in _cases()}
    rows_out = []
    busy = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        time.sleep(0.5)
        with torch.no_grad():
            for case, (ws, xs, layers) in built.items():
                layers[0](xs[0])  # the first call measures and stores the choice
                pick = dispatch.select(_op(ws[0]), xs[0], *_parts(ws[0])).backend
                rows_out.append(dict(shape=case[0], rows=case[1], pattern=case[2], pick_busy=pick))
                print(f"busy   {case[0]:13} {case[1]:4} {case[2]:18} -> {pick}", flush=True)
    finally:
        busy.kill()
        busy.wait()
    time.sleep(1.0)
    with torch.no_grad():
        for row, (case, (ws, xs, layers)) in zip(rows_out, built.items(), strict=True):
            for i in range(args.calls):
                layers[i % len(layers)](xs[i % len(xs)])
            row["pick_after"] = dispatch.select(_op(ws[0]), xs[0], *_parts(ws[0])).backend
            impls = {b: i for b, i in dispatch.implementations(_op(ws[0])).items() if b != "reference"}
            impls = {b: i for b, i in impls.items() if i.supports(xs[0], *_parts(ws[0])) is None}
            # Each variant starts its rotation elsewhere: in a round, no variant reads a weight the
            # one before it just brought into the cache (that made small weights look faster).
            n = max(len(xs), len(ws))
            shift = [j * n // (len(impls) + 1) for j in range(len(impls) + 1)]
            variants = [(torch.nn.Module.__call__, [(layers[i % len(ws)], xs[i % len(xs)]) for i in range(n)])]
            variants += [
                (impl.fn, [(xs[(i + s) % len(xs)], *_parts(ws[(i + s) % len(ws)])) for i in range(n)])
                for impl, s in zip(impls.values(), shift[1:], strict=True)
            ]
            # Whatever runs right after the dense backend's call (a 64 MB F.linear) pays 10-30 % at
            # 1 row, so each variant is timed in two orders, the layer first and last, and the two
            # medians averaged.
            first = measure_interleaved(variants, torch.device("cpu"), FULL)
            last = measure_interleaved(variants[1:] + variants[:1], torch.device("cpu"), FULL)
            last = last[-1:] + last[:-1]
            times = [(a.median_ms + b.median_ms) / 2 for a, b in zip(first, last, strict=True)]
            row["auto_ms"] = times[0]
            row["auto_ms_by_order"] = [first[0].median_ms, last[0].median_ms]
            row["forced_ms"] = dict(zip(impls, times[1:], strict=True))
            best = min(row["forced_ms"], key=row["forced_ms"].get)
            row.update(best=best, ratio=row["auto_ms"] / row["forced_ms"][best])
            print(
                f"quiet  {case[0]:13} {case[1]:4} {case[2]:18} busy pick {row['pick_busy']:5} after {row['pick_after']:5}"
                f" best {best:5}  auto {row['auto_ms']:8.3f} ms  auto/best {row['ratio']:.2f}",
                flush=True,
            )
    ok = sum(r["ratio"] <= 1.10 for r in rows_out)
    print(f"auto within 10% of the best forced backend: {ok}/{len(rows_out)} cases")
    meta = dict(cpu=_cpu_model(), threads=torch.get_num_threads(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"), torch=torch.__version__, calls_after=args.calls)  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows_out), indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
