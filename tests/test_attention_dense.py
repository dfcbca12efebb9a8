"""The ``dense`` pruned_attention (gather + torch SDPA, sparsekern/backends/dense.py) against the reference.

It is the yardstick every sparse attention kernel must beat, so it must be right first: fp32 to
fp32 rounding, low precision within the error of a plain low-precision softmax(QK^T)V on the same
kept keys (an independent computation: the bound is not this backend's own error).
"""

import pytest
import torch
from conftest import DTYPES, assert_matches_reference

import sparsekern
from sparsekern import dispatch, reference
from sparsekern import ops as skops

SHAPES = [  # (B, H, Sq, Sk, D, kept): odd sizes, decode, every key kept, a real Llama decode head set
    (2, 3, 113, 203, 59, 70),
    (1, 2, 70, 130, 32, 130),
    (3, 4, 1, 301, 64, 77),
    (1, 32, 1, 4096, 128, 1024),
]


def _inputs(b, h, sq, sk, d, kept, dtype):
    q, k, v = (torch.randn(b, h, s, d).to(dtype) for s in (sq, sk, sk))
    keep = torch.stack([torch.randperm(sk)[:kept] for _ in range(b * h)]).view(b, h, kept)
    return q, k, v, keep


def plain_attention(q, k, v, keep, causal):
    """softmax(q kk^T) vv in q's dtype, every step rounded: the low-precision yardstick."""
    idx = keep.unsqueeze(-1).expand(-1, -1, -1, q.shape[-1])
    kk, vv = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
    logits = (q @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    hidden = None
    if causal:
        qpos = torch.arange(q.shape[2], device=q.device).view(1, 1, -1, 1) + (k.shape[2] - q.shape[2])
        hidden = keep.unsqueeze(-2) > qpos
        logits = logits.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(logits.float(), -1).to(q.dtype)
    if hidden is not None:
        probs = probs.masked_fill(hidden.all(-1, keepdim=True), 0)
    return probs @ vv


def _check(q, k, v, keep, causal, what):
    with sparsekern.use_backend("dense"):
        out = skops.pruned_attention(q, k, v, keep, causal=causal)
    f32 = [t.float() for t in (q, k, v)]
    ref = reference.pruned_attention(*f32, keep, causal)
    mag = reference.pruned_attention(*f32[:2], f32[2].abs(), keep, causal)
    low = q.dtype != torch.float32
    assert_matches_reference(out, ref, plain_attention(q, k, v, keep, causal), what, magnitude=mag, rounded_terms=low)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(shape, causal, dtype):
    _check(*_inputs(*shape, dtype), causal, f"{shape} causal={causal} {dtype}")


def test_causal_query_that_sees_nothing_is_zero():
    q, k, v, _ = _inputs(1, 2, 6, 10, 40, 3, torch.float32)
    keep = torch.tensor([[[9, 7, 8]], [[0, 9, 5]]]).view(1, 2, 3)  # query i sits at position 4 + i
    with sparsekern.use_backend("dense"):
        out = skops.pruned_attention(q, k, v, keep, causal=True, scale=0.3)
    torch.testing.assert_close(out, reference.pruned_attention(q, k, v, keep, True, 0.3), atol=1e-5, rtol=1e-5)
    assert (out[0, 0, :3] == 0).all() and not out.isnan().any()
    torch.testing.assert_close(out[0, 1, 0], v[0, 1, 0], atol=1e-6, rtol=1e-6)  # sees only key 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_dropped_key_is_caught(dtype):
    """The bound of these tests is tight enough to see one kept key left out."""
    q, k, v, keep = _inputs(2, 3, 113, 203, 59, 70, dtype)
    f32 = [t.float() for t in (q, k, v)]
    ref = reference.pruned_attention(*f32, keep, False)
    mag = reference.pruned_attention(*f32[:2], f32[2].abs(), keep, False)
    with sparsekern.use_backend("dense"):
        dropped = skops.pruned_attention(q, k, v, keep[..., 1:], causal=False)
    with pytest.raises(AssertionError, match="out of bound"):
        assert_matches_reference(
            dropped,
            ref,
            plain_attention(q, k, v, keep, False),
            "planted",
            magnitude=mag,
            rounded_terms=dtype != torch.float32,
        )


def test_registered_as_the_dense_yardstick():
    impl = dispatch.implementations("pruned_attention")["dense"]
    assert impl.auto and impl.supports(torch.empty(1, 1, 1, 8)) is None
