"""Backend registry and choice.

Each backend module (``sparsekern/backends/*.py``) registers, per op, a function with the op's
schema and a ``supports(*args)`` check that returns ``None`` when it can run those arguments or
a short reason when it cannot. The public op implementations in ``ops.py`` ask :func:`select`
which one to call.

The backend in force is, in order: the innermost ``use_backend(...)`` block, the
``SPARSEKERN_BACKEND`` environment variable, else ``"auto"``. A forced backend that cannot run
the arguments is an error (never a silent fallback). ``"auto"`` asks the chooser, which by
default takes the first enabled backend in :data:`AUTO_ORDER` that supports the arguments.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

BACKENDS = ("reference", "cpu", "triton", "cuda")
AUTO_ORDER = ("cuda", "triton", "cpu", "reference")

Supports = Callable[..., "str | None"]


@dataclass(frozen=True)
class Impl:
    op: str
    backend: str
    fn: Callable
    supports: Supports
    # Off-by-default paths (GPU kernels that never passed on a real GPU) run only when forced.
    auto: bool = True


_registry: dict[str, dict[str, Impl]] = {}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("sparsekern_backend", default=None)


def _always(*args, **kwargs) -> None:
    return None


def register(op: str, backend: str, fn: Callable, supports: Supports = _always, auto: bool = True) -> None:
    """Make ``fn`` the ``backend`` implementation of ``op`` (replacing an earlier one)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    _registry.setdefault(op, {})[backend] = Impl(op, backend, fn, supports, auto)


def implementations(op: str) -> dict[str, Impl]:
    return dict(_registry.get(op, {}))


def current_backend() -> str:
    name = _forced.get() or os.environ.get("SPARSEKERN_BACKEND") or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"SPARSEKERN_BACKEND: expected 'auto' or one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force one backend (``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``) or ``"auto"``."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def candidates(op: str, *args) -> list[Impl]:
    """Auto-enabled implementations of ``op`` that can run ``args``, in AUTO_ORDER."""
    impls = _registry.get(op, {})
    return [impls[b] for b in AUTO_ORDER if b in impls and impls[b].auto and impls[b].supports(*args) is None]


def _first(op: str, impls: list[Impl], args: tuple) -> Impl:
    return impls[0]


_chooser: Callable[[str, list[Impl], tuple], Impl] = _first


def set_chooser(chooser: Callable[[str, list[Impl], tuple], Impl] | None) -> None:
    """Install the ``"auto"`` policy (the measured one lives with the benchmark runner)."""
    global _chooser
    _chooser = chooser or _first


def select(op: str, *args) -> Impl:
    """The implementation of ``op`` to run on ``args`` under the backend in force."""
    name = current_backend()
    impls = _registry.get(op, {})
    if name == "auto":
        found = candidates(op, *args)
        if not found:
            raise RuntimeError(f"sparsekern: no backend can run {op} on these inputs (registered: {sorted(impls)})")
        return found[0] if len(found) == 1 else _chooser(op, found, args)
    impl = impls.get(name)
    if impl is None:
        raise ValueError(
            f"backend: {name!r} has no implementation of {op} here (available: {sorted(impls)}); see `sparsekern info`"
        )
    reason = impl.supports(*args)
    if reason is not None:
        raise ValueError(f"backend: {name!r} cannot run {op} on these inputs: {reason}")
    return impl
