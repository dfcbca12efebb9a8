"""Single-threaded checks that run in a subprocess (the Triton-interpreter suites, the nvcc compile
of the torch wrapper), run side by side.

Each one keeps one core busy for 13-45 s while the other idles: one after another they took
~150 s of a 2-core machine's `make test`. A module registers its job at collection
(:func:`register`) and marks the test that reads it (``@pytest.mark.job(key)``); the first such
test to run starts every selected job, as many at once as this process may use cores, longest
first, and waits for them all; each test then asserts on its own job's result
(:func:`result`). The rest of the suite does not run meanwhile, so no timing of it is disturbed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass
class _Job:
    fn: Callable[[], object]
    cost: float  # seconds on a 2-core Zen 3, for the order only


_jobs: dict[str, _Job] = {}
_results: dict[str, tuple[bool, object]] = {}  # key -> (ok, value or formatted exception)
_selected: set[str] | None = None  # keys whose tests were collected and selected; None: all


def register(key: str, fn: Callable[[], object], cost: float = 10.0) -> None:
    """``fn()`` is the job: it runs in a thread of this process, so it should spend its time in
    a subprocess. Its return value is what :func:`result` gives."""
    _jobs[key] = _Job(fn, cost)


def select(keys: set[str]) -> None:
    """The keys whose tests will run (conftest, after collection and deselection)."""
    global _selected
    _selected = set(keys)


def result(key: str):
    """``key``'s return value (its exception re-raised as an AssertionError with its traceback),
    starting every selected job that has not run yet."""
    if key not in _results:
        pending = [k for k in _jobs if k not in _results and (k == key or _selected is None or k in _selected)]
        pending.sort(key=lambda k: -_jobs[k].cost)
        workers = max(1, min(len(pending), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {k: pool.submit(_run, _jobs[k].fn) for k in pending}
            for k, fut in futures.items():
                _results[k] = fut.result()
    ok, value = _results[key]
    if not ok:
        raise AssertionError(f"job {key!r} raised:\n{value}")
    return value


def _run(fn):
    try:
        return True, fn()
    except BaseException:  # noqa: BLE001 (a timeout or a bug in the job: its test reports it)
        return False, traceback.format_exc()


def python_subprocess(args: list[str], env: dict | None = None, cwd: str | None = None, timeout: float = 900):
    """``python args...`` with this interpreter, output captured."""
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
