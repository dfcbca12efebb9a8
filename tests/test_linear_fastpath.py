"""SparseLinear's planned path: eager calls run the layer's plans, not ``torch.ops.sparsekern.*``,
and must do exactly what the op does (backend choice, forced backends, NaN/Inf, weight updates)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_reference, only_backends
from torch.utils._python_dispatch import TorchDispatchMode

from sparsekern import dispatch, reference
from sparsekern.nn.linear import SparseLinear


def _layer(pattern, k=72, out=40, dtype=torch.float32):
    lin = torch.nn.Linear(k, out).to(dtype)
    return SparseLinear.from_linear(lin, pattern)


class _PublicOpCalls(TorchDispatchMode):
    """Records the calls that reach ``torch.ops.sparsekern.nm_linear`` / ``bsr_linear``."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "sparsekern" and func.__name__.split(".")[0] in ("nm_linear", "bsr_linear"):
            self.calls.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def op_calls():
    """Calls that went through the public op (the planned path does not)."""
    with _PublicOpCalls() as mode:
        yield mode.calls


@pytest.mark.parametrize("pattern", ["2:4", "1:8", "block8x8:0.5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(), (1,), (5,), (2, 3)])
def test_planned_path_matches_reference(op_calls, pattern, dtype, lead):
    layer = _layer(pattern, dtype=dtype).requires_grad_(False)
    w, b = layer.weight.float(), layer.bias.float()
    for grad_mode in (torch.no_grad, torch.enable_grad):  # nothing requires grad: both plannable
        x = torch.randn(*lead, layer.in_features).to(dtype)
        with grad_mode():
            out = layer(x)
        assert_matches_reference(out, F.linear(x.float(), w, b), F.linear(x, w.to(dtype), b.to(dtype)), pattern)
    assert op_calls == []


@pytest.mark.parametrize("pattern", ["2:4", "block8x8:0.5"])
@pytest.mark.parametrize("x_grad", [False, True])
def test_gradients_match_the_op(op_calls, pattern, x_grad):
    layer = _layer(pattern)  # from an nn.Linear: its parameters require grad
    params = [layer.dtype_param(), layer.bias]
    x = torch.randn(2, 3, layer.in_features, requires_grad=x_grad)
    gy = torch.randn(2, 3, layer.out_features)
    out = layer(x)
    got = torch.autograd.grad(out, [x, *params] if x_grad else params, gy)
    assert op_calls == []  # the planned path, with its own autograd node
    if layer.block is None:
        ref_out = torch.ops.sparsekern.nm_linear(x, layer.values, layer.meta, 2, 4, layer.bias)
    else:
        ref_out = torch.ops.sparsekern.bsr_linear(x, layer.crow_indices, layer.col_indices, layer.blocks, layer.bias)
    want = torch.autograd.grad(ref_out, [x, *params] if x_grad else params, gy)
    torch.testing.assert_close(out, ref_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_bad_input_refused_in_the_ops_words():
    layer = _layer("2:4")
    with pytest.raises(TypeError, match=r"x: expected dtype in .*got torch.float64"):
        layer(torch.randn(3, layer.in_features, dtype=torch.float64))
    with pytest.raises(TypeError, match="values: expected dtype torch.float16"):
        layer(torch.randn(3, layer.in_features, dtype=torch.float16))
    with pytest.raises(ValueError, match="x: expected last dimension 72"):
        layer(torch.randn(3, 71))
    # An empty batch works.
    assert layer(torch.randn(0, layer.in_features)).shape == (0, layer.out_features)


@pytest.mark.parametrize("pattern", ["2:4", "block8x8:0.5"])
def test_nonfinite_inputs_propagate_like_dense(pattern):
    layer = _layer(pattern)
    x = torch.randn(4, layer.in_features)
    x[1, 5], x[3, 0] = float("inf"), float("nan")
    with torch.no_grad():
        out, dense = layer(x), F.linear(x, layer.weight, layer.bias)
    assert torch.equal(torch.isnan(out), torch.isnan(dense)) and torch.equal(torch.isinf(out), torch.isinf(dense))
    finite = torch.isfinite(dense)
    torch.testing.assert_close(out[finite], dense[finite], rtol=1e-4, atol=1e-4)


def _counting(calls, name):
    def fn(x, values, meta, n, m, bias=None):
        calls.append(name)
        return reference.nm_linear(x, values, meta, n, m, bias)

    return fn


def test_forced_backend_is_honoured_call_by_call(measured):
    calls = []
    dispatch.register("nm_linear", "triton", _counting(calls, "triton"), auto=False)
    layer = _layer("2:4")
    x = torch.randn(2, layer.in_features)
    with torch.no_grad():
        layer(x)
        with dispatch.use_backend("triton"):
            layer(x)
        layer(x)
    assert calls == ["triton"]


def test_plan_follows_new_choices(measured):
    calls = []
    only_backends("nm_linear", "dense")
    dispatch.register("nm_linear", "triton", _counting(calls, "triton"))
    layer = _layer("2:4")
    x = torch.randn(2, layer.in_features)
    args = (x, layer.values, layer.meta, 2, 4, layer.bias)
    dispatch.record("nm_linear", args, {"dense": 1e-3, "triton": 1.0})
    with torch.no_grad():
        layer(x)
        assert calls == []
        dispatch.record("nm_linear", args, {"dense": 1.0, "triton": 1e-3})
        layer(x)
    assert calls == ["triton"]


def test_dense_plan_sees_weight_updates(measured):
    only_backends("nm_linear", "reference", "dense")
    layer = _layer("2:4")
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        before = layer(x)
        assert dispatch.select("nm_linear", x, layer.values, layer.meta, 2, 4, layer.bias).backend == "dense"
        layer.values.mul_(2)  # in place: the cached dense copy is stale now
        after = layer(x)
        torch.testing.assert_close(after, F.linear(x, layer.weight, layer.bias))
        other = _layer("2:4")
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), F.linear(x, other.weight, other.bias))
    assert not torch.allclose(before, after)


def test_plans_are_not_copied_or_pickled(measured):
    import copy
    import io

    only_backends("nm_linear", "reference", "dense")
    layer = _layer("2:4", k=256, out=256).requires_grad_(False)
    x = torch.randn(2, 256)
    with torch.no_grad():
        out = layer(x)  # the plan now holds a 256 KiB dense copy
        assert len(layer._plans) == 1
        twin = copy.deepcopy(layer)
        assert len(twin._plans) == 0
        torch.testing.assert_close(twin(x), out)
    buf = io.BytesIO()
    torch.save(layer, buf)
    assert buf.tell() < layer.nbytes() + 64 * 1024  # compressed weight + pickle overhead, no dense copy


def test_dtype_change_drops_plans(measured):
    only_backends("nm_linear", "reference", "dense")
    layer = _layer("2:4").requires_grad_(False)
    x = torch.randn(2, layer.in_features)
    with torch.no_grad():
        layer(x)
        assert len(layer._plans) == 1
        layer.to(torch.bfloat16)
        assert len(layer._plans) == 0
        y = layer(x.bfloat16())
    torch.testing.assert_close(y.float(), F.linear(x, layer.weight.float(), layer.bias.float()), rtol=3e-2, atol=3e-2)
