"""Presenting a run: rich tables, the promise check, ``--compare``, and the PNG plots."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from sparsekern.bench.common import PROMISE

_GROUP = ("suite", "case", "rows", "pattern")


def _key(row: dict) -> tuple:
    return tuple(row.get(k) for k in _GROUP)


def _fmt_x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _grouped(rows: list[dict], suite: str) -> dict[tuple, dict[str, dict]]:
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r.get("suite") == suite:
            groups[_key(r)][r["backend"]] = r
    return groups


def _speed_table(title: str, groups, dense_name: str):
    from rich.table import Table

    names = sorted({b for g in groups.values() for b in g if b not in (dense_name, "auto")})
    t = Table(title=title, header_style="bold")
    for col in ("case", "rows", "pattern", f"{dense_name} ms", *names, "auto pick", "swapped", "%roof best"):
        t.add_column(col, justify="left" if col in ("case", "pattern", "auto pick") else "right")
    for (_, case, rows, pattern), g in groups.items():
        dense = g.get(dense_name)
        auto = g.get("auto")
        measured = [r for b, r in g.items() if b != dense_name or pattern in ("dense", None)]
        best = max(measured, key=lambda r: r["roof_pct"], default=None)
        swapped = "-"
        if auto is not None and auto.get("speedup") is not None:
            ok = auto["speedup"] >= PROMISE
            swapped = f"[{'green' if ok else 'red'}]{auto['speedup']:.2f}x[/]"
        t.add_row(
            str(case),
            str(rows),
            str(pattern),
            f"{dense['median_ms']:.3f}" if dense else "-",
            *(_fmt_x(g[n].get("speedup")) if n in g else "" for n in names),
            auto.get("auto_pick", "-") if auto else "-",
            swapped,
            f"{best['roof_pct']:.0f}% {best['backend']}" if best else "-",
        )
    return t


def promise_summary(res: dict) -> tuple[int, int, list[str]]:
    """(swapped layer rows at >= 0.95x dense, all swapped layer rows, the failing ones)."""
    autos = [r for r in res["rows"] if r.get("suite") == "layer" and r.get("kind") == "auto"]
    bad = [
        f"{r['case']} rows={r['rows']} {r['pattern']}: {r['speedup']:.2f}x ({r.get('auto_pick')})"
        for r in autos
        if not r.get("promise_ok")
    ]
    return len(autos) - len(bad), len(autos), bad


def print_results(res: dict, console) -> None:
    from rich.table import Table

    meta, roof = res["meta"], res["roofline"]
    console.print(
        f"[bold]{meta['device_name']}[/]  torch {meta['torch']}  sparsekern {meta['sparsekern']}  git {meta['git_sha'][:12]}"
        f"  {meta['date']}  dtype {meta['dtype']}  threads {meta['threads']}"
    )
    console.print(
        f"measured roofline: {roof['bandwidth_gbs']:.1f} GB/s copy, {roof['peak_tflops'] * 1e3:.1f} GFLOP/s matmul ({roof['dtype']})"
    )
    layer = _grouped(res["rows"], "layer")
    if layer:
        console.print(_speed_table("layer suite: speedup vs torch dense (F.linear)", layer, "torch-dense"))
        ok, total, bad = promise_summary(res)
        colour = "green" if not bad else "red"
        console.print(f"[{colour}]promise: {ok}/{total} swapped layer shapes at >= {PROMISE}x dense[/]")
        for line in bad:
            console.print(f"  [red]below[/] {line}")
    attn = _grouped(res["rows"], "attention")
    if attn:
        console.print(_speed_table("attention suite: speedup vs SDPA over all keys", attn, "sdpa"))
    models = [r for r in res["rows"] if r.get("suite") == "model"]
    if models:
        t = Table(title="model suite", header_style="bold")
        for col in ("model", "variant", "prefill ms", "prefill x", "decode tok/s", "decode x", "weights MB", "peak MB"):
            t.add_column(col, justify="left" if col in ("model", "variant") else "right")
        for r in models:
            t.add_row(
                r["case"], r["pattern"], f"{r['median_ms']:.1f}", _fmt_x(r.get("speedup")), f"{r['decode_tokens_per_s']:.1f}",
                _fmt_x(r.get("decode_speedup")), f"{r['weights_mb']:.0f}", "-" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}",
            )  # fmt: skip
        console.print(t)
    for note in res.get("notes", []):
        console.print(f"[yellow]note[/]: {note}")
    for kind, path in res.get("files", {}).items():
        console.print(f"wrote {kind}: {path}")


def compare_rows(new: dict, old: dict) -> list[dict]:
    """Rows present in both runs (same suite, case, rows, pattern, backend, dtype), new vs old."""

    def ident(r):
        return (*_key(r), r.get("backend"), r.get("dtype"))

    before = {ident(r): r for r in old["rows"]}
    out = []
    for r in new["rows"]:
        o = before.get(ident(r))
        if o is None or not o.get("median_ms") or not r.get("median_ms"):
            continue
        out.append({
            "ident": ident(r),
            "old_ms": o["median_ms"],
            "new_ms": r["median_ms"],
            "time_ratio": r["median_ms"] / o["median_ms"],
            "old_speedup": o.get("speedup"),
            "new_speedup": r.get("speedup"),
        })  # fmt: skip
    return out


def print_compare(new: dict, old: dict, console) -> list[dict]:
    from rich.table import Table

    diffs = compare_rows(new, old)
    om = old["meta"]
    console.print(
        f"compare with {om.get('device_name')} git {om.get('git_sha', '')[:12]} {om.get('date')}: "
        f"{len(diffs)} matching rows, new/old median time (< 1: faster now)"
    )
    t = Table(header_style="bold")
    for col in ("suite", "case", "rows", "pattern", "backend", "old ms", "new ms", "new/old time", "old x", "new x"):
        t.add_column(col, justify="right" if col.endswith(("ms", "time", "x")) or col == "rows" else "left")
    for d in diffs:
        suite, case, rows, pattern, backend, _ = d["ident"]
        ratio = d["time_ratio"]
        colour = "green" if ratio < 0.95 else "red" if ratio > 1.05 else "white"
        t.add_row(
            str(suite), str(case), str(rows), str(pattern), str(backend), f"{d['old_ms']:.3f}", f"{d['new_ms']:.3f}",
            f"[{colour}]{ratio:.2f}[/]", _fmt_x(d["old_speedup"]), _fmt_x(d["new_speedup"]),
        )  # fmt: skip
    console.print(t)
    if not diffs:
        console.print("[yellow]compare: no rows in common with the old run[/]")
    return diffs


def _geomean(vals: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def plot(res: dict, stem: Path) -> dict:
    """Speedup vs rows per pattern, and the roofline; returns {"speedup_png": ..., "roofline_png": ...}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    meta, roof = res["meta"], res["roofline"]
    layer = [r for r in res["rows"] if r.get("suite") == "layer" and r.get("speedup") and r["pattern"] != "dense"]
    patterns = sorted({r["pattern"] for r in layer})
    if patterns:
        cols = min(3, len(patterns))
        nrows = math.ceil(len(patterns) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
        for ax, pattern in zip(axes.flat, patterns):
            series: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
            for r in layer:
                if r["pattern"] == pattern:
                    series[r["backend"]][r["rows"]].append(r["speedup"])
            for backend, pts in sorted(series.items()):
                xs = sorted(pts)
                style = dict(linewidth=2.5, color="black") if backend == "auto" else {}
                ax.plot(xs, [_geomean(pts[x]) for x in xs], marker="o", label=backend, **style)
            ax.axhline(1.0, color="grey", linewidth=1)
            ax.axhline(PROMISE, color="red", linewidth=0.8, linestyle="--")
            ax.set_xscale("log", base=2)
            ticks = sorted({x for pts in series.values() for x in pts})
            ax.set_xticks(ticks, [str(x) for x in ticks])
            ax.set_yscale("log")
            ax.set_title(pattern)
            ax.set_xlabel("rows of x")
            ax.set_ylabel("speedup vs dense (geomean over shapes)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(patterns) :]:
            ax.axis("off")
        fig.suptitle(f"sparsekern layer speedup, {meta['device_name']} ({meta['dtype']}, {meta['date'][:10]})")
        fig.tight_layout()
        files["speedup_png"] = str(stem) + "-speedup.png"
        fig.savefig(files["speedup_png"], dpi=110)
        plt.close(fig)

    pts = [r for r in res["rows"] if r.get("suite") in ("layer", "attention") and r.get("gbs")]
    if pts:
        fig, ax = plt.subplots(figsize=(7, 5))
        ai = [r["tflops"] * 1e3 / r["gbs"] for r in pts]  # FLOP per byte
        lo, hi = min(ai) / 2, max(ai) * 2
        grid = [lo * (hi / lo) ** (i / 100) for i in range(101)]
        ax.plot(
            grid,
            [min(roof["peak_tflops"], roof["bandwidth_gbs"] * a / 1e3) for a in grid],
            color="black",
            label="measured roofline",
        )
        by_backend = defaultdict(list)
        for r, a in zip(pts, ai):
            by_backend[r["backend"]].append((a, r["tflops"]))
        for backend, xy in sorted(by_backend.items()):
            ax.scatter([p[0] for p in xy], [p[1] for p in xy], s=18, label=backend, alpha=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (useful FLOP / byte of the sparse format)")
        ax.set_ylabel("achieved TFLOP/s (useful)")
        ax.set_title(
            f"measured roofline: {roof['bandwidth_gbs']:.1f} GB/s, {roof['peak_tflops'] * 1e3:.0f} GFLOP/s, {meta['device_name']}",
            fontsize=9,
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        files["roofline_png"] = str(stem) + "-roofline.png"
        fig.savefig(files["roofline_png"], dpi=110)
        plt.close(fig)
    return files
