"""CPU kernels of token_scores / pruned_attention (csrc/cpu/attention*.cpp) against the reference.

Every ISA the CPU has is tested (``SPARSEKERN_CPU_ISA`` lowers the choice per call). Low-precision
error is bounded by torch's own error in the same dtype (``assert_matches_reference``).
"""

import pytest
import torch
from conftest import DTYPES, assert_matches_reference

import sparsekern
from sparsekern import _extension, reference
from sparsekern import ops as skops
from sparsekern.backends import dense as dense_backend

pytestmark = pytest.mark.skipif(not _extension.HAS_C_EXT, reason="compiled extension not loaded")

ISAS = ["portable", "avx2"]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("SPARSEKERN_CPU_ISA", request.param)
    if request.param == "avx2" and torch.ops.sparsekern._cpu_isa() < 1:
        pytest.skip("CPU has no AVX2+FMA")
    with sparsekern.use_backend("cpu"):
        yield request.param


def _qkv(b, h, sq, sk, d, dtype):
    return [torch.randn(b, h, s, d).to(dtype) for s in (sq, sk, sk)]


def _keep(b, h, sk, kept):
    # Unsorted on purpose: the kernels must not assume ascending positions.
    return torch.stack([torch.randperm(sk)[:kept] for _ in range(b * h)]).view(b, h, kept)


def _torch_attention(q, k, v, keep_idx, causal):
    """Plain torch in q's dtype (gather + SDPA): the yardstick for low-precision error. It is the
    dense backend itself (tests/test_attention_dense.py checks it against the reference)."""
    return dense_backend.pruned_attention(q, k, v, keep_idx, causal)


def _torch_scores(q, k, causal, cls_only):
    if cls_only:
        q, causal = q[:, :, :1], False
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        qpos = torch.arange(q.shape[2]).view(-1, 1) + (k.shape[2] - q.shape[2])
        logits = logits.masked_fill(torch.arange(k.shape[2]) > qpos, float("-inf"))
    return torch.softmax(logits, -1).mean(-2).float()


def _f32(*ts):
    return [t.float() for t in ts]


