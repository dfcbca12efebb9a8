"""Backend registry and choice: measured once per shape bucket, cached on disk.

Each backend module (``sparsekern/backends/*.py``) registers, per op, a function with the op's
schema and a ``supports(*args)`` check that returns ``None`` when it can run those arguments or
a short reason when it cannot. The public op implementations in ``ops.py`` ask :func:`select`
which one to call.

The backend in force is, in order: the innermost ``use_backend(...)`` block, the
``SPARSEKERN_BACKEND`` environment variable, else ``"auto"``. A forced backend that cannot run
the arguments is an error (never a silent fallback) and is never measured.

``"auto"`` follows ``SPARSEKERN_DISPATCH``:

- ``measured`` (default): for each (op, device, dtype, shape bucket) the first call times every
  auto-enabled candidate on the real arguments (warm-up, then a few interleaved reps, median)
  and keeps the winner, in memory and in a JSON file per device + sparsekern + torch version
  under ``$SPARSEKERN_CACHE_DIR`` (default ``~/.cache/sparsekern``). For the linears the
  ``"dense"`` fallback is a candidate and wins unless a sparse kernel is at least
  :data:`MARGIN` (5%) faster: the promise that a swapped layer is never more than 5% slower than
  the dense layer it replaced. ``"reference"`` (decompress on every call) is not timed when
  ``"dense"`` can run the arguments: it does the same work plus the decompression.
- ``first``: the first candidate in :data:`AUTO_ORDER`; no timing, no files (deterministic, for
  tests). Sparse kernels come before ``"dense"``, which comes before ``"reference"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsekern import dispatch_cache

log = logging.getLogger("sparsekern")

BACKENDS = ("reference", "dense", "cpu", "triton", "cuda")
AUTO_ORDER = ("cuda", "triton", "cpu", "dense", "reference")
POLICIES = ("measured", "first")
# A sparse kernel must beat the dense fallback by this fraction to be chosen.
MARGIN = 0.05
# ...and by this many seconds: what a sparse kernel costs per call in SparseLinear's planned path
# on top of the time measured here, beyond what the dense fallback's planned path (F.linear on
# the cached copy) costs on top of its own. NOTE: 2-core EPYC, planned path vs the bare call:
# 384x384 at 1 row, CPU kernel 20.9 vs 11.8 us; 64x64 at 4 rows, CPU kernel 14.7 vs 9.9 us and
# dense 17.0 vs 9.3 us (the NaN/Inf handling of the CPU kernels is in C++; a Python-side scan
# for kernels without nonfinite_exact adds ~3 us, covered here).
SPARSE_CALL_OVERHEAD_S = 4e-6
# Measurement budget per candidate (seconds, after the warm-up) and bounds on the reps.
# NOTE: 3 reps minimum keeps the median meaningful; 0.05 s keeps a first call of a decode
# shape (4096x4096 fp32, ~5 ms dense here on 2 cores) at ~10 reps per candidate, ~0.2 s in all.
MEASURE_BUDGET_S = 0.05
MIN_REPS, MAX_REPS = 3, 15

Supports = Callable[..., "str | None"]


@dataclass(frozen=True)
class Impl:
    op: str
    backend: str
    fn: Callable
    supports: Supports
    # Off-by-default paths (GPU kernels that never passed on a real GPU) run only when forced.
    auto: bool = True
    # Called with the op's arguments when this backend lost a measurement on them, so it can drop
    # per-weight state (the dense fallback's decompressed copy).
    release: Callable | None = None
    # For the linears: rows of x holding NaN/Inf come out as from the dense op (0 * inf = nan
    # where a weight was pruned). Kernels without it get those rows recomputed by the caller.
    nonfinite_exact: bool = False


_registry: dict[str, dict[str, Impl]] = {}
# (cache file, bucket key) -> the chosen Impl: the per-call fast path of the measured policy.
# Cleared whenever the registry or the stored choices change.
_chosen: dict[tuple[Path, str], Impl] = {}
# Bumped with every such change: callers that remember a choice themselves (SparseLinear's
# per-module plans) compare it with :func:`state` to know when to ask again.
_generation = 0
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("sparsekern_backend", default=None)
# True while candidates are being timed: a candidate that calls a public op must not re-measure.
_measuring: contextvars.ContextVar[bool] = contextvars.ContextVar("sparsekern_measuring", default=False)


def _always(*args, **kwargs) -> None:
    return None


def _invalidate() -> None:
    global _generation
    _chosen.clear()
    _generation += 1


# NOTE: os.environ.get costs ~1.1 us (key encoding); the bytes-keyed mapping behind it on POSIX
# ~0.1 us. state() runs on every SparseLinear call, where 2 us is 10% of a small layer.
_RAW_ENV = getattr(os.environ, "_data", None)
_RAW_KEYS = (b"SPARSEKERN_BACKEND", b"SPARSEKERN_DISPATCH")
if not (isinstance(_RAW_ENV, dict) and all(isinstance(k, bytes) for k in list(_RAW_ENV)[:1])):
    _RAW_ENV, _RAW_KEYS = os.environ, ("SPARSEKERN_BACKEND", "SPARSEKERN_DISPATCH")


def _env(i: int) -> str | None:
    """``SPARSEKERN_BACKEND`` (0) or ``SPARSEKERN_DISPATCH`` (1), read the cheap way."""
    v = _RAW_ENV.get(_RAW_KEYS[i])
    return v.decode() if isinstance(v, bytes) else v


def state() -> tuple:
    """Everything a remembered choice depends on besides the arguments: the registry/choice
    generation, the chooser, the forced backend, ``SPARSEKERN_BACKEND`` and ``SPARSEKERN_DISPATCH``."""
    get = _RAW_ENV.get
    return (_generation, _chooser, _forced.get(), get(_RAW_KEYS[0]), get(_RAW_KEYS[1]))


def register(
    op: str,
    backend: str,
    fn: Callable,
    supports: Supports = _always,
    auto: bool = True,
    release: Callable | None = None,
    nonfinite_exact: bool = False,
) -> None:
    """Make ``fn`` the ``backend`` implementation of ``op`` (replacing an earlier one)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    _registry.setdefault(op, {})[backend] = Impl(op, backend, fn, supports, auto, release, nonfinite_exact)
    _invalidate()


