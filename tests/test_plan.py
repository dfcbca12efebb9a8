"""Plans (sparsekern/plan.py): made once per weight and row bucket, shared by the public op and
SparseLinear, re-made when the weight or the dispatch state changes; dense copies only where
allowed, and counted."""

import ast
import gc
import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import only_backends

import sparsekern as sk
import sparsekern.nn.linear
from sparsekern import dispatch, plan, reference
from sparsekern.backends import dense as dense_backend


@pytest.fixture
def makes(monkeypatch):
    """Every plan made: (op, backend)."""
    made = []
    real = plan.make

    def spy(name, args, dense=True):
        p = real(name, args, dense)
        made.append((name, p.backend))
        return p

    monkeypatch.setattr(plan, "make", spy)
    return made


def _nm(out=48, k=96):
    return sk.NMSparseWeight.from_dense(torch.randn(out, k), n=2, m=4, prune=True)


def test_one_plan_serves_repeated_op_calls(makes):
    w, x = _nm(), torch.randn(3, 96)
    with torch.no_grad():
        first = sk.ops.nm_linear(x, w)
        p = next(iter(plan.plans_for(w.values).values()))
        for _ in range(3):
            torch.testing.assert_close(sk.ops.nm_linear(x, w), first)
            torch.ops.sparsekern.nm_linear(x, w.values, w.meta, 2, 4)  # the op's body: same plans
    assert makes == [("nm_linear", "cpu")]
    assert next(iter(plan.plans_for(w.values).values())) is p
    sk.ops.nm_linear(torch.randn(40, 96), w)  # another row bucket: its own plan
    assert len(plan.plans_for(w.values)) == 2 and len(makes) == 2


def test_layer_plan_reused_and_remade_on_each_change(makes, monkeypatch):
    layer = sk.SparseLinear.from_linear(torch.nn.Linear(96, 48), "2:4").requires_grad_(False)
    x = torch.randn(2, 96)
    with torch.no_grad():
        layer(x)
        p = next(iter(layer._plans.values()))
        layer(x)
        assert next(iter(layer._plans.values())) is p and len(makes) == 1
        layer.values.mul_(2)  # in place: a new version
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        assert len(makes) == 2
        with sk.use_backend("reference"):
            layer(x)
        assert makes[-1] == ("nm_linear", "reference")
        layer(x)
        assert makes[-1] == ("nm_linear", "cpu")
        monkeypatch.setenv("SPARSEKERN_BACKEND", "dense")
        layer(x)
        assert makes[-1] == ("nm_linear", "dense")
        monkeypatch.delenv("SPARSEKERN_BACKEND")
        layer.to(torch.bfloat16)
        layer(x.bfloat16())
        assert makes[-1] == ("nm_linear", "cpu") and len(makes) == 6
        (key,) = layer._plans.by_key
        assert key[1] == torch.bfloat16


def test_dense_plan_sees_a_dtype_view_swap():
    # .data swapped for a view of another dtype keeps the data pointer and the version: the dense
    # copy of the fp16 weight must not serve the now-bf16 one.
    layer = sk.SparseLinear.from_linear(torch.nn.Linear(64, 32).half(), "2:4").requires_grad_(False)
    x = torch.randn(2, 64).half()
    with torch.no_grad(), sk.use_backend("dense"):
        layer(x)
        layer.values.data = layer.values.data.view(torch.bfloat16)
        with pytest.raises(TypeError, match="values: expected dtype torch.float16 .that of x., got torch.bfloat16"):
            layer(x)


@pytest.mark.parametrize("backend", ["dense", "reference"])
def test_inference_weights_checked_and_not_copied_per_weight(backend):
    # Inference tensors have no version counter: an in-place write cannot be seen, so a plan keeps
    # no dense copy of them and re-reads the BSR indices on every call.
    with torch.inference_mode():
        dense = torch.randn(32, 64)
        layer = sk.SparseLinear(sk.BlockSparseWeight.from_dense(dense, block=(16, 16), sparsity=0.5))
        x = torch.randn(2, 64)
        held = plan.dense_copy_bytes()
        with sk.use_backend(backend):
            layer(x)
            assert plan.dense_copy_bytes() == held
            layer.blocks.mul_(2)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
            layer.col_indices[0] = 9
            with pytest.raises(ValueError, match="col: entry 0 is 9, out of range 0..3"):
                layer(x)


