"""Every public op under torch.library.opcheck and under torch.compile with inductor (fullgraph).

aot_eager (tests/test_ops.py, test_attention.py) only traces; inductor also generates code around
the ops from their fake implementations (strides, fusion of the ops around them), which is what
users run.
"""

import pytest
import torch

import sparsekern as sk

OPS = torch.ops.sparsekern


def _attn(b=1, h=2, sq=9, sk_len=33, d=32, kept=12):
    q, k, v = (torch.randn(b, h, s, d) for s in (sq, sk_len, sk_len))
    keep = torch.stack([torch.randperm(sk_len)[:kept] for _ in range(b * h)]).view(b, h, kept)
    return q, k, v, keep


def _cases():
    w = sk.NMSparseWeight.from_dense(torch.randn(24, 40), n=2, m=4, prune=True)
    b = sk.BlockSparseWeight.from_dense(torch.randn(36, 60), block=(12, 20), sparsity=0.5)
    q, k, v, keep = _attn()
    return {
        "nm_linear": (
            OPS.nm_linear,
            (torch.randn(2, 3, 40, requires_grad=True), w.values, w.meta, 2, 4, torch.randn(24)),
        ),
        "bsr_linear": (
            OPS.bsr_linear,
            (torch.randn(5, 60, requires_grad=True), b.crow_indices, b.col_indices, b.blocks.requires_grad_(), None),
        ),
        "token_scores": (OPS.token_scores, (q, k, True, 0.3, False)),
        "pruned_attention": (OPS.pruned_attention, (q, k, v, keep, True, None)),
        "pruned_attention_with_scores": (OPS.pruned_attention_with_scores, (q, k, v, keep, False, 0.2)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_opcheck_every_public_op(name):
    op, args = _cases()[name]
    torch.library.opcheck(op, args)


def _compiled(f):
    torch._dynamo.reset()
    return torch.compile(f, fullgraph=True, backend="inductor")


def test_inductor_linears():
    w = sk.NMSparseWeight.from_dense(torch.randn(24, 40), n=2, m=4, prune=True)
    b = sk.BlockSparseWeight.from_dense(torch.randn(36, 24), block=(12, 8), sparsity=0.5)
    bias = torch.randn(36)

    def f(x):
        return torch.nn.functional.gelu(sk.ops.bsr_linear(torch.relu(sk.ops.nm_linear(x, w)), b, bias)) * 2 + 1

    x = torch.randn(3, 5, 40)
    got = _compiled(f)(x)
    assert got.shape == (3, 5, 36)
    torch.testing.assert_close(got, f(x), rtol=1e-5, atol=1e-5)


def test_inductor_attention():
    q, k, v, keep = _attn(2, 3, 7, 40, 32, 15)

    def f(q, k, v, keep):
        out, scores = sk.ops.pruned_attention(q * 0.5, k, v, keep, causal=True, return_scores=True)
        plain = sk.ops.pruned_attention(q, k, v, keep)
        return out.sum(-1) + plain.mean(-1), scores.softmax(-1), sk.ops.token_scores(q, k, causal=True) * 3

    got, want = _compiled(f)(q, k, v, keep), f(q, k, v, keep)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
