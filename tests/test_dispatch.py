"""Measured dispatch: the dense fallback, the on-disk cache, forced backends, bad names."""

import json

import pytest
import torch
from conftest import only_backends

import sparsekern as sk
from sparsekern import dispatch, dispatch_cache, reference
from sparsekern.backends import dense as dense_backend


def _weight(out=64, k=128):
    w = sk.NMSparseWeight.from_dense(torch.randn(out, k), n=2, m=4, prune=True)
    return w, torch.randn(3, k)


def _slow_kernel(x, values, meta, n, m, bias=None):
    # Ten times the reference (decompress + the dense GEMM): slower than the dense fallback by
    # construction, and by a ratio that survives a loaded machine (a sleep would not: it yields).
    for _ in range(10):
        out = reference.nm_linear(x, values, meta, n, m, bias)
    return out


def _no_timing(*args, **kwargs):
    raise AssertionError("dispatch measured candidates where it must not")


def test_slow_sparse_kernel_loses_to_dense(measured):
    only_backends("nm_linear", "reference", "dense")
    dispatch.register("nm_linear", "cuda", _slow_kernel)
    w, x = _weight()
    args = (x, w.values, w.meta, 2, 4, None)
    assert [i.backend for i in dispatch.candidates("nm_linear", *args)] == ["cuda", "dense", "reference"]
    y = sk.ops.nm_linear(x, w)
    torch.testing.assert_close(y, x @ w.to_dense().T)
    assert dispatch.select("nm_linear", *args).backend == "dense"
    entry = dispatch_cache.entries(dispatch.cache_path(x.device))[dispatch.bucket_key("nm_linear", *args)]
    assert entry["backend"] == "dense"
    # The slow kernel was really timed (>= its sleep), and the reference was not (dense exists).
    assert entry["times_ms"]["cuda"] > entry["times_ms"]["dense"]
    assert "reference" not in entry["times_ms"]


def test_decide_needs_a_five_percent_win():
    assert dispatch.decide({"dense": 1.0, "cpu": 0.96}) == "dense"
    assert dispatch.decide({"dense": 1.0, "cpu": 0.94, "triton": 0.99}) == "cpu"
    assert dispatch.decide({"dense": 1.0, "reference": 0.5}) == "dense"
    assert dispatch.decide({"reference": 2.0, "cpu": 1.0}) == "cpu"
    below = dispatch.PREFILL_ROWS - 1
    assert dispatch.decide({"dense": 1.0, "cpu": 0.96}, rows=below) == "dense"


def test_decide_at_prefill_rows_keeps_no_copy_for_noise():
    """From PREFILL_ROWS rows on a sparse kernel up to 5% slower wins (no dense copy kept)."""
    rows = dispatch.PREFILL_ROWS
    assert dispatch.decide({"dense": 1.0, "cpu": 0.96}, rows=rows) == "cpu"
    assert dispatch.decide({"dense": 1.0, "cpu": 1.04}, rows=rows) == "cpu"
    assert dispatch.decide({"dense": 1.0, "cpu": 1.06}, rows=rows) == "dense"
    assert dispatch.decide({"dense": 1.0, "reference": 0.5}, rows=rows) == "dense"
    assert dispatch.decide({"dense": 1.0, "cpu": 1.03, "triton": 1.01}, rows=4 * rows) == "triton"


@pytest.mark.parametrize("rows, want", [(dispatch.PREFILL_ROWS - 1, "dense"), (dispatch.PREFILL_ROWS, "cuda")])
def test_tune_passes_the_rows(measured, monkeypatch, rows, want):
    """tune() of a linear gives decide() the rows of x: a kernel 2% slower than dense loses below
    PREFILL_ROWS and wins from there."""
    only_backends("nm_linear", "reference", "dense")
    dispatch.register("nm_linear", "cuda", dispatch.implementations("nm_linear")["dense"].fn)
    monkeypatch.setattr(
        dispatch, "time_impls", lambda impls, args: {i.backend: (1.02 if i.backend == "cuda" else 1.0) for i in impls}
    )
    w, _ = _weight()
    x = torch.randn(rows, w.shape[1])
    winner, times = dispatch.tune("nm_linear", x, w.values, w.meta, w.n, w.m)
    assert winner == want and times == {"dense": 1.0, "cuda": 1.02}


