"""SparseLinear: a drop-in nn.Linear; outputs equal the masked dense layer."""

import pytest
import torch
from conftest import assert_matches_reference
from torch import nn

import sparsekern as sk
from sparsekern.nn.linear import SparseLinear
from sparsekern.prune import prune_weight

PATTERNS = ["2:4", "1:4", "4:8", "block16x16:0.5"]


def _linear(k, out, dtype=torch.float32, bias=True):
    lin = nn.Linear(k, out, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.normal_()
        if bias:
            lin.bias.normal_()
    return lin


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5)])
def test_matches_masked_dense(pattern, dtype, lead):
    out = 48 if pattern.startswith("block") else 40  # 40 rows: not a multiple of a 16-row tile
    lin = _linear(64, out, dtype)
    layer = SparseLinear.from_linear(lin, pattern)
    masked, mask = prune_weight(lin.weight.detach(), pattern, "magnitude")
    assert torch.equal(layer.weight, masked), "stored weight is not the pruned weight"
    assert torch.equal(layer.weight != 0, mask & (lin.weight != 0))
    x = torch.randn(*lead, 64, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        ref32 = x.float() @ masked.float().T + lin.bias.float()
        same = nn.functional.linear(x, masked, lin.bias)
        assert_matches_reference(y, ref32, same, f"{pattern} {dtype} {lead}")
        # to_linear is the masked dense layer
        torch.testing.assert_close(layer.to_linear()(x), same, rtol=0, atol=0)


def test_no_bias_and_repr():
    layer = SparseLinear.from_linear(_linear(32, 8, bias=False), "2:4")
    assert layer.bias is None
    assert "pattern=2:4" in repr(layer) and "in_features=32" in repr(layer) and "bias=False" in repr(layer)
    x = torch.randn(4, 32)
    torch.testing.assert_close(layer(x), x @ layer.weight.T, rtol=1e-5, atol=1e-5)


def test_already_pruned_and_refusals():
    lin = _linear(32, 16)
    pruned = SparseLinear.from_linear(lin, "2:4").to_linear()
    again = SparseLinear.from_linear(pruned, "2:4", method=None)  # compress as is, no re-pruning
    assert torch.equal(again.weight, pruned.weight)
    with pytest.raises(ValueError, match="row .* group"):
        SparseLinear.from_linear(lin, "2:4", method=None)  # dense weight does not follow 2:4
    with pytest.raises(ValueError, match="unstructured"):
        SparseLinear.from_linear(lin, "unstructured:0.5")
    with pytest.raises(ValueError, match="in_features=30"):
        SparseLinear.from_linear(_linear(30, 8), "2:4")
    with pytest.raises(TypeError, match="Conv1D"):
        SparseLinear.from_linear(nn.Conv2d(3, 3, 1), "2:4")


def test_wanda_inputs_reach_prune():
    lin = _linear(32, 16)
    act = torch.rand(32) * 10
    layer = SparseLinear.from_linear(lin, "2:4", "wanda", act_norm=act)
    want, _ = prune_weight(lin.weight.detach(), "2:4", "wanda", act_norm=act)
    assert torch.equal(layer.weight, want)


def test_conv1d():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 32)  # nf=out=24, nx=in=32, weight [32, 24]
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    layer = SparseLinear.from_linear(conv, "2:4")
    assert (layer.in_features, layer.out_features) == (32, 24)
    masked, _ = prune_weight(conv.weight.detach().t(), "2:4")
    ref = Conv1D(24, 32)
    with torch.no_grad():
        ref.weight.copy_(masked.t())
        ref.bias.copy_(conv.bias)
        x = torch.randn(2, 3, 32)
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


def test_memory_really_shrinks():
    lin = _linear(256, 128)
    layer = SparseLinear.from_linear(lin, "2:4")
    for t in list(layer.parameters()) + list(layer.buffers()):
        assert tuple(t.shape) != (128, 256), "a dense copy of the weight is kept"
    held = sum(t.numel() * t.element_size() for t in list(layer.parameters()) + list(layer.buffers()))
    dense = lin.weight.numel() * 4 + lin.bias.numel() * 4
    assert held == layer.nbytes() < 0.6 * dense


def test_to_dtype_and_half_keep_int_meta():
    layer = SparseLinear.from_linear(_linear(64, 16), "2:4")
    h = layer.to(torch.float16)
    assert h.values.dtype == torch.float16 and h.bias.dtype == torch.float16 and h.meta.dtype == torch.int32
    b = SparseLinear.from_linear(_linear(32, 32), "block16x16:0.5").half()
    assert (
        b.blocks.dtype == torch.float16 and b.crow_indices.dtype == torch.int32 and b.col_indices.dtype == torch.int32
    )
    x = torch.randn(3, 64, dtype=torch.float16)
    ref32 = x.float() @ h.weight.float().T + h.bias.float()
    assert_matches_reference(h(x), ref32, nn.functional.linear(x, h.weight, h.bias), "half")


@pytest.mark.parametrize("pattern", ["2:4", "block16x16:0.75"])
def test_state_dict_round_trip(pattern):
    a = SparseLinear.from_linear(_linear(64, 32), pattern)
    b = SparseLinear.from_linear(_linear(64, 32), pattern if pattern == "2:4" else "block16x16:0.25")
    keys = {"values", "meta", "bias"} if pattern == "2:4" else {"crow_indices", "col_indices", "blocks", "bias"}
    assert set(a.state_dict()) == keys
    b.load_state_dict(a.state_dict())  # block count differs for BSR: resized on load
    x = torch.randn(5, 64)
    assert torch.equal(a(x), b(x))


def test_load_state_dict_refuses_wrong_shape():
    a = SparseLinear.from_linear(_linear(64, 32), "2:4")
    b = SparseLinear.from_linear(_linear(32, 32), "2:4")
    with pytest.raises(RuntimeError, match=r"values: expected shape \(32, 16\) for \(32, 32\) at 2:4, got \(32, 32\)"):
        b.load_state_dict(a.state_dict())


def test_compile_fullgraph_and_no_grad():
    layer = SparseLinear.from_linear(_linear(64, 32), "2:4")
    x = torch.randn(2, 7, 64)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)


def test_requires_grad_follows_linear_and_backward():
    lin = _linear(32, 8)
    layer = SparseLinear.from_linear(lin, "2:4")
    assert layer.values.requires_grad and layer.bias.requires_grad
    layer(torch.randn(3, 32)).sum().backward()
    assert layer.values.grad is not None and layer.values.grad.shape == layer.values.shape
    lin.requires_grad_(False)
    assert not SparseLinear.from_linear(lin, "2:4").values.requires_grad


def test_public_export():
    assert sk.SparseLinear is SparseLinear


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_move():
    layer = SparseLinear.from_linear(_linear(64, 32), "2:4").cuda()
    assert layer.meta.is_cuda and layer.meta.dtype == torch.int32
    x = torch.randn(4, 64, device="cuda")
    torch.testing.assert_close(layer(x), layer.to_linear()(x), rtol=1e-4, atol=1e-4)
