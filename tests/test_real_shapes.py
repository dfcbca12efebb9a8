"""One real model shape per op (Llama-7B MLP, 32 heads of 128), decode and a 64-row batch.

The other CPU tests use small odd shapes (largest K 368); these catch what only long K loops,
many output tiles or thousands of keys show (accumulator growth, chunking, thread splits).
Marked slow, and run by default (pyproject's addopts deselects nothing).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_reference

import sparsekern as sk
from sparsekern import reference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def up_proj():  # 2:4, [11008, 4096]
    g = torch.Generator().manual_seed(0)
    return sk.NMSparseWeight.from_dense(torch.randn(11008, 4096, generator=g) * 0.02, n=2, m=4, prune=True)


@pytest.fixture(scope="module")
def down_proj():  # block 32x32 at 90%, [4096, 11008]
    g = torch.Generator().manual_seed(1)
    return sk.BlockSparseWeight.from_dense(torch.randn(4096, 11008, generator=g) * 0.02, block=(32, 32), sparsity=0.9)


def _check_linear(op, w, rows, dtype, what):
    w = w.to(dtype)
    x = torch.randn(rows, w.shape[1]).to(dtype)
    bias = torch.randn(w.shape[0]).to(dtype)
    out = op(x, w, bias)
    dense = w.to_dense()
    ref32 = F.linear(x.float(), dense.float(), bias.float())
    assert_matches_reference(out, ref32, F.linear(x, dense, bias), what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 64])
def test_nm_linear_llama_up_proj(up_proj, rows, dtype):
    _check_linear(sk.ops.nm_linear, up_proj, rows, dtype, f"2:4 11008x4096 rows={rows}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 64])
def test_bsr_linear_llama_down_proj(down_proj, rows, dtype):
    _check_linear(sk.ops.bsr_linear, down_proj, rows, dtype, f"block32x32:0.9 4096x11008 rows={rows}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sq", [1, 64], ids=["decode", "prefill64"])
def test_pruned_attention_32_heads(sq, dtype):
    """32 heads of 128 over 4096 keys, 25% kept (heavy hitters + recent window), causal."""
    h, sk_len, d, kept = 32, 4096, 128, 1024
    q, k, v = (torch.randn(1, h, s, d).to(dtype) for s in (sq, sk_len, sk_len))
    recent = torch.arange(sk_len - 256, sk_len)
    heavy = torch.stack([torch.randperm(sk_len - 256)[: kept - 256] for _ in range(h)])
    keep = torch.cat([heavy, recent.expand(h, -1)], -1).view(1, h, kept)
    out, scores = sk.ops.pruned_attention(q, k, v, keep, causal=True, return_scores=True)
    ref, ref_scores = reference.pruned_attention_with_scores(q.float(), k.float(), v.float(), keep, True)
    assert_matches_reference(out, ref, reference.pruned_attention(q, k, v, keep, True), f"attention sq={sq}")
    assert_matches_reference(scores, ref_scores, ref_scores, "scores")
