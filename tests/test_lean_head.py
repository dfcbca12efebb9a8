"""The lean step's LM head, torch.ops.sparsekern._lean_head_cpu (csrc/cpu/gemv.cpp): bf16 and fp32
x @ W.T against an fp32 matmul of the same values, every tail (K not a multiple of the vector,
out not a multiple of the 8-row tile), 1 and 2 threads, each ISA level with a GEMV (AVX2,
AVX-512, AVX-512 BF16) this CPU has; which heads NativeStep gives it; bad arguments. The lean step's dense linears run the same kernels (tests/test_lean_step_cpp.py)."""

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import ISAS, RUNNABLE_ISAS
from torch import nn

from sparsekern.lean import native
from sparsekern.lean.native import head_weight

ISA = int(torch.ops.sparsekern._cpu_isa()) if native.unavailable() is None else -1
pytestmark = pytest.mark.skipif(ISA < 1, reason="needs the extension and AVX2")
BF16 = pytest.param(torch.bfloat16, id="bf16")
# fp32 sums in another order (bf16: then one rounding to bf16): rtol, atol per sqrt(k).
TOL = {torch.bfloat16: (8e-3, 1e-3), torch.float32: (1e-5, 1e-6)}
op = torch.ops.sparsekern._lean_head_cpu


# Each GEMV path this CPU runs (AVX2; AVX-512 for fp32; AVX-512 BF16 for bf16), through conftest's
# `isa` fixture.
GEMV_ISAS = pytest.mark.parametrize("isa", [name for name in RUNNABLE_ISAS if ISAS[name] >= 1], indirect=True)


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [BF16, pytest.param(torch.float32, id="fp32")])
@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize("n, k", [(1, 1), (7, 15), (13, 33), (64, 64), (1003, 72), (4099, 577)])
@GEMV_ISAS
def test_matches_fp32_matmul(n, k, rows, dtype, threads, isa):
    torch.manual_seed(n * 1000 + k)
    w = torch.randn(n, k).to(dtype)
    x = torch.randn(rows, k).to(dtype)
    got = op(x, w)
    ref = F.linear(x.double(), w.double())
    assert got.dtype == dtype and got.shape == (rows, n)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol * k**0.5)


@functools.cache
def _smollm2_head(dtype):
    torch.manual_seed(49152)
    return (torch.randn(49152, 576) * 0.05).to(dtype)


@pytest.mark.parametrize("dtype", [BF16, pytest.param(torch.float32, id="fp32")])
@pytest.mark.parametrize("rows", [1, 3])
@GEMV_ISAS
def test_real_head_shape(rows, dtype, isa):
    """SmolLM2-135M's tied head, 49152 x 576 (conftest poisons the op's output with NaN first: a
    row left unwritten would show)."""
    w = _smollm2_head(dtype)
    x = torch.randn(rows, 576).to(dtype)
    got = op(x, w)
    assert not got.isnan().any()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double(), F.linear(x.double(), w.double()), rtol=rtol, atol=atol * 576**0.5)


@pytest.mark.parametrize("dtype", [BF16, pytest.param(torch.float32, id="fp32")])
@GEMV_ISAS
def test_strided_x_and_non_finite(dtype, isa):
    w = torch.randn(40, 96).to(dtype)
    x = torch.randn(3, 192).to(dtype)[:, ::2]  # a strided view
    x[1, 5], x[2, 7] = float("inf"), float("nan")
    got, ref = op(x, w), F.linear(x.float(), w.float())
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())
    torch.testing.assert_close(got[0].float(), ref[0], rtol=8e-3, atol=1e-2)


def test_bad_arguments():
    w, x = torch.randn(8, 16), torch.randn(2, 16)
    with pytest.raises(TypeError, match="x: expected dtype"):
        op(x.half(), w.half())
    with pytest.raises(TypeError, match=r"weight: expected dtype torch.float32 \(that of x\), got torch.bfloat16"):
        op(x, w.bfloat16())
    with pytest.raises(ValueError, match=r"x: expected shape \(rows, 16\) \(in_features\), got \(2, 15\)"):
        op(x[:, :15], w)
    with pytest.raises(ValueError, match="x: expected shape"):
        op(x[0], w)
    with pytest.raises(ValueError, match="weight: expected a contiguous 2-D"):
        op(x, w.t().contiguous().t())


def test_which_heads_take_it():
    for dtype in (torch.float32, torch.bfloat16):
        lin = nn.Linear(16, 8, bias=False).to(dtype)
        assert head_weight(lin).data_ptr() == lin.weight.data_ptr()
    assert head_weight(nn.Linear(16, 8, bias=False).half()) is None
    assert head_weight(nn.Linear(16, 8).bfloat16()) is None  # a bias
    assert head_weight(nn.Sequential(lin)) is None  # not a plain nn.Linear


def test_lean_step_runs_it():
    """So test_lean_step_cpp's cases (logits against the Python step's F.linear) cover it."""
    from test_lean_step_cpp import _model

    from sparsekern.lean.generate import decoder_for

    def runs(dtype):
        head = decoder_for(_model("llama", "2:4", dtype)).stepper(2).head
        return getattr(head, "func", None) is torch.ops.sparsekern._lean_head_cpu.default

    assert runs(torch.float32) and runs(torch.bfloat16)
    assert not runs(torch.float16)  # the head module