SHAPES = [  # (B, H, Sq, Sk, D, kept): flash-attention's odd 113x203 with head dim 59, tails, sizes
    (2, 3, 113, 203, 59, 70),
    (1, 2, 70, 130, 32, 130),
    (1, 2, 65, 97, 64, 50),
    (1, 1, 17, 40, 128, 33),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pruned_attention(isa, shape, causal, dtype):
    b, h, sq, sk, d, kept = shape
    q, k, v = _qkv(b, h, sq, sk, d, dtype)
    keep = _keep(b, h, sk, kept)
    out = skops.pruned_attention(q, k, v, keep, causal=causal)
    ref = reference.pruned_attention(*_f32(q, k, v), keep, causal)
    assert_matches_reference(out, ref, _torch_attention(q, k, v, keep, causal), f"{isa} {shape} {dtype}")


@pytest.mark.parametrize("d", [59, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pruned_attention_decode(isa, d, dtype):
    q, k, v = _qkv(3, 4, 1, 301, d, dtype)
    keep = _keep(3, 4, 301, 77)
    for causal in (False, True):  # one query at position Sk-1 sees every key: same result
        out = skops.pruned_attention(q, k, v, keep, causal=causal)
        ref = reference.pruned_attention(*_f32(q, k, v), keep, causal)
        assert_matches_reference(out, ref, _torch_attention(q, k, v, keep, causal), f"{isa} decode d={d}")


def test_causal_edges(isa):
    """Kept keys after a query's position are invisible; a query that sees none gets zeros."""
    q, k, v = _qkv(1, 2, 6, 10, 40, torch.float32)
    # Query i sits at position 4 + i. Head 0 keeps only late keys: queries 0..2 see nothing.
    keep = torch.tensor([[[9, 7, 8]], [[0, 9, 5]]]).view(1, 2, 3)
    out = skops.pruned_attention(q, k, v, keep, causal=True, scale=0.3)
    ref = reference.pruned_attention(q, k, v, keep, True, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out[0, 0, :3] == 0).all() and (out[0, 0, 3:] != 0).all()
    # Head 1, query 0 (position 4) sees only key 0: its output is v[0] exactly.
    torch.testing.assert_close(out[0, 1, 0], v[0, 1, 0], atol=1e-6, rtol=1e-6)


def test_keep_order_does_not_matter(isa):
    q, k, v = _qkv(2, 2, 37, 90, 64, torch.float32)
    keep = _keep(2, 2, 90, 45)
    perm = torch.randperm(45)
    out_a, sc_a = skops.pruned_attention(q, k, v, keep, causal=True, return_scores=True)
    out_b, sc_b = skops.pruned_attention(q, k, v, keep[..., perm], causal=True, return_scores=True)
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sc_a[..., perm], sc_b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sq", [1, 113], ids=["decode", "prefill"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pruned_attention_with_scores(isa, sq, causal, dtype):
    q, k, v = _qkv(2, 3, sq, 203, 59, dtype)
    keep = _keep(2, 3, 203, 101)
    out, scores = skops.pruned_attention(q, k, v, keep, causal=causal, return_scores=True)
    ref_out, ref_scores = reference.pruned_attention_with_scores(*_f32(q, k, v), keep, causal)
    assert_matches_reference(out, ref_out, _torch_attention(q, k, v, keep, causal), "out")
    assert scores.dtype == torch.float32 and scores.shape == keep.shape
    assert_matches_reference(scores, ref_scores, _torch_scores_kept(q, k, keep, causal), "scores")


def _torch_scores_kept(q, k, keep, causal):
    idx = keep.unsqueeze(-1).expand(-1, -1, -1, q.shape[-1])
    logits = (q @ torch.gather(k, 2, idx).transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        qpos = torch.arange(q.shape[2]).view(1, 1, -1, 1) + (k.shape[2] - q.shape[2])
        logits = logits.masked_fill(keep.unsqueeze(-2) > qpos, float("-inf"))
    return torch.softmax(logits, -1).nan_to_num(0.0).mean(-2).float()


@pytest.mark.parametrize("shape", [(2, 3, 113, 203, 59), (1, 2, 1, 300, 128), (1, 1, 64, 64, 32)], ids=str)
@pytest.mark.parametrize("mode", ["full", "causal", "cls"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_scores(isa, shape, mode, dtype):
    b, h, sq, sk, d = shape
    q, k, _ = _qkv(b, h, sq, sk, d, dtype)
    causal, cls_only = mode == "causal", mode == "cls"
    out = skops.token_scores(q, k, causal=causal, cls_only=cls_only)
    ref = reference.token_scores(*_f32(q, k), causal, None, cls_only)
    assert_matches_reference(out, ref, _torch_scores(q, k, causal, cls_only), f"{isa} {shape} {mode}")
    torch.testing.assert_close(out.sum(-1), torch.ones(b, h), atol=1e-4, rtol=0)  # each query's mass is 1


def test_strided_inputs(isa):
    """[B, S, H, D] tensors transposed to [B, H, S, D] (what HF models pass) need no copy."""
    b, s, h, d = 2, 50, 3, 64
    q, k, v = (torch.randn(b, s, h, d).transpose(1, 2) for _ in range(3))
    keep = _keep(b, h, s, 20)
    out = skops.pruned_attention(q, k, v, keep, causal=True, scale=0.2)
    torch.testing.assert_close(out, reference.pruned_attention(q, k, v, keep, True, 0.2), atol=1e-5, rtol=1e-5)
    scores = skops.token_scores(q, k, causal=True)
    torch.testing.assert_close(scores, reference.token_scores(q, k, True), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda k: torch.tensor([[[1, 1, 2]]]), ValueError, "repeated"),
        (lambda k: torch.tensor([[[0, 5, 10]]]), ValueError, r"0\.\.9"),
        (lambda k: torch.tensor([[[-1, 2]]]), ValueError, r"0\.\.9"),
        (lambda k: torch.zeros(1, 1, 0, dtype=torch.int64), ValueError, "empty"),
        (lambda k: torch.tensor([[[1, 2]]], dtype=torch.int32), TypeError, "keep_idx"),
        (lambda k: torch.tensor([[1, 2]]), ValueError, "keep_idx"),
    ],
    ids=["duplicate", "too_large", "negative", "empty", "int32", "2d"],
)
def test_bad_keep_idx(make, err, match):
    q, k, v = _qkv(1, 1, 4, 10, 32, torch.float32)
    with sparsekern.use_backend("cpu"), pytest.raises(err, match=match):
        skops.pruned_attention(q, k, v, make(k))


def test_bad_tensors():
    q, k, v = _qkv(1, 2, 4, 10, 32, torch.float32)
    keep = _keep(1, 2, 10, 3)
    with sparsekern.use_backend("cpu"):
        with pytest.raises(TypeError, match="k: expected dtype torch.float32"):
            skops.pruned_attention(q, k.half(), v, keep)
        with pytest.raises(ValueError, match="v: expected device"):
            skops.pruned_attention(q, k, v.to("meta"), keep)
        with pytest.raises(ValueError, match="keep_idx: expected device"):
            skops.pruned_attention(q, k, v, keep.to("meta"))
        with pytest.raises(ValueError, match=r"k: expected \[1, 2, Sk, 32\]"):
            skops.token_scores(q, k[..., :16])
        with pytest.raises(TypeError, match="q: expected dtype"):
            skops.token_scores(q.double(), k.double())


def test_opcheck():
    q, k, v = _qkv(1, 2, 9, 33, 40, torch.float32)
    keep = _keep(1, 2, 33, 12)
    ops = torch.ops.sparsekern
    for op, args in [
        (ops.pruned_attention, (q, k, v, keep, True, 0.3)),
        (ops.pruned_attention_with_scores, (q, k, v, keep, True, None)),
        (ops.token_scores, (q, k, True, None, False)),
        (ops._pruned_attention_cpu, (q, k, v, keep, False, None)),
        (ops._pruned_attention_scores_cpu, (q, k, v, keep, True, None)),
        (ops._token_scores_cpu, (q, k, False, None, True)),
    ]:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    q, k, v = _qkv(1, 2, 9, 33, 64, torch.float32)
    keep = _keep(1, 2, 33, 12)

    def f(q, k, v, keep):
        out, scores = skops.pruned_attention(q, k, v, keep, causal=True, return_scores=True)
        return out * 2, scores + 1, skops.token_scores(q, k, causal=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with sparsekern.use_backend("cpu"):
        got, want = compiled(q, k, v, keep), f(q, k, v, keep)
    torch.testing.assert_close(got, want)
