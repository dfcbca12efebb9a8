"""The lean step's LM head, torch.ops.sparsekern._lean_head_cpu (csrc/cpu/gemv_bf16.cpp): bf16
x @ W.T against an fp32 matmul of the same values, every tail (K not a multiple of 32, out not a
multiple of the 8-row tile), 1 and 2 threads; which heads NativeStep gives it; bad arguments."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.lean import native
from sparsekern.lean.native import head_weight

ISA_OK = native.unavailable() is None and int(torch.ops.sparsekern._cpu_isa()) >= 3
pytestmark = pytest.mark.skipif(not ISA_OK, reason="needs the extension and AVX-512 BF16")
op = torch.ops.sparsekern._lean_head_cpu


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize("n, k", [(1, 1), (7, 31), (13, 33), (64, 64), (1003, 72), (4099, 577)])
def test_matches_fp32_matmul(n, k, rows, threads):
    torch.manual_seed(n * 1000 + k)
    w = torch.randn(n, k).bfloat16()
    x = torch.randn(rows, k).bfloat16()
    got = op(x, w)
    ref = F.linear(x.float(), w.float())
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    # fp32 sums in another order, then one rounding to bf16: within an ulp or two of bf16.
    torch.testing.assert_close(got.float(), ref, rtol=8e-3, atol=1e-3 * k**0.5)


def test_strided_x_and_non_finite():
    w = torch.randn(40, 96).bfloat16()
    x = torch.randn(3, 192).bfloat16()[:, ::2]  # a strided view
    x[1, 5], x[2, 7] = float("inf"), float("nan")
    got, ref = op(x, w), F.linear(x.float(), w.float())
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())
    torch.testing.assert_close(got[0].float(), ref[0], rtol=8e-3, atol=1e-2)


def test_bad_arguments():
    w, x = torch.randn(8, 16).bfloat16(), torch.randn(2, 16).bfloat16()
    with pytest.raises(TypeError, match="x: expected dtype"):
        op(x.float(), w)
    with pytest.raises(TypeError, match="weight: expected dtype"):
        op(x, w.half())
    with pytest.raises(ValueError, match=r"x: expected shape \(rows, 16\) \(in_features\), got \(2, 15\)"):
        op(x[:, :15], w)
    with pytest.raises(ValueError, match="x: expected shape"):
        op(x[0], w)
    with pytest.raises(ValueError, match="weight: expected a contiguous 2-D"):
        op(x, w.t().contiguous().t())


def test_which_heads_take_it():
    lin = nn.Linear(16, 8, bias=False).bfloat16()
    assert head_weight(lin) is lin.weight.detach() or torch.equal(head_weight(lin), lin.weight)
    assert head_weight(nn.Linear(16, 8, bias=False)) is None  # fp32: F.linear
    assert head_weight(nn.Linear(16, 8).bfloat16()) is None  # a bias
    assert head_weight(nn.Sequential(lin)) is None  # not a plain nn.Linear


def test_bf16_lean_step_runs_it():
    """So test_lean_step_cpp's bf16 cases (logits against the Python step's F.linear) cover it."""
    from test_lean_step_cpp import _model

    from sparsekern.lean.generate import decoder_for

    model = _model("llama", "2:4", torch.bfloat16)
    assert decoder_for(model).stepper(2).head is not None
    assert decoder_for(_model("llama", "2:4", torch.float32)).stepper(2).head is None
