"""The public ops: reference semantics, opcheck, torch.compile, autograd, bad input."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_reference

import sparsekern as sk
from sparsekern import reference

SHAPES = [(1, 64, 32), (5, 96, 48), (17, 320, 200)]  # (rows, in_features, out_features)


def _nm_weight(out, k, n, m, dtype):
    return sk.NMSparseWeight.from_dense(torch.randn(out, k).to(dtype), n=n, m=m, prune=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,k,out", SHAPES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 16)])
def test_nm_linear_reference_matches_dense(rows, k, out, n, m, dtype):
    w = _nm_weight(out, k, n, m, dtype)
    x = torch.randn(rows, k).to(dtype)
    bias = torch.randn(out).to(dtype)
    with sk.use_backend("reference"):
        y = sk.ops.nm_linear(x, w, bias)
    wd = w.to_dense()
    ref32 = x.float() @ wd.float().T + bias.float()
    assert_matches_reference(y, ref32, F.linear(x, wd, bias), f"nm_linear {n}:{m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block", [(16, 16), (32, 8), (8, 64)])
def test_bsr_linear_reference_matches_dense(block, dtype):
    b = sk.BlockSparseWeight.from_dense(torch.randn(128, 192).to(dtype), block=block, sparsity=0.7)
    x = torch.randn(9, 192).to(dtype)
    with sk.use_backend("reference"):
        y = sk.ops.bsr_linear(x, b)
    wd = b.to_dense()
    assert_matches_reference(y, x.float() @ wd.float().T, F.linear(x, wd), f"bsr_linear {block}")


def test_leading_dims_and_empty_batch():
    w = _nm_weight(24, 32, 2, 4, torch.float32)
    x = torch.randn(2, 3, 5, 32)
    y = sk.ops.nm_linear(x, w)
    assert y.shape == (2, 3, 5, 24)
    torch.testing.assert_close(y, x @ w.to_dense().T)
    assert sk.ops.nm_linear(torch.randn(0, 32), w).shape == (0, 24)
    b = sk.BlockSparseWeight.from_dense(torch.randn(32, 32), block=(16, 16))
    assert sk.ops.bsr_linear(torch.randn(4, 1, 32), b).shape == (4, 1, 32)


def test_nan_and_inf_propagate_like_dense():
    w = _nm_weight(8, 16, 2, 4, torch.float32)
    x = torch.randn(3, 16)
    x[1, 0] = float("nan")
    x[2, 5] = float("inf")
    y, ref = sk.ops.nm_linear(x, w), F.linear(x, w.to_dense())
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))


def _attn_inputs(b=2, h=3, sq=5, sk_=11, d=16, dtype=torch.float32, kept=6):
    q, k, v = (torch.randn(b, h, s, d).to(dtype) for s in (sq, sk_, sk_))
    keep = torch.stack([torch.randperm(sk_)[:kept] for _ in range(b * h)]).view(b, h, kept)
    return q, k, v, keep


def test_pruned_attention_with_every_key_equals_sdpa():
    q, k, v, _ = _attn_inputs()
    keep = torch.arange(11).expand(2, 3, 11).contiguous()
    torch.testing.assert_close(reference.pruned_attention(q, k, v, keep), F.scaled_dot_product_attention(q, k, v))
    q, k, v, _ = _attn_inputs(sq=11)
    torch.testing.assert_close(
        reference.pruned_attention(q, k, v, keep, causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True)
    )


def test_pruned_attention_causal_hidden_row_is_zero():
    q, k, v, _ = _attn_inputs(sq=2, sk_=8)
    keep = torch.full((2, 3, 2), 7, dtype=torch.int64)
    keep[..., 0] = 6  # query 0 sits at position 6: sees key 6 only; query 1 (position 7) sees both
    out = reference.pruned_attention(q, k, v, keep, causal=True)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 6])
    keep = torch.full((2, 3, 1), 7, dtype=torch.int64)
    out = reference.pruned_attention(q, k, v, keep, causal=True)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))


def test_token_scores_is_mean_attention_probability():
    q, k, _, _ = _attn_inputs()
    probs = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    torch.testing.assert_close(sk.ops.token_scores(q, k), probs.mean(-2))
    torch.testing.assert_close(sk.ops.token_scores(q, k, cls_only=True), probs[:, :, 0])
    assert torch.allclose(sk.ops.token_scores(q, k, causal=True).sum(-1), torch.ones(2, 3))


def _opcheck_cases():
    w = _nm_weight(24, 32, 2, 4, torch.float32)
    b = sk.BlockSparseWeight.from_dense(torch.randn(32, 48), block=(16, 16), sparsity=0.5)
    q, k, v, keep = _attn_inputs()
    return [
        ("nm_linear", (torch.randn(3, 32), w.values, w.meta, 2, 4, torch.randn(24))),
        ("nm_linear", (torch.randn(2, 4, 32, requires_grad=True), w.values, w.meta, 2, 4, None)),
        ("bsr_linear", (torch.randn(5, 48), b.crow_indices, b.col_indices, b.blocks, torch.randn(32))),
        ("token_scores", (q, k, True, 0.3, False)),
        ("pruned_attention", (q, k, v, keep, False, None)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.sparsekern, name), args)


def test_torch_compile_fullgraph():
    w = _nm_weight(24, 32, 2, 4, torch.float32)
    b = sk.BlockSparseWeight.from_dense(torch.randn(32, 24), block=(8, 8), sparsity=0.5)

    def f(x):
        return sk.ops.bsr_linear(torch.relu(sk.ops.nm_linear(x, w)), b) * 2

    x = torch.randn(4, 32)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))


def test_autograd_matches_dense():
    w = _nm_weight(12, 16, 2, 4, torch.float32)
    values = w.values.clone().requires_grad_()
    bias = torch.randn(12, requires_grad=True)
    x = torch.randn(3, 16, requires_grad=True)
    torch.ops.sparsekern.nm_linear(x, values, w.meta, 2, 4, bias).square().sum().backward()
    wd = w.to_dense().requires_grad_()
    x2, b2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    F.linear(x2, wd, b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bias.grad, b2.grad)
    kept_grad = sk.NMSparseWeight(values.grad, w.meta, 2, 4, w.shape).to_dense()
    torch.testing.assert_close(kept_grad, wd.grad * (w.to_dense() != 0))


def test_bad_input_errors():
    w = _nm_weight(8, 16, 2, 4, torch.float32)
    with pytest.raises(ValueError, match=r"x: expected last dimension 16 \(in_features\), got shape \(3, 12\)"):
        sk.ops.nm_linear(torch.randn(3, 12), w)
    with pytest.raises(TypeError, match="values: expected dtype torch.float16"):
        sk.ops.nm_linear(torch.randn(3, 16).half(), w)
    with pytest.raises(ValueError, match="values: expected device meta"):
        sk.ops.nm_linear(torch.randn(3, 16, device="meta"), w)
    with pytest.raises(ValueError, match=r"bias: expected shape \(8,\), got \(7,\)"):
        sk.ops.nm_linear(torch.randn(3, 16), w, torch.randn(7))
    with pytest.raises(TypeError, match="weight: expected NMSparseWeight"):
        sk.ops.nm_linear(torch.randn(3, 16), w.to_dense())
    with pytest.raises(ValueError, match="meta: expected shape"):
        torch.ops.sparsekern.nm_linear(torch.randn(3, 16), w.values, w.meta[:4], 2, 4)
    with pytest.raises(TypeError, match="x: expected dtype"):
        sk.ops.nm_linear(torch.randint(0, 2, (3, 16)), w)
    b = sk.BlockSparseWeight.from_dense(torch.randn(32, 32), block=(16, 16))
    with pytest.raises(ValueError, match="x: expected last dimension 32"):
        sk.ops.bsr_linear(torch.randn(2, 48), b)
    with pytest.raises(ValueError, match="not divisible by the block width 16"):
        torch.ops.sparsekern.bsr_linear(torch.randn(2, 40), b.crow_indices, b.col_indices, b.blocks)


def test_attention_bad_input_errors():
    q, k, v, keep = _attn_inputs()
    with pytest.raises(ValueError, match="keep_idx: expected key positions in 0..10"):
        sk.ops.pruned_attention(q, k, v, keep + 20)
    dup = keep.clone()
    dup[..., 1] = dup[..., 0]
    with pytest.raises(ValueError, match="keep_idx: a key position is repeated"):
        sk.ops.pruned_attention(q, k, v, dup)
    with pytest.raises(ValueError, match="keep_idx: the keep set is empty"):
        sk.ops.pruned_attention(q, k, v, keep[..., :0])
    with pytest.raises(TypeError, match="keep_idx: expected dtype"):
        sk.ops.pruned_attention(q, k, v, keep.int())
    with pytest.raises(TypeError, match="k: expected dtype torch.float32"):
        sk.ops.pruned_attention(q, k.half(), v, keep)
    with pytest.raises(ValueError, match="v: expected shape"):
        sk.ops.pruned_attention(q, k, v[:, :, :5], keep)
    with pytest.raises(ValueError, match=r"q: expected \[batch, heads, seq, head_dim\]"):
        sk.ops.token_scores(q[0], k)


def test_use_backend_rejects_unknown_and_reference_runs_everywhere():
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        with sk.use_backend("fast"):
            pass
    w = _nm_weight(8, 16, 2, 4, torch.float32)
    x = torch.randn(2, 16)
    with sk.use_backend("reference"):
        torch.testing.assert_close(sk.ops.nm_linear(x, w), x @ w.to_dense().T)


def test_package_works_without_extension():
    code = (
        "import torch, sparsekern as sk\n"
        "assert not sk.HAS_C_EXT\n"
        "w = sk.NMSparseWeight.from_dense(torch.randn(8, 16), prune=True)\n"
        "x = torch.randn(2, 16)\n"
        "torch.testing.assert_close(sk.ops.nm_linear(x, w), x @ w.to_dense().T)\n"
        "from sparsekern.info import render; assert 'not loaded' in render()\n"
    )
    env = {"SPARSEKERN_DISABLE_C_EXT": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_info_cli_reports_everything():
    res = subprocess.run(
        [sys.executable, "-m", "sparsekern.cli", "info"], capture_output=True, text=True, timeout=120, check=True
    )
    for key in ("sparsekern", "torch", "extension", "cpu_isa", "gpu", "backends.nm_linear"):
        assert key in res.stdout
