"""Timing a kernel honestly: warm-up, rotating inputs, median with 20/80 quantiles.

On a GPU every call is bracketed by CUDA events (no host round trip inside the timed span); on a
CPU by ``time.perf_counter``. Calls rotate through several argument sets (copies of ``x`` and,
for weights small enough to sit in the last-level cache, copies of the weight) so a kernel is not
flattered by data that the previous call left in cache.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Budget:
    """How long to time one case: at least ``min_reps`` calls, more while under ``seconds``."""

    seconds: float = 0.25
    min_reps: int = 5
    max_reps: int = 200
    # A call slower than this many times the reference time (and slower than ``slow_floor_s``)
    # is timed once: a baseline 20x slower than dense tells its story in one sample.
    slow_factor: float = 8.0
    slow_floor_s: float = 0.05


# NOTE: --quick on 2 CPU cores: a 512-row 11008x4096 fp32 GEMM is ~0.5 s, so every call that is
# not needed counts; 3 reps and a 3x cut-off for baselines far behind dense keep it near a minute.
QUICK = Budget(seconds=0.12, min_reps=3, max_reps=50, slow_factor=3.0)
FULL = Budget()


def quantile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of ``samples`` (q in [0, 1])."""
    s = sorted(samples)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(samples_s: Sequence[float]) -> Timing:
    ms = [t * 1e3 for t in samples_s]
    return Timing(quantile(ms, 0.5), quantile(ms, 0.2), quantile(ms, 0.8), len(ms))


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 on a GPU, L3 (else L2) on a CPU; 32 MiB when unknown."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or 50 << 20
    for index in ("index3", "index2"):
        with contextlib.suppress(OSError, ValueError):
            text = Path(f"/sys/devices/system/cpu/cpu0/cache/{index}/size").read_text().strip()
            unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            return int(text.rstrip("KMG")) * unit
    return 32 << 20


def copies_to_flush(nbytes: int, device: torch.device, most: int = 8) -> int:
    """Copies of an ``nbytes`` operand whose round robin overflows twice the last-level cache."""
    return max(1, min(most, math.ceil(2 * last_level_cache_bytes(device) / max(1, nbytes))))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one(fn: Callable, args: tuple, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn(*args)
    _sync(device)
    return time.perf_counter() - t0


def measure(
    fn: Callable,
    arg_sets: Sequence[tuple],
    device: torch.device,
    budget: Budget = FULL,
    reference_s: float | None = None,
) -> Timing:
    """Time ``fn(*arg_sets[i % len(arg_sets)])`` per call.

    Warm-up runs each argument set once (lazy compilation, caches, dense copies). With
    ``reference_s`` (e.g. the dense time), a call ``budget.slow_factor`` times slower is timed once.
    """
    with torch.no_grad():
        first = _one(fn, arg_sets[0], device)
        for args in arg_sets[1:]:
            fn(*args)
        slow = max(budget.slow_floor_s, budget.slow_factor * reference_s) if reference_s is not None else None
        if slow is not None and first > slow:
            # The first call may have paid a one-time set-up (the dense fallback's decompressed
            # copy, compilation): time one more. Still far behind the yardstick: that is the one
            # sample, which at this distance does not change the story.
            first = _one(fn, arg_sets[0], device)
            if first > slow:
                return summarize([first])
        # A call slower than the whole budget gets min_reps without a second estimate.
        est = first if first > budget.seconds else max(_one(fn, arg_sets[-1], device), 1e-7)
        reps = max(budget.min_reps, min(budget.max_reps, int(budget.seconds / est)))
        if device.type == "cuda":
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            _sync(device)
            for i in range(reps):
                starts[i].record()
                fn(*arg_sets[i % len(arg_sets)])
                ends[i].record()
            _sync(device)
            samples = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
        else:
            samples = []
            for i in range(reps):
                args = arg_sets[i % len(arg_sets)]
                t0 = time.perf_counter()
                fn(*args)
                samples.append(time.perf_counter() - t0)
    return summarize(samples)


def measure_interleaved(
    variants: Sequence[tuple[Callable, Sequence[tuple]]], device: torch.device, budget: Budget = FULL
) -> list[Timing]:
    """Time several functions call by call in turn (a, b, a, b, ...), for ratios that must hold
    on a shared machine: load that comes and goes hits every variant alike."""
    with torch.no_grad():
        firsts = []
        for fn, sets in variants:
            firsts.append(_one(fn, sets[0], device))
            for args in sets[1:]:
                fn(*args)
        reps = max(budget.min_reps, min(budget.max_reps, int(budget.seconds / max(max(firsts), 1e-7))))
        samples: list[list[float]] = [[] for _ in variants]
        for i in range(reps):
            for j, (fn, sets) in enumerate(variants):
                samples[j].append(_one(fn, sets[i % len(sets)], device))
    return [summarize(s) for s in samples]
