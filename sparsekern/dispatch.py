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
  auto-enabled candidate on the real arguments (warm-up, then interleaved rounds, minimum; a
  time the roofline says is implausible is measured again, :mod:`sparsekern.dispatch_measure`)
  and keeps the winner, in memory and in a JSON file per device, build, ISA and thread count
  under ``$SPARSEKERN_CACHE_DIR`` (default ``~/.cache/sparsekern``; :mod:`.dispatch_cache`).
  On CPU, 1 auto call in :data:`SAMPLE_EVERY` is timed (:func:`probe`); when two samples in a row are more than
  :data:`DRIFT` times off the stored figure of the chosen backend, or the entry was stored under
  suspicion (a candidate stayed implausibly slow), the bucket is measured again. For the linears the
  ``"dense"`` fallback is a candidate and wins unless a sparse kernel is at least
  :data:`MARGIN` (5%) faster (from :data:`PREFILL_ROWS` rows on: unless the sparse kernel is more
  than 5% slower, so that no dense copy is kept for a gain within the noise): the promise that a
  swapped layer is never more than 5% slower than the dense layer it replaced.
  ``"reference"`` (decompress on every call) is not timed when
  ``"dense"`` can run the arguments: it does the same work plus the decompression.
- ``first``: the first candidate in :data:`AUTO_ORDER`; no timing, no files (deterministic, for
  tests). Sparse kernels come before ``"dense"``, which comes before ``"reference"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsekern import dispatch_cache, dispatch_measure

log = logging.getLogger("sparsekern")

BACKENDS = ("reference", "dense", "cpu", "triton", "cuda")
AUTO_ORDER = ("cuda", "triton", "cpu", "dense", "reference")
POLICIES = ("measured", "first")
# A sparse kernel must beat the dense fallback by this fraction to be chosen...
MARGIN = 0.05
# ...except from this many rows of x on (prefill; the row buckets above 128, so one bucket never
# mixes the two rules), where it is chosen unless MARGIN slower: the promise (never more than
# MARGIN slower than the dense layer) still holds, and no dense copy of the weight is kept for a
# gain within the noise. NOTE: TinyLlama-1.1B shapes fp32, 512-token
# prompt, Zen 3: the 44 k/v projections (256x2048) measured 0.84-1.08x dense at 512 rows in three
# processes, and where dense came out ahead their 88 MiB of dense copies put the 2:4 model's peak
# RSS at 0.656x the dense model's (issue 14's target: 0.65x).
PREFILL_ROWS = 129
# ...and by this many seconds: what a sparse kernel costs per call in SparseLinear's planned path
# on top of the time measured here, beyond what the dense fallback's planned path (F.linear on
# the cached copy) costs on top of its own. NOTE: 2-core EPYC, planned path vs the bare call:
# 384x384 at 1 row, CPU kernel 20.9 vs 11.8 us; 64x64 at 4 rows, CPU kernel 14.7 vs 9.9 us and
# dense 17.0 vs 9.3 us (the NaN/Inf handling of the CPU kernels is in C++; a Python-side scan
# for kernels without nonfinite_exact adds ~3 us, covered here).
SPARSE_CALL_OVERHEAD_S = 4e-6
# Drift check: 1 auto call in SAMPLE_EVERY per bucket is timed (~1 us: two clock reads); two
# samples in a row off the stored figure by more than DRIFT x (either way) and by more than
# DRIFT_FLOOR_S re-measure the bucket. NOTE: the floor. A stored figure times the backend's
# registered function, a plan runs what the backend keeps per weight (the dense fallback: F.linear
# on its copy, without the copy lookup), so at a few us a call the two differ by 2-3x for good:
# a 16x64 layer at 1 row (Zen 3) stored dense 10.4 us and sampled ~3.5 us, and was re-measured
# (and the cache file rewritten, every plan in the process re-made) 7-21 times per 4096 calls:
# 25-36 us a call against 15-28 with the floor (blocks alternating in one process). A choice
# between calls this short is worth less than that.
SAMPLE_EVERY = 64
DRIFT = 2.0
DRIFT_FLOOR_S = 50e-6
# Re-measurements of a bucket whose candidates stayed implausibly slow (see dispatch_measure):
# each is done at a later sample, when the disturbance may be gone.
SUSPECT_RETRIES = 3

Supports = Callable[..., "str | None"]


@dataclass(frozen=True)
class Impl:
    op: str
    backend: str
    fn: Callable
    supports: Supports
    # Off-by-default paths (GPU kernels that never passed on a real GPU) run only when forced.
    # A callable of the op's arguments: auto only for the arguments it returns True for.
    auto: bool | Callable[..., bool] = True
    # Called with the op's arguments when this backend lost a measurement on them, so it can drop
    # per-weight state (the dense fallback's decompressed copy).
    release: Callable | None = None
    # For the linears: rows of x holding NaN/Inf come out as from the dense op (0 * inf = nan
    # where a weight was pruned). Kernels without it get those rows recomputed by the caller.
    nonfinite_exact: bool = False