def test_cache_written_and_read_back(measured, monkeypatch):
    only_backends("nm_linear", "reference", "dense")
    dispatch.register("nm_linear", "cuda", _slow_kernel)
    w, x = _weight()
    sk.ops.nm_linear(x, w)
    files = list(measured.glob("dispatch-*.json"))
    assert len(files) == 1 and torch.__version__ in files[0].name and sk.__version__ in files[0].name
    data = json.loads(files[0].read_text())
    assert data["device"] == dispatch.device_name(x.device)
    assert [e["backend"] for e in data["entries"].values()] == ["dense"]
    # A new process: nothing in memory, the file answers and nothing is timed again.
    monkeypatch.setattr(dispatch_cache, "_memory", {})
    monkeypatch.setattr(dispatch, "time_impls", _no_timing)
    assert dispatch.select("nm_linear", x, w.values, w.meta, 2, 4, None).backend == "dense"
    # Another row count in the same bucket (2-4 rows) reuses the choice; 64 rows is a new bucket.
    assert dispatch.bucket_key("nm_linear", x[:2], w.values, w.meta, 2, 4) == dispatch.bucket_key(
        "nm_linear", x, w.values, w.meta, 2, 4
    )
    assert dispatch.cached_choice("nm_linear", torch.randn(64, 128), w.values, w.meta, 2, 4) is None


