"""Triton ``pruned_attention`` / ``token_scores`` on a real GPU against the reference.

Skipped without a CUDA GPU (or when Triton interprets). Covers bf16 (which the interpreter
cannot run), odd shapes, decode, causal, scores, and the long-context cases of the benchmark
at a size that checks numerics. Until this passes on a GPU the Triton attention backend stays
registered with ``auto=False`` (sparsekern/backends/triton_attention.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matches_reference
from test_attention_dense import plain_attention
from triton_aot import gpu_skip_reason

import sparsekern as sk
from sparsekern import reference
from sparsekern.backends import dense as dense_backend

pytestmark = pytest.mark.skipif(gpu_skip_reason() is not None, reason=gpu_skip_reason() or "")

SHAPES = [(2, 3, 113, 203, 59, 70), (1, 4, 1, 8192, 128, 2048), (1, 8, 1024, 4096, 64, 1024), (2, 2, 77, 130, 32, 130)]


def _inputs(b, h, sq, sk_len, d, kept, dtype):
    q, k, v = (torch.randn(b, h, s, d, device="cuda").to(dtype) for s in (sq, sk_len, sk_len))
    keep = torch.stack([torch.randperm(sk_len, device="cuda")[:kept] for _ in range(b * h)]).view(b, h, kept)
    return q, k, v, keep


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_pruned_attention_gpu(shape, causal, dtype):
    q, k, v, keep = _inputs(*shape, dtype)
    with sk.use_backend("triton"):
        out, scores = sk.ops.pruned_attention(q, k, v, keep, causal=causal, return_scores=True)
    f32 = [t.float() for t in (q, k, v)]
    ref, ref_scores = reference.pruned_attention_with_scores(*f32, keep, causal)
    # P is rounded to q's dtype before P @ V (as in flash attention): see conftest's rounded_terms.
    mag = reference.pruned_attention(*f32[:2], f32[2].abs(), keep, causal)
    same = dense_backend.pruned_attention(q, k, v, keep, causal)  # gather + SDPA in q's dtype
    assert_matches_reference(out, ref, same, f"{shape} {dtype}", magnitude=mag, rounded_terms=dtype != torch.float32)
    torch.testing.assert_close(scores, ref_scores, atol=2e-3 if dtype != torch.float32 else 1e-5, rtol=0.05)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dense_pruned_attention_gpu(shape, causal, dtype):
    """The gather + SDPA yardstick (backends/dense.py) on the GPU's flash / efficient kernels."""
    q, k, v, keep = _inputs(*shape, dtype)
    with sk.use_backend("dense"):
        out = sk.ops.pruned_attention(q, k, v, keep, causal=causal)
    f32 = [t.float() for t in (q, k, v)]
    ref = reference.pruned_attention(*f32, keep, causal)
    mag = reference.pruned_attention(*f32[:2], f32[2].abs(), keep, causal)
    same = plain_attention(q, k, v, keep, causal)  # softmax(QK^T)V in q's dtype: an independent yardstick
    low = dtype != torch.float32
    assert_matches_reference(out, ref, same, f"dense {shape} {dtype}", magnitude=mag, rounded_terms=low)


@pytest.mark.parametrize("mode", ["full", "causal", "cls"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_scores_gpu(mode, dtype):
    q, k, _, _ = _inputs(2, 4, 300, 517, 64, 1, dtype)
    causal, cls_only = mode == "causal", mode == "cls"
    with sk.use_backend("triton"):
        out = sk.ops.token_scores(q, k, causal=causal, cls_only=cls_only)
    ref = reference.token_scores(q.float(), k.float(), causal, None, cls_only)
    torch.testing.assert_close(out, ref, atol=2e-3 if dtype != torch.float32 else 1e-5, rtol=0.05)
    torch.testing.assert_close(out.sum(-1), torch.ones_like(out[..., 0]), atol=1e-3, rtol=0)