def test_plan_callable_from_dispatch():
    w, x = _nm(), torch.randn(5, 96)
    p = dispatch.plan("nm_linear", x, w.values, w.meta, 2, 4, None)
    torch.testing.assert_close(p(x, w.values, w.meta, 2, 4, None), reference.nm_linear(x, w.values, w.meta, 2, 4))
    with pytest.raises(ValueError, match=r"x: expected last dimension 96 \(in_features\), got shape \(5, 92\)"):
        p(torch.randn(5, 92), w.values, w.meta, 2, 4, None)
    with pytest.raises(ValueError, match="x: expected last dimension 96"):
        dispatch.plan("nm_linear", torch.randn(5, 92), w.values, w.meta, 2, 4, None)  # checked when made


def test_dense_copy_bytes_counts_live_plans_once():
    gc.collect()
    before = plan.dense_copy_bytes()
    layer = sk.SparseLinear.from_linear(torch.nn.Linear(128, 64), "2:4").requires_grad_(False)
    with torch.no_grad(), sk.use_backend("dense"):
        layer(torch.randn(1, 128))
        layer(torch.randn(30, 128))  # a second bucket shares the weight's one copy
        assert len(layer._plans) == 2
        assert plan.dense_copy_bytes() - before == 64 * 128 * 4
        sk.ops.nm_linear(torch.randn(2, 128), layer.sparse_weight)  # the op's plans: the same copy
        assert plan.dense_copy_bytes() - before == 64 * 128 * 4
    del layer
    gc.collect()
    assert plan.dense_copy_bytes() == before


def _slow_sparse(x, values, meta, n, m, bias=None):
    # Ten times the reference: dense wins any measurement, by a ratio a loaded machine keeps.
    for _ in range(10):
        out = reference.nm_linear(x, values, meta, n, m, bias)
    return out


def test_dense_fallback_false_keeps_no_dense_copy(measured):
    only_backends("nm_linear", "reference", "dense")
    dispatch.register("nm_linear", "cuda", _slow_sparse)
    lin = torch.nn.Linear(128, 64)
    allowed = sk.SparseLinear.from_linear(lin, "2:4").requires_grad_(False)
    x = torch.randn(3, 128)
    with torch.no_grad():
        allowed(x)
    assert next(iter(allowed._plans.values())).backend == "dense"  # dense wins where it may
    held, copies = plan.dense_copy_bytes(), dense_backend.cached_bytes()
    layer = sk.SparseLinear.from_linear(lin, "2:4", dense_fallback=False).requires_grad_(False)
    with torch.no_grad():
        out = layer(x)
        torch.ops.sparsekern.nm_linear(x, layer.values, layer.meta, 2, 4, layer.bias)  # compile's path
        sk.ops.nm_linear(x, layer.sparse_weight, layer.bias)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias))
    assert {p.backend for p in layer._plans.values()} == {"cuda"}
    assert {p.backend for p in plan.plans_for(layer.values).values()} == {"cuda"}
    assert plan.dense_copy_bytes() == held and dense_backend.cached_bytes() == copies
    with sk.use_backend("dense"), pytest.raises(ValueError, match="dense_fallback=False"):
        layer(x)


def test_dense_fallback_survives_copy_and_move():
    import copy

    layer = sk.SparseLinear.from_linear(torch.nn.Linear(64, 32), "2:4", dense_fallback=False)
    for twin in (copy.deepcopy(layer), layer.to(torch.bfloat16)):
        assert twin.dense_fallback is False and twin._plans.dense is False
        with sk.use_backend("dense"), pytest.raises(ValueError, match="dense_fallback=False"):
            twin(torch.randn(2, 64).to(twin.dtype))
    with pytest.raises(TypeError, match="dense_fallback: expected bool, got str"):
        layer.dense_fallback = "no"


def test_sparsify_dense_fallback_false():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    report = sk.sparsify(model, "2:4", skip=(), dense_fallback=False, progress=False)
    layers = [m for m in model.modules() if isinstance(m, sk.SparseLinear)]
    assert len(layers) == 2 and all(m.dense_fallback is False for m in layers)
    with torch.no_grad(), sk.use_backend("dense"), pytest.raises(ValueError, match="dense_fallback=False"):
        model(torch.randn(2, 64))
    assert "dense copies" in str(report)


def test_sparse_linear_imports_no_backend():
    mod = sparsekern.nn.linear
    for name, value in vars(mod).items():
        origin = getattr(value, "__module__", None) or getattr(value, "__name__", "")
        assert not str(origin).startswith("sparsekern.backends"), name
    tree = ast.parse(inspect.getsource(mod))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and "backends" in m]


def test_info_reports_dense_copy_bytes():
    from sparsekern import info

    assert info.gather()["dense copies"].endswith(f"{plan.dense_copy_bytes()} bytes")
