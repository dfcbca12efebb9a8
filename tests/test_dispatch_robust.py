"""Measured dispatch that a busy moment cannot fool: minimum over rounds, the roofline re-check,
drift re-measurement, a cache keyed on build/ISA/threads, locked merges, `sparsekern dispatch`."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import only_backends

import sparsekern as sk
from sparsekern import cli, dispatch, dispatch_cache, dispatch_measure, reference


def _weight(out=64, k=128, rows=3):
    w = sk.NMSparseWeight.from_dense(torch.randn(out, k), n=2, m=4, prune=True)
    x = torch.randn(rows, k)
    return w, x, (x, w.values, w.meta, 2, 4, None)


def _fast_kernel(x, values, meta, n, m, bias=None):
    # Correct results; its speed is whatever the faked timings say.
    return reference.nm_linear(x, values, meta, n, m, bias)


def _auto_call(args):
    # What a per-call caller of the dispatcher does (the attention ops; the linears via plans).
    return dispatch.select("nm_linear", *args).fn(*args)


def _busy(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.fixture
def fixed_bandwidth(monkeypatch):
    # 10 GB/s: every shape here predicts the 50 us call floor; no bandwidth probe in the tests.
    monkeypatch.setitem(dispatch_measure._bandwidth, "cpu", 10e9)


def test_time_is_the_minimum_over_rounds():
    calls = []

    def stalls_in_most_rounds(x):
        calls.append(1)
        _busy(0.001 if len(calls) % 4 == 0 else 0.03)  # 3 rounds in 4 hit a "busy moment"

    impl = dispatch.Impl("op", "cpu", stalls_in_most_rounds, dispatch._always)
    t = dispatch.time_impls([impl], (torch.zeros(1),))["cpu"]
    assert t < 0.01, f"{t * 1e3:.1f} ms: a disturbed round was kept"


def test_roofline_remeasures_an_implausible_time(measured, monkeypatch, fixed_bandwidth):
    only_backends("nm_linear", "reference", "dense")
    dispatch.register("nm_linear", "cpu", _fast_kernel)
    _, _, args = _weight()
    rounds = iter([{"cpu": 0.050, "dense": 9e-5}, {"cpu": 6e-5, "dense": 9e-5}])
    seen = []
    monkeypatch.setattr(dispatch, "time_impls", lambda impls, a: seen.append(1) or next(rounds))
    winner, times = dispatch.tune("nm_linear", *args)
    # 50 ms for a 64x128 layer is > 2x the roofline: measured again, and the kernel wins.
    assert len(seen) == 2 and winner == "cpu" and times["cpu"] == pytest.approx(6e-5)
    entry = dispatch_cache.entries(dispatch.cache_path(args[0].device))[dispatch.bucket_key("nm_linear", *args)]
    assert entry["backend"] == "cpu" and "suspect" not in entry


def test_plausible_times_are_not_remeasured(measured, monkeypatch, fixed_bandwidth):
    only_backends("nm_linear", "reference", "dense")
    dispatch.register("nm_linear", "cpu", _fast_kernel)
    _, _, args = _weight()
    seen = []
    monkeypatch.setattr(dispatch, "time_impls", lambda impls, a: seen.append(1) or {"cpu": 8e-5, "dense": 6e-5})
    assert dispatch.tune("nm_linear", *args)[0] == "dense" and len(seen) == 1


def _poisoned(monkeypatch):
    """A stored choice of "dense" on a fake 5 s figure (cpu at a fake 9 s), every call sampled,
    and re-measurements recorded in ``tuned`` (they find cpu twice as fast as dense)."""
    only_backends("nm_linear", "reference", "dense")
    dispatch.register("nm_linear", "cpu", _fast_kernel)
    monkeypatch.setattr(dispatch, "SAMPLE_EVERY", 1)
    w, x, args = _weight()
    path, key = dispatch.cache_path(x.device), dispatch.bucket_key("nm_linear", *args)
    dispatch_cache.put(path, key, {"backend": "dense", "times_ms": {"dense": 5000.0, "cpu": 9000.0}})
    dispatch._invalidate()
    tuned = []
    monkeypatch.setattr(dispatch, "time_impls", lambda impls, a: tuned.append(1) or {"cpu": 1e-4, "dense": 2e-4})
    return w, x, args, path, key, tuned


def test_poisoned_entry_is_remeasured_on_drift(measured, monkeypatch, fixed_bandwidth):
    """A stored figure far from what the chosen backend really takes (measured in a busy moment)
    is found by the sampled calls and measured again; the right backend then wins."""
    w, x, args, path, key, tuned = _poisoned(monkeypatch)
    for _ in range(4):
        torch.testing.assert_close(_auto_call(args), x @ w.to_dense().T)
    assert tuned, "the drifted entry was never measured again"
    assert dispatch_cache.entries(path)[key]["backend"] == "cpu"
    assert dispatch.select("nm_linear", *args).backend == "cpu"


@pytest.mark.parametrize(
    ("stored_ms", "sampled_s", "remeasured"),
    [
        (0.0104, 3.5e-6, False),  # 3x off, 7 us apart: a planned call that skips the copy lookup
        (0.0104, 400e-6, True),  # a tiny layer that now takes 0.4 ms: measured again
        (0.5, 0.1e-3, True),  # 5x and 0.4 ms off
        (0.5, 0.3e-3, False),  # inside DRIFT x
    ],
)
def test_drift_needs_a_ratio_and_a_floor(measured, monkeypatch, stored_ms, sampled_s, remeasured):
    """Two samples in a row re-measure a bucket only when they are more than DRIFT x off the
    stored figure and more than DRIFT_FLOOR_S away from it."""
    only_backends("nm_linear", "reference", "dense")
    dispatch.register("nm_linear", "cpu", _fast_kernel)
    w, x, args = _weight()
    path, key = dispatch.cache_path(x.device), dispatch.bucket_key("nm_linear", *args)
    dispatch_cache.put(path, key, {"backend": "dense", "times_ms": {"dense": stored_ms, "cpu": 2 * stored_ms}})
    tuned = []
    monkeypatch.setattr(dispatch, "tune", lambda *a, **k: tuned.append(1))
    count = [dispatch.SAMPLE_EVERY, 0]
    for _ in range(2):
        dispatch._check_drift("nm_linear", (path, key), "dense", count, args, sampled_s)
    assert bool(tuned) == remeasured


@pytest.mark.parametrize("caller", ["op", "layer"])
def test_poisoned_entry_is_remeasured_through_plans(measured, monkeypatch, fixed_bandwidth, caller):
    """Plans (the public op's and SparseLinear's) hold the sampled call too: a choice stored from
    a busy moment does not stick on the planned path either."""
    w, x, args, path, key, tuned = _poisoned(monkeypatch)
    layer = sk.SparseLinear(w)
    call = (lambda: sk.ops.nm_linear(x, w)) if caller == "op" else (lambda: layer(x))
    with torch.no_grad():
        for _ in range(4):
            torch.testing.assert_close(call(), x @ w.to_dense().T)
    assert tuned, "the drifted entry was never measured again on the planned path"
    assert dispatch_cache.entries(path)[key]["backend"] == "cpu"


def test_probe_held_across_calls_samples_one_in_n(measured, monkeypatch, fixed_bandwidth):
    """A caller that holds a backend (a plan) holds dispatch.probe(...): drift is seen there too."""
    only_backends("nm_linear", "reference", "dense")
    dispatch.register("nm_linear", "cpu", _fast_kernel)
    monkeypatch.setattr(dispatch, "SAMPLE_EVERY", 3)
    w, x, args = _weight()
    path, key = dispatch.cache_path(x.device), dispatch.bucket_key("nm_linear", *args)
    dispatch_cache.put(path, key, {"backend": "cpu", "times_ms": {"cpu": 5000.0, "dense": 9000.0}})
    samples = []
    monkeypatch.setattr(dispatch, "_check_drift", lambda *a: samples.append(a[-1]))
    run = dispatch.probe("nm_linear", args, dispatch.implementations("nm_linear")["cpu"])
    for _ in range(9):
        torch.testing.assert_close(run(*args), x @ w.to_dense().T)
    assert len(samples) == 3
    with sk.use_backend("cpu"):  # forced: nothing to re-measure, the bare function
        assert dispatch.probe("nm_linear", args, dispatch.implementations("nm_linear")["cpu"]) is _fast_kernel


def test_suspect_entry_is_measured_again_later(measured, monkeypatch, fixed_bandwidth):
    only_backends("nm_linear", "reference", "dense")
    dispatch.register("nm_linear", "cpu", _fast_kernel)
    monkeypatch.setattr(dispatch, "SAMPLE_EVERY", 1)
    w, x, args = _weight()
    busy = {"cpu": 0.05, "dense": 0.0002}  # cpu stays implausible while "the machine is busy"
    monkeypatch.setattr(dispatch, "time_impls", lambda impls, a: dict(busy))
    assert dispatch.tune("nm_linear", *args)[0] == "dense"
    key = dispatch.bucket_key("nm_linear", *args)
    assert dispatch_cache.entries(dispatch.cache_path(x.device))[key]["suspect"] == dispatch.SUSPECT_RETRIES
    busy["cpu"] = 0.0001  # the busy process stopped
    _auto_call(args)  # selects and remembers
    _auto_call(args)  # a sample: the suspect entry is measured again
    assert dispatch.select("nm_linear", *args).backend == "cpu"


def test_cache_file_keyed_on_threads_isa_and_build(measured, monkeypatch):
    dev = torch.device("cpu")
    monkeypatch.setattr(dispatch_cache, "_paths", {})
    base = dispatch.cache_path(dev)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert dispatch.cache_path(dev) != base and f"-t{threads + 1}" in dispatch.cache_path(dev).name
    finally:
        torch.set_num_threads(threads)
    assert dispatch.cache_path(dev) == base
    if sk.HAS_C_EXT:
        from sparsekern import _C

        want = hashlib.sha256(open(_C.__file__, "rb").read()).hexdigest()[:12]
        assert dispatch_cache.build_id() == want and want in base.name
        monkeypatch.setenv("SPARSEKERN_CPU_ISA", "portable")
        assert dispatch.cache_path(dev) != base and "-portable-" in dispatch.cache_path(dev).name
        monkeypatch.delenv("SPARSEKERN_CPU_ISA")
    monkeypatch.setattr(dispatch_cache, "_paths", {})
    monkeypatch.setattr(dispatch_cache, "build_id", lambda: "rebuilt00000")
    assert dispatch.cache_path(dev) != base and "rebuilt00000" in dispatch.cache_path(dev).name


_WRITER = textwrap.dedent(
    """
    import pathlib, sys, time, torch
    import sparsekern as sk
    from sparsekern import dispatch, dispatch_cache
    first, barrier = int(sys.argv[1]), pathlib.Path(sys.argv[2])
    calls = []
    for i in range(first, first + 15):
        w = sk.NMSparseWeight.from_dense(torch.randn(16 * (i + 1), 64), n=2, m=4, prune=True)
        calls.append((torch.randn(1, 64), w.values, w.meta, 2, 4, None))
    for args in calls[:-1]:
        dispatch.record("nm_linear", args, {"dense": 1e-3, "reference": 2e-3})
    read = dispatch_cache._read
    def slow_read(path):  # both last writes read, then wait: without the lock one entry is lost
        out = read(path)
        time.sleep(0.5)
        return out
    dispatch_cache._read = slow_read
    (barrier / f"ready{first}").touch()
    while len(list(barrier.glob("ready*"))) < 2:
        time.sleep(0.001)
    dispatch.record("nm_linear", calls[-1], {"dense": 1e-3, "reference": 2e-3})
    """
)


def test_two_processes_writing_keep_every_entry(measured, tmp_path_factory):
    env = {**os.environ, "SPARSEKERN_CACHE_DIR": str(measured), "SPARSEKERN_DISPATCH": "measured"}
    barrier = tmp_path_factory.mktemp("barrier")
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(i), str(barrier)], env=env) for i in (0, 100)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    (path,) = measured.glob("dispatch-*.json")
    assert len(json.loads(path.read_text())["entries"]) == 30
    assert not list(measured.glob("*.tmp"))


def test_cli_show_clear_retune(measured, monkeypatch, capsys):
    only_backends("nm_linear", "reference", "dense")
    dispatch.register("nm_linear", "cpu", _fast_kernel)
    w, x, args = _weight(out=96, k=64, rows=5)
    monkeypatch.setattr(dispatch, "time_impls", lambda impls, a: {"cpu": 1e-3, "dense": 2e-3})
    dispatch.tune("nm_linear", *args)
    key = dispatch.bucket_key("nm_linear", *args)
    assert cli.main(["dispatch", "show"]) == 0
    out = capsys.readouterr().out
    assert f"{key} -> cpu" in out and "threads" in out and dispatch_cache.build_id() in out
    # retune: the recorded shape, pattern and dtype again, on synthetic tensors; dense wins now.
    seen = []

    def timing(impls, a):
        seen.append((tuple(a[0].shape), tuple(a[1].shape), a[0].dtype, a[3:5]))
        return {"cpu": 3e-3, "dense": 1e-3}

    monkeypatch.setattr(dispatch, "time_impls", timing)
    monkeypatch.setattr(dispatch_cache, "_memory", {})
    assert cli.main(["dispatch", "retune"]) == 0
    assert set(seen) == {((5, 64), (96, 32), torch.float32, (2, 4))}
    assert f"{key} -> dense" in capsys.readouterr().out
    assert dispatch_cache.read_file(dispatch.cache_path(x.device))[1][key]["backend"] == "dense"
    assert cli.main(["dispatch", "clear"]) == 0
    assert not dispatch_cache.files() and not list(measured.glob("*.lock"))
    assert dispatch.cached_choice("nm_linear", *args) is None
