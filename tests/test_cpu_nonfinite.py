"""The compiled N:M linear handles NaN/Inf in x itself: those rows come out as from F.linear on
the masked dense weight (0 * inf = nan where a weight was pruned), on every row path (decode,
chunked decode, the 2:4 bf16 GEMM, decompress + GEMM) and dtype, so callers need no scan of x."""

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern import _extension, dispatch

pytestmark = pytest.mark.skipif(not _extension.HAS_C_EXT, reason="compiled extension not loaded")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 12, 37, 70])  # 2:4 on AVX-512 BF16: the 2:4 GEMM (fp32 37, 70; bf16 70)
@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (2, 8), (4, 8), (1, 8)])
def test_nonfinite_rows_match_dense(dtype, rows, pattern):
    n, m = pattern
    k, out = 8 * m + m, 24  # K not a multiple of the vector width
    w = sk.NMSparseWeight.from_dense(torch.randn(out, k), n=n, m=m, prune=True).to(dtype)
    bias = torch.randn(out).to(dtype)
    x = _with_nonfinite(torch.randn(rows, k).to(dtype))
    impl = dispatch.implementations("nm_linear")["cpu"]
    assert impl.nonfinite_exact
    y = impl.fn(x, w.values, w.meta, n, m, bias)  # the kernel alone: no Python-side fix-up
    _assert_like_dense(y, F.linear(x.float(), w.to_dense().float(), bias.float()), dtype)


def _with_nonfinite(x):
    """+inf in the first row, -inf in the last, NaN in the second (when there are 3+ rows)."""
    x[0, 1] = float("inf")
    x[-1, -1] = float("-inf")
    if x.shape[0] > 2:
        x[1, 2] = float("nan")
    return x


def _assert_like_dense(y, ref, dtype):
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), "NaN positions differ from the dense op"
    assert torch.equal(torch.isinf(y), torch.isinf(ref)) and torch.equal(y.isinf() & (y > 0), ref.isinf() & (ref > 0))
    fin = torch.isfinite(ref)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y.float()[fin], ref[fin], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 12, 37])
@pytest.mark.parametrize("sparsity", [0.5, 0.2])  # sparse kernels / fp32 dense-GEMM switch
def test_bsr_nonfinite_rows_match_dense(dtype, rows, sparsity):
    k, out = 40, 24
    w = sk.BlockSparseWeight.from_dense(torch.randn(out, k), block=(8, 8), sparsity=sparsity).to(dtype)
    bias = torch.randn(out).to(dtype)
    x = _with_nonfinite(torch.randn(rows, k).to(dtype))
    impl = dispatch.implementations("bsr_linear")["cpu"]
    assert impl.nonfinite_exact
    y = impl.fn(x, w.crow_indices, w.col_indices, w.blocks, bias)
    _assert_like_dense(y, F.linear(x.float(), w.to_dense().float(), bias.float()), dtype)