_registry: dict[str, dict[str, Impl]] = {}
# (cache file, bucket key) -> the chosen Impl (its fn wrapped by :func:`probe`): the per-call
# fast path of the measured policy. Cleared whenever the registry or the stored choices change.
_chosen: dict[tuple[Path, str], Impl] = {}
# Bumped with every such change: callers that remember a choice themselves (SparseLinear's
# per-module plans) compare it with :func:`state` to know when to ask again.
_generation = 0
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("sparsekern_backend", default=None)
_measuring = dispatch_measure.measuring


def _always(*args, **kwargs) -> None:
    return None


def _invalidate() -> None:
    global _generation
    _chosen.clear()
    _generation += 1


_ENV_KEYS = ("SPARSEKERN_BACKEND", "SPARSEKERN_DISPATCH")


def _env(i: int) -> str | None:
    """``SPARSEKERN_BACKEND`` (0) or ``SPARSEKERN_DISPATCH`` (1)."""
    return os.environ.get(_ENV_KEYS[i])


def state() -> tuple:
    """What a plan depends on besides its arguments, read on each planned call: the generation,
    the chooser, the forced backend, ``SPARSEKERN_BACKEND`` and ``SPARSEKERN_DISPATCH``. NOTE:
    the environment reads are most of its cost (~1 us each for an unset variable: a KeyError)."""
    get = os.environ.get
    return (_generation, _chooser, _forced.get(), get("SPARSEKERN_BACKEND"), get("SPARSEKERN_DISPATCH"))