def unregister(op: str, backend: str) -> None:
    """Remove one implementation (tests register temporary fakes)."""
    _registry.get(op, {}).pop(backend, None)
    _invalidate()


def implementations(op: str) -> dict[str, Impl]:
    return dict(_registry.get(op, {}))


def _check_name(name: str, what: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{what}: expected 'auto' or one of {BACKENDS}, got {name!r}")
    return name


def current_backend() -> str:
    forced = _forced.get()
    if forced is not None:
        return forced
    return _check_name(_env(0) or "auto", "SPARSEKERN_BACKEND")


def policy() -> str:
    """The ``"auto"`` policy in force: ``SPARSEKERN_DISPATCH``, default ``"measured"``."""
    name = _env(1) or "measured"
    if name not in POLICIES:
        raise ValueError(f"SPARSEKERN_DISPATCH: expected one of {POLICIES}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force one backend (``"reference"``, ``"dense"``, ``"cpu"``, ``"triton"``, ``"cuda"``) or ``"auto"``."""
    token = _forced.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def candidates(op: str, *args) -> list[Impl]:
    """Auto-enabled implementations of ``op`` that can run ``args``, in AUTO_ORDER."""
    impls = _registry.get(op, {})
    return [impls[b] for b in AUTO_ORDER if b in impls and impls[b].auto and impls[b].supports(*args) is None]


# -- shape buckets and the on-disk cache (sparsekern/dispatch_cache.py) -----------------------

ROW_BUCKET_CAP = dispatch_cache.ROW_BUCKET_CAP
row_bucket = dispatch_cache.row_bucket
bucket_key = dispatch_cache.bucket_key

_lock = dispatch_cache.lock
device_name = dispatch_cache.device_name
cache_dir = dispatch_cache.cache_dir
cache_path = dispatch_cache.cache_path


def clear_cache(disk: bool = False) -> None:
    """Forget measured choices (in memory; with ``disk`` also delete the cache files)."""
    with _lock:
        dispatch_cache.forget(disk)
        _invalidate()


# -- measurement -----------------------------------------------------------------------------


def _device_of(args) -> torch.device:
    return next(a for a in args if isinstance(a, torch.Tensor)).device


def _timed(fn: Callable, args: tuple, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def time_impls(impls: list[Impl], args: tuple) -> dict[str, float]:
    """Median seconds per call of each implementation on ``args`` (called directly, no dispatch).

    Reps are interleaved across candidates so load from other processes hits all of them alike.
    A candidate that raises is left out (and logged).
    """
    device = _device_of(args)
    samples: dict[str, list[float]] = {}
    token = _measuring.set(True)
    try:
        with torch.no_grad():
            for impl in impls:
                try:
                    _timed(impl.fn, args, device)  # warm-up: caches, lazy compilation, dense copy
                    samples[impl.backend] = [_timed(impl.fn, args, device)]
                except Exception as exc:  # noqa: BLE001
                    log.warning("sparsekern: backend %s failed on %s, not a candidate: %s", impl.backend, impl.op, exc)
            slowest = max((s[0] for s in samples.values()), default=0.0)
            reps = max(MIN_REPS, min(MAX_REPS, int(MEASURE_BUDGET_S / max(slowest, 1e-6))))
            by_name = {i.backend: i for i in impls}
            for _ in range(reps - 1):
                for name in samples:
                    samples[name].append(_timed(by_name[name].fn, args, device))
    finally:
        _measuring.reset(token)
    return {name: sorted(s)[len(s) // 2] for name, s in samples.items()}


def decide(times: dict[str, float]) -> str:
    """The winner: the fastest sparse kernel if it beats ``"dense"`` by MARGIN (and by its extra
    per-call cost, :data:`SPARSE_CALL_OVERHEAD_S`), else ``"dense"``."""
    if "dense" in times:
        sparse = {b: t for b, t in times.items() if b not in ("dense", "reference")}
        best = min(sparse, key=sparse.get, default=None)
        wins = best is not None and sparse[best] + SPARSE_CALL_OVERHEAD_S <= (1 - MARGIN) * times["dense"]
        return best if wins else "dense"
    return min(times, key=times.get)


def _timing_set(found: list[Impl]) -> list[Impl]:
    names = {i.backend for i in found}
    return [i for i in found if not (i.backend == "reference" and "dense" in names)]


def tune(op: str, *args) -> tuple[str, dict[str, float]]:
    """Time the auto candidates of ``op`` on ``args`` now, store the winner; ``(winner, seconds)``."""
    found = candidates(op, *args)
    if not found:
        raise RuntimeError(f"sparsekern: no backend can run {op} on these inputs")
    timed = _timing_set(found)
    # One candidate left: nothing to compare, so nothing to time.
    times = {timed[0].backend: float("nan")} if len(timed) == 1 else time_impls(timed, args)
    if not times:
        raise RuntimeError(f"sparsekern: every backend failed on {op} with these inputs")
    return record(op, args, times), times


def timing_set(op: str, *args) -> list[str]:
    """Backends that :func:`tune` would time on ``args`` (auto candidates; no reference next to dense)."""
    return [i.backend for i in _timing_set(candidates(op, *args))]


def record(op: str, args: tuple, times: dict[str, float]) -> str:
    """Store the winner of ``times`` (seconds per backend, measured elsewhere, e.g. by the
    benchmark) as the choice for ``args``'s bucket; returns the winner."""
    found = candidates(op, *args)
    times = {b: t for b, t in times.items() if b in {i.backend for i in found}}
    if not times:
        raise ValueError(f"times: expected seconds for some of {[i.backend for i in found]}, got none")
    device = _device_of(args)
    winner = decide(times)
    for impl in found:
        if impl.backend != winner and impl.release is not None:
            impl.release(*args)
    path = cache_path(device)
    with _lock:
        _invalidate()
        dispatch_cache.entries(path)[bucket_key(op, *args)] = {
            "backend": winner,
            "times_ms": {b: round(t * 1e3, 4) for b, t in times.items() if t == t},
        }
        dispatch_cache.write(path, device)
    log.info("sparsekern: %s %s -> %s %s", op, bucket_key(op, *args), winner, times)
    return winner


def cached_choice(op: str, *args) -> str | None:
    """The stored winner for ``args``'s bucket, if any."""
    return dispatch_cache.entries(cache_path(_device_of(args))).get(bucket_key(op, *args), {}).get("backend")


def _capturing(args) -> bool:
    dev = _device_of(args)
    return dev.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _measured(op: str, found: list[Impl], args: tuple) -> Impl:
    if _measuring.get() or policy() == "first":
        return found[0]
    by_name = {i.backend: i for i in found}
    with _lock:
        name = cached_choice(op, *args)
        if name not in by_name:
            if _capturing(args):  # cannot time inside CUDA graph capture
                return found[0]
            name, _ = tune(op, *args)
    return by_name[name]


def _fast_auto(op: str, args: tuple) -> Impl | None:
    """The remembered choice for ``args``'s bucket if it still supports them (no registry scan)."""
    if _chooser is not _measured or _measuring.get() or policy() != "measured":
        return None
    key = (cache_path(_device_of(args)), bucket_key(op, *args))
    impl = _chosen.get(key)
    if impl is not None and impl.supports(*args) is None:
        return impl
    return None


def _remember(op: str, args: tuple, impl: Impl) -> Impl:
    if _chooser is _measured and policy() == "measured" and not _measuring.get():
        _chosen[(cache_path(_device_of(args)), bucket_key(op, *args))] = impl
    return impl


_chooser: Callable[[str, list[Impl], tuple], Impl] = _measured


def set_chooser(chooser: Callable[[str, list[Impl], tuple], Impl] | None) -> None:
    """Replace the ``"auto"`` policy (``None`` restores the measured/first policy above)."""
    global _chooser
    _chooser = chooser or _measured
    _invalidate()


def select(op: str, *args) -> Impl:
    """The implementation of ``op`` to run on ``args`` under the backend in force."""
    name = current_backend()
    impls = _registry.get(op, {})
    if name == "auto":
        fast = _fast_auto(op, args)
        if fast is not None:
            return fast
        found = candidates(op, *args)
        if not found:
            raise RuntimeError(f"sparsekern: no backend can run {op} on these inputs (registered: {sorted(impls)})")
        return found[0] if len(found) == 1 else _remember(op, args, _chooser(op, found, args))
    impl = impls.get(name)
    if impl is None:
        raise ValueError(
            f"backend: {name!r} has no implementation of {op} here (available: {sorted(impls)}); see `sparsekern info`"
        )
    reason = impl.supports(*args)
    if reason is not None:
        raise ValueError(f"backend: {name!r} cannot run {op} on these inputs: {reason}")
    return impl
