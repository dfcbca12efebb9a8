"""DenseHead (sparsekern/nn/dense_head.py): the dense LM head whose decode rows run
``_lean_head_cpu``. Which calls take the kernel (a profiler sees the op) and which fall back to
F.linear, its result against an fp64 matmul, and where it comes from: sparsify's default
``head="auto"``, ``from_pretrained`` and ``sk.load`` of a sparsekern folder. The kernel itself is
tested in tests/test_lean_head.py."""

import pytest
import tiny_lm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

import sparsekern as sk
from sparsekern.lean import native
from sparsekern.nn.dense_head import DenseHead, most_rows, use_dense_head

ISA = int(torch.ops.sparsekern._cpu_isa()) if native.unavailable() is None else -1
pytestmark = pytest.mark.skipif(ISA < 1, reason="needs the extension and AVX2")
BF16 = pytest.param(torch.bfloat16, id="bf16")
FP32 = pytest.param(torch.float32, id="fp32")
TOL = {torch.bfloat16: (8e-3, 1e-3), torch.float32: (1e-5, 1e-6)}  # as test_lean_head: atol per sqrt(k)
OP = "sparsekern::_lean_head_cpu"


def _head(n, k, dtype, bias=False):
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    lin.__class__ = DenseHead
    return lin


def _ran_kernel(fn) -> tuple[torch.Tensor, bool]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, any(e.name == OP for e in prof.events())


@pytest.mark.parametrize("dtype", [BF16, FP32])
@pytest.mark.parametrize("lead", [(1,), (5,), (1, 1), (2, 4), (8, 1, 1)], ids=str)
def test_decode_rows_take_the_kernel(dtype, lead):
    """x's leading dims (ROWS rows at most in all); odd vocabulary and width; fp64 reference."""
    torch.manual_seed(sum(lead))
    n, k = 1003, 577
    head = _head(n, k, dtype)
    x = torch.randn(*lead, k).to(dtype)
    with torch.no_grad():
        got, ran = _ran_kernel(lambda: head(x))
    assert ran and got.shape == (*x.shape[:-1], n) and got.dtype == dtype
    ref = F.linear(x.double(), head.weight.double())
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol * k**0.5)


@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_most_rows(dtype):
    head = _head(64, 48, dtype)
    with torch.no_grad():
        for rows, want in ((most_rows(dtype), True), (most_rows(dtype) + 1, False)):
            x = torch.randn(rows, 48).to(dtype)
            got, ran = _ran_kernel(lambda x=x: head(x))
            assert ran == want, rows
            torch.testing.assert_close(got.float(), F.linear(x.float(), head.weight.float()), rtol=8e-3, atol=5e-2)


def test_falls_back_to_f_linear(monkeypatch):
    x = torch.randn(1, 32)
    with torch.no_grad():
        biased = _head(16, 32, torch.float32, bias=True)
        got, ran = _ran_kernel(lambda: biased(x))
        assert not ran and torch.equal(got, F.linear(x, biased.weight, biased.bias))
        head = _head(16, 32, torch.float32)
        got, ran = _ran_kernel(lambda: head(x[:0]))  # no rows
        assert not ran and got.shape == (0, 16)
        with pytest.raises(RuntimeError):  # another dtype: F.linear's own error
            head(x.double())
        monkeypatch.setenv("SPARSEKERN_CPU_ISA", "portable")  # this CPU without AVX2, as far as the kernels know
        got, ran = _ran_kernel(lambda: head(x))
        assert not ran and torch.equal(got, F.linear(x, head.weight))
    monkeypatch.delenv("SPARSEKERN_CPU_ISA")
    # autograd to record: F.linear, and gradients flow
    x.requires_grad_(True)
    got, ran = _ran_kernel(lambda: head(x))
    assert not ran
    got.sum().backward()
    assert x.grad is not None and head.weight.grad is not None


@pytest.mark.parametrize("tie", [False, True])
def test_sparsify_makes_the_head_one(tie):
    torch.manual_seed(0)
    model = tiny_lm.llama(tie=tie)
    head = model.lm_head
    report = sk.sparsify(model, "2:4", progress=False)
    assert model.lm_head is head and type(head) is DenseHead  # the same object: hooks and tying stay
    if tie:
        assert head.weight is model.model.embed_tokens.weight
    row = next(r for r in report.layers if r.name == "lm_head")
    assert row.module == "skipped" and "DenseHead" in row.note
    ids = tiny_lm.ids(batch=1)
    with torch.no_grad():
        got, ran = _ran_kernel(lambda: model(ids, logits_to_keep=1).logits)
        head.__class__ = nn.Linear
        want = model(ids, logits_to_keep=1).logits
    assert ran
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sparsify_head_none_and_bad_head():
    model = tiny_lm.llama()
    sk.sparsify(model, "2:4", progress=False, head=None)
    assert type(model.lm_head) is nn.Linear
    with pytest.raises(ValueError, match=r"head: expected None, 'auto' or 'int8', got 'fast'"):
        sk.sparsify(tiny_lm.llama(), "2:4", progress=False, head="fast")
    assert use_dense_head(nn.Linear(4, 4)) == "no LM head found"
    biased = tiny_lm.llama()
    biased.lm_head = nn.Linear(64, biased.config.vocab_size, bias=True)
    assert use_dense_head(biased) == "the LM head has a bias"
    assert use_dense_head(tiny_lm.llama().half()) == "no GEMV kernel for torch.float16 on this CPU"


@pytest.mark.parametrize("tie", [False, True])
def test_loaded_folders_get_one(tmp_path, tie):
    torch.manual_seed(1)
    model = tiny_lm.llama(tie=tie)
    sk.sparsify(model, "2:4", progress=False, head=None)
    sk.save(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded.lm_head) is DenseHead
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    again = sk.load(tmp_path, tiny_lm.llama(tie=tie))
    assert type(again.lm_head) is DenseHead
    ids = tiny_lm.ids(batch=2)
    with torch.no_grad():
        want = model(ids, logits_to_keep=1).logits
        torch.testing.assert_close(loaded(ids, logits_to_keep=1).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again(ids, logits_to_keep=1).logits, want, rtol=1e-5, atol=1e-5)


def test_a_dense_checkpoint_loads_as_saved(tmp_path):
    """No sparse layer in the folder: sk.load leaves the head alone (same sums as before saving)."""
    model = tiny_lm.llama()
    sk.save(model, tmp_path)
    fresh = sk.load(tmp_path, tiny_lm.llama())
    assert type(fresh.lm_head) is nn.Linear