@pytest.mark.parametrize("garbage", ["{not json", '{"entries": {"a": 1', '["a list"]', '{"entries": {"k": 3}}', ""])
def test_corrupt_cache_file_is_tolerated(measured, garbage):
    only_backends("nm_linear", "reference", "dense")
    dispatch.register("nm_linear", "cuda", _slow_kernel)
    w, x = _weight()
    path = dispatch.cache_path(x.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(garbage)
    torch.testing.assert_close(sk.ops.nm_linear(x, w), x @ w.to_dense().T)
    data = json.loads(path.read_text())  # rewritten whole
    assert [e["backend"] for e in data["entries"].values()] == ["dense"]
    assert not list(measured.glob("*.tmp"))


def test_concurrent_writer_entries_are_kept(measured):
    w, x = _weight()
    path = dispatch.cache_path(x.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    dispatch_cache.entries(path)  # this process read the file before the other one wrote
    other = {"nm_linear|float32|r8|w1x1|2:4": {"backend": "cpu", "times_ms": {}}}
    path.write_text(json.dumps({"entries": other}))
    dispatch.tune("nm_linear", x, w.values, w.meta, 2, 4, None)
    entries = json.loads(path.read_text())["entries"]
    assert set(other) < set(entries) and len(entries) == 2


def test_forced_backend_is_never_measured(measured, monkeypatch):
    monkeypatch.setattr(dispatch, "time_impls", _no_timing)
    w, x = _weight()
    args = (x, w.values, w.meta, 2, 4, None)
    with sk.use_backend("reference"):
        assert dispatch.select("nm_linear", *args).backend == "reference"
        sk.ops.nm_linear(x, w)
    monkeypatch.setenv("SPARSEKERN_BACKEND", "dense")
    assert dispatch.select("nm_linear", *args).backend == "dense"
    torch.testing.assert_close(sk.ops.nm_linear(x, w), x @ w.to_dense().T)
    assert not list(measured.glob("dispatch-*.json"))


def test_first_policy_does_not_measure(measured, monkeypatch):
    monkeypatch.setenv("SPARSEKERN_DISPATCH", "first")
    monkeypatch.setattr(dispatch, "time_impls", _no_timing)
    only_backends("nm_linear", "reference", "dense")
    w, x = _weight()
    assert dispatch.select("nm_linear", x, w.values, w.meta, 2, 4, None).backend == "dense"
    dispatch.register("nm_linear", "cuda", _slow_kernel)
    assert dispatch.select("nm_linear", x, w.values, w.meta, 2, 4, None).backend == "cuda"


def test_use_backend_nesting_restores(measured):
    assert dispatch.current_backend() == "auto"
    with sk.use_backend("reference"):
        with sk.use_backend("dense"):
            assert dispatch.current_backend() == "dense"
            with sk.use_backend("auto"):
                assert dispatch.current_backend() == "auto"
        assert dispatch.current_backend() == "reference"
        with pytest.raises(RuntimeError), sk.use_backend("dense"):
            raise RuntimeError("boom")
        assert dispatch.current_backend() == "reference"
    assert dispatch.current_backend() == "auto"


def test_bad_names_raise(measured, monkeypatch):
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of .* got 'gpu'"):
        with sk.use_backend("gpu"):
            pass
    with pytest.raises(ValueError, match="backend: expected one of"):
        dispatch.register("nm_linear", "mkl", _slow_kernel)
    monkeypatch.setenv("SPARSEKERN_BACKEND", "fast")
    with pytest.raises(ValueError, match="SPARSEKERN_BACKEND: .* got 'fast'"):
        dispatch.current_backend()
    monkeypatch.delenv("SPARSEKERN_BACKEND")
    monkeypatch.setenv("SPARSEKERN_DISPATCH", "fastest")
    with pytest.raises(ValueError, match="SPARSEKERN_DISPATCH: expected one of .* got 'fastest'"):
        dispatch.policy()


def test_row_buckets():
    got = {r: dispatch.row_bucket(r) for r in (1, 2, 4, 5, 8, 9, 300, 512, 513, 4096)}
    assert got == {1: "1", 2: "4", 4: "4", 5: "8", 8: "8", 9: "16", 300: "512", 512: "512", 513: "513+", 4096: "513+"}


def test_bsr_bucket_tracks_block_shape_and_density():
    dense = torch.randn(64, 128)
    a = sk.BlockSparseWeight.from_dense(dense, block=(16, 16), sparsity=0.5)
    b = sk.BlockSparseWeight.from_dense(dense, block=(16, 16), sparsity=0.9)
    c = sk.BlockSparseWeight.from_dense(dense, block=(32, 16), sparsity=0.5)
    x = torch.randn(1, 128)
    keys = {dispatch.bucket_key("bsr_linear", x, w.crow_indices, w.col_indices, w.blocks) for w in (a, b, c)}
    assert len(keys) == 3


def test_dense_fallback_caches_and_invalidates(measured):
    w, x = _weight()
    with sk.use_backend("dense"):
        y1 = sk.ops.nm_linear(x, w)
        held = dense_backend.cached_bytes()
        assert held >= w.shape[0] * w.shape[1] * 4
        sk.ops.nm_linear(x, w)
        assert dense_backend.cached_bytes() == held  # no second copy for the same weight
        with torch.no_grad():
            w.values.mul_(2)  # in place: the dense copy must be rebuilt
        torch.testing.assert_close(sk.ops.nm_linear(x, w), 2 * y1)
        torch.testing.assert_close(sk.ops.nm_linear(x, w), x @ w.to_dense().T)
    dense_backend._release_nm(x, w.values)
    assert dense_backend.cached_bytes() == held - w.shape[0] * w.shape[1] * 4


def test_dense_fallback_bsr_and_release_when_dense_loses(measured, monkeypatch):
    blk = sk.BlockSparseWeight.from_dense(torch.randn(64, 128), block=(16, 16), sparsity=0.75)
    x = torch.randn(5, 128)
    only_backends("bsr_linear", "reference", "dense")
    dispatch.register("bsr_linear", "cuda", lambda x, c, k, b, bias=None: reference.bsr_linear(x, c, k, b, bias))
    monkeypatch.setattr(dispatch, "time_impls", lambda impls, args: {"dense": 1.0, "cuda": 0.5})
    before = dense_backend.cached_bytes()
    with sk.use_backend("dense"):
        torch.testing.assert_close(sk.ops.bsr_linear(x, blk), x @ blk.to_dense().T)
    assert dense_backend.cached_bytes() > before
    args = (x, blk.crow_indices, blk.col_indices, blk.blocks, None)
    assert dispatch.tune("bsr_linear", *args)[0] == "cuda"
    assert dense_backend.cached_bytes() == before  # dense lost: its copy is gone


def test_auto_predicate_picks_the_arguments_it_applies_to(measured):
    """``auto`` may be a predicate of the op's arguments: the Triton BSR kernel is a candidate for
    CUDA tensors only, float or quantized blocks (passed tests/gpu on an H200), never for CPU tensors."""
    from sparsekern.backends import triton as triton_backend

    w = sk.BlockSparseWeight.from_dense(torch.randn(64, 128), block=(16, 16), sparsity=0.5)
    x = torch.randn(2, 128)
    args = (x, w.crow_indices, w.col_indices, w.blocks, None)
    auto = triton_backend.blocks_on_cuda
    assert dispatch.implementations("bsr_linear")["triton"].auto is auto
    assert not auto(*args) and not auto(torch.empty(1, device="meta"), *args[1:])
    assert "triton" not in [i.backend for i in dispatch.candidates("bsr_linear", *args)]
    wq = w.quantize("int4", 16)
    qargs = (x, wq.crow_indices, wq.col_indices, wq.blocks, None, wq.scales, wq.zeros)
    assert not auto(*qargs)
    if torch.cuda.is_available():  # float and quantized blocks on CUDA: candidates
        assert auto(*(t.cuda() if t is not None else None for t in args))
        assert auto(*(t.cuda() if t is not None else None for t in qargs))
    only_backends("nm_linear", "reference", "dense")
    wn, xn = _weight()
    nm_args = (xn, wn.values, wn.meta, 2, 4, None)
    dispatch.register("nm_linear", "cuda", _slow_kernel, auto=lambda x, *rest: x.shape[0] > 2)
    assert [i.backend for i in dispatch.candidates("nm_linear", *nm_args)] == ["cuda", "dense", "reference"]
    assert [i.backend for i in dispatch.candidates("nm_linear", xn[:2], *nm_args[1:])] == ["dense", "reference"]