def register(
    op: str,
    backend: str,
    fn: Callable,
    supports: Supports = _always,
    auto: bool | Callable[..., bool] = True,
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
    return [impls[b] for b in AUTO_ORDER if b in impls and _auto(impls[b], args) and impls[b].supports(*args) is None]


def _auto(impl: Impl, args: tuple) -> bool:
    return impl.auto(*args) if callable(impl.auto) else impl.auto


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


time_impls = dispatch_measure.time_impls  # module attribute: tests replace it


def decide(times: dict[str, float], rows: int = 1) -> str:
    """The winner: the fastest sparse kernel if it beats ``"dense"`` by MARGIN (and by its extra
    per-call cost, :data:`SPARSE_CALL_OVERHEAD_S`), else ``"dense"``. From :data:`PREFILL_ROWS`
    rows of x on, a sparse kernel at most MARGIN slower than ``"dense"`` wins too (the dense
    fallback would hold a dense copy of the weight for good)."""
    if "dense" in times:
        sparse = {b: t for b, t in times.items() if b not in ("dense", "reference")}
        best = min(sparse, key=sparse.get, default=None)
        allowed = (1 + MARGIN) if rows >= PREFILL_ROWS else (1 - MARGIN)
        wins = best is not None and sparse[best] + SPARSE_CALL_OVERHEAD_S <= allowed * times["dense"]
        return best if wins else "dense"
    return min(times, key=times.get)


def _rows_of(op: str, args: tuple) -> int:
    """Rows of x for the linears (x first, [rows, K]); 1 for other ops (the strict rule)."""
    x = args[0] if args else None
    if op in dispatch_measure.LINEAR_OPS and isinstance(x, torch.Tensor) and x.dim() == 2:
        return int(x.shape[0])
    return 1


def _timing_set(found: list[Impl]) -> list[Impl]:
    names = {i.backend for i in found}
    return [i for i in found if not (i.backend == "reference" and "dense" in names)]


def tune(op: str, *args, retries: int = SUSPECT_RETRIES) -> tuple[str, dict[str, float]]:
    """Time the auto candidates of ``op`` on ``args`` now, store the winner; ``(winner, seconds)``.

    Times above the roofline's slack are measured again (twice at most, keeping the minimum);
    if some stay implausible the entry is stored as suspect, to be measured again ``retries``
    times at later drift samples."""
    found = candidates(op, *args)
    if not found:
        raise RuntimeError(f"sparsekern: no backend can run {op} on these inputs")
    timed = _timing_set(found)
    # One candidate left: nothing to compare, so nothing to time.
    times = {timed[0].backend: float("nan")} if len(timed) == 1 else time_impls(timed, args)
    if not times:
        raise RuntimeError(f"sparsekern: every backend failed on {op} with these inputs")
    slow = dispatch_measure.implausible(op, args, times) if len(times) > 1 else []
    for _ in range(2):
        if not slow:
            break
        log.info("sparsekern: %s %s: implausible times %s, measuring again", op, bucket_key(op, *args), slow)
        again = time_impls([i for i in timed if i.backend in times], args)
        times = {b: min(t, again.get(b, t)) for b, t in times.items()}
        slow = dispatch_measure.implausible(op, args, times)
    return record(op, args, times, suspect=retries if slow else 0), times


def timing_set(op: str, *args) -> list[str]:
    """Backends that :func:`tune` would time on ``args`` (auto candidates; no reference next to dense)."""
    return [i.backend for i in _timing_set(candidates(op, *args))]


def record(op: str, args: tuple, times: dict[str, float], suspect: int = 0) -> str:
    """Store the winner of ``times`` (seconds per backend, measured elsewhere, e.g. by the
    benchmark) as the choice for ``args``'s bucket; returns the winner. ``suspect``: how many
    more times drift samples should measure this bucket again."""
    found = candidates(op, *args)
    times = {b: t for b, t in times.items() if b in {i.backend for i in found}}
    if not times:
        raise ValueError(f"times: expected seconds for some of {[i.backend for i in found]}, got none")
    device = _device_of(args)
    winner = decide(times, _rows_of(op, args))
    for impl in found:
        if impl.backend != winner and impl.release is not None:
            impl.release(*args)
    path = cache_path(device)
    with _lock:
        _invalidate()
        entry = {"backend": winner, "times_ms": {b: round(t * 1e3, 4) for b, t in times.items() if t == t}}
        entry["args"] = dispatch_cache.recipe(op, args)
        if suspect:
            entry["suspect"] = suspect
        dispatch_cache.put(path, bucket_key(op, *args), entry)
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
    impl = _chosen.get((cache_path(_device_of(args)), bucket_key(op, *args)))
    if impl is not None and impl.supports(*args) is None:
        return impl
    return None


def probe(op: str, args: tuple, impl: Impl, fn: Callable | None = None) -> Callable:
    """``fn`` (default ``impl.fn``) timing 1 call in :data:`SAMPLE_EVERY` for the drift check
    (:func:`_check_drift`), where that applies: ``auto`` under the measured policy, on CPU;
    ``fn`` itself elsewhere. Callers that hold a backend across calls (plans) hold this."""
    fn = fn or impl.fn
    if _chooser is not _measured or policy() != "measured" or current_backend() != "auto":
        return fn
    if _device_of(args).type != "cpu":  # timing a GPU call would synchronize the stream
        return fn
    key = (cache_path(_device_of(args)), bucket_key(op, *args))
    count = [SAMPLE_EVERY, 0]  # calls until the next sample, drifted samples in a row

    def sampled(*call_args):
        count[0] -= 1
        if count[0] > 0 or _measuring.get():
            return fn(*call_args)
        count[0] = SAMPLE_EVERY
        t0 = time.perf_counter()
        out = fn(*call_args)
        _check_drift(op, key, impl.backend, count, call_args, time.perf_counter() - t0)
        return out

    return sampled


def _check_drift(op: str, key: tuple, backend: str, count: list, args: tuple, seconds: float) -> None:
    """Measure ``key``'s bucket again when its entry is suspect or two samples in a row drifted."""
    entry = dispatch_cache.entries(key[0]).get(key[1], {})
    stored = entry.get("times_ms", {}).get(backend)
    drifted = (
        isinstance(stored, (int, float))
        and stored > 0
        and not 1 / DRIFT <= seconds * 1e3 / stored <= DRIFT
        and abs(seconds - stored * 1e-3) > DRIFT_FLOOR_S
    )
    count[1] = count[1] + 1 if drifted else 0
    suspect = entry.get("suspect", 0)
    if count[1] >= 2 or (isinstance(suspect, int) and suspect > 0):
        log.info(
            "sparsekern: %s %s: call took %.3g ms, stored %s ms; measuring again", op, key[1], seconds * 1e3, stored
        )
        count[1] = 0
        with _lock:
            tune(op, *args, retries=max(0, suspect - 1) if suspect else SUSPECT_RETRIES)


def _remember(op: str, args: tuple, impl: Impl) -> Impl:
    if _chooser is _measured and policy() == "measured" and not _measuring.get():
        impl = dataclasses.replace(impl, fn=probe(op, args, impl))
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


def plan(op: str, *args, dense: bool = True) -> Callable:
    """The plan for ``op`` on ``args`` (x first): every check, the backend choice and what that
    backend keeps per weight, done once; call it with the op's arguments (:mod:`sparsekern.plan`).
    ``dense=False``: never a backend that keeps a dense copy of the weight."""
    from sparsekern import plan as plans

    return plans.make(op, args, dense)
