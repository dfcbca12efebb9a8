"""What every suite shares: the run context, one case, and turning a timing into a result row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sparsekern import dispatch
from sparsekern.bench.roofline import Roofline
from sparsekern.bench.timing import Budget, Timing, measure

# A swapped layer (auto dispatch incl. the dense fallback) must run at >= this fraction of dense.
PROMISE = 0.95


@dataclass
class Context:
    device: torch.device
    dtype: torch.dtype
    budget: Budget
    roof: Roofline
    quick: bool = False
    tune: bool = False
    # Backends to time (None: every registered one that supports the arguments).
    backends: tuple[str, ...] | None = None
    # Per-suite scratch (the dense weight of the current shape, its compressed forms...).
    scratch: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        # One line: torch's dispatcher errors run to dozens of lines.
        text = text.splitlines()[0][:240] if text else text
        if text not in self.notes:
            self.notes.append(text)

    def wants(self, backend: str) -> bool:
        return self.backends is None or backend in self.backends


@dataclass(frozen=True)
class Case:
    suite: str
    label: str
    run: Callable[[Context], list[dict]]


def result_row(
    base: dict,
    backend: str,
    kind: str,
    timing: Timing,
    flops: float,
    nbytes: float,
    ctx: Context,
    dense_ms: float | None,
) -> dict:
    """One JSON row: the timing plus achieved TFLOP/s, GB/s, % of roofline and speedup vs dense."""
    s = timing.median_ms / 1e3
    row = {
        **base,
        "backend": backend,
        "kind": kind,
        **timing.as_dict(),
        "bytes": int(nbytes),  # what the roofline counts: the weight as stored, x and y
        "tflops": flops / s / 1e12,
        "gbs": nbytes / s / 1e9,
        "roof_pct": ctx.roof.percent(flops, nbytes, s),
        "bound": "memory"
        if nbytes / ctx.roof.bandwidth_gbs / 1e9 >= flops / ctx.roof.peak_tflops / 1e12
        else "compute",
        "speedup": (dense_ms / timing.median_ms) if dense_ms else None,
    }
    return row


def time_rows(
    base: dict,
    variants: list[tuple[str, str, Callable, list[tuple]]],
    ctx: Context,
    flops: float,
    nbytes: float,
    dense_ms: float | None,
) -> list[dict]:
    """Time each ``(backend, kind, fn, arg_sets)``; one that raises becomes a note, not a crash."""
    rows = []
    for backend, kind, fn, arg_sets in variants:
        try:
            t = measure(fn, arg_sets, ctx.device, ctx.budget, reference_s=dense_ms / 1e3 if dense_ms else None)
        except Exception as exc:  # noqa: BLE001
            ctx.note(f"{backend} skipped on {base.get('case')} {base.get('pattern', '')}: {type(exc).__name__}: {exc}")
            continue
        rows.append(result_row(base, backend, kind, t, flops, nbytes, ctx, dense_ms))
    return rows


def feed_dispatch(ctx: Context, op: str, args: tuple, timed: list[dict]) -> None:
    """Give dispatch the benchmark's own timings (rotating inputs, more reps than a first call
    takes) when it has no choice for this bucket yet or ``--tune`` asked for a fresh one."""
    if dispatch.policy() != "measured" or (not ctx.tune and dispatch.cached_choice(op, *args)):
        return
    seconds = {r["backend"]: r["median_ms"] / 1e3 for r in timed if r["kind"] == "backend"}
    if all(b in seconds for b in dispatch.timing_set(op, *args)):
        dispatch.record(op, args, seconds)
    elif ctx.tune:
        dispatch.tune(op, *args)
