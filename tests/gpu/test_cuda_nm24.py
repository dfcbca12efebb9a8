"""The CUDA 2:4 mma.sp kernel against the reference on a real GPU (skipped without one).

Until this file has passed on a GPU, the backend stays registered with auto=False.
"""

import pytest
import torch
from conftest import assert_matches_reference

import sparsekern
from sparsekern.backends import cuda as cuda_backend

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not cuda_backend.has_kernel(),
    reason="needs a CUDA GPU and the extension built with CUDA",
)

# (M, N, K): decode, odd M/N, K not a multiple of 64 (pad path) or of 8 (x copy path), large.
SHAPES = [(1, 4096, 4096), (7, 200, 136), (64, 128, 64), (65, 130, 132), (333, 1000, 452), (2048, 11008, 4096)]


def _weight(n, k, dtype):
    return sparsekern.NMSparseWeight.from_dense(torch.randn(n, k, device="cuda", dtype=dtype), prune=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference(shape, dtype, with_bias):
    m, n, k = shape
    w = _weight(n, k, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype) if with_bias else None
    with sparsekern.use_backend("cuda"):
        out = sparsekern.ops.nm_linear(x, w, bias)
    dense = w.to_dense()
    ref32 = x.float() @ dense.float().T + (bias.float() if bias is not None else 0)
    same = torch.nn.functional.linear(x, dense, bias)
    assert_matches_reference(out, ref32, same, f"nm24_mma {shape} {dtype}")


def test_non_contiguous_and_unaligned_x():
    w = _weight(256, 200, torch.float16)
    x = torch.randn(9, 201, device="cuda", dtype=torch.float16)[:, 1:]  # misaligned rows
    with sparsekern.use_backend("cuda"):
        out = sparsekern.ops.nm_linear(x, w)
    dense = w.to_dense()
    assert_matches_reference(out, x.float() @ dense.float().T, x @ dense.T, "unaligned x")


def test_nan_propagates():
    w = _weight(128, 64, torch.bfloat16)
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    x[2, 5] = float("nan")
    with sparsekern.use_backend("cuda"):
        out = sparsekern.ops.nm_linear(x, w)
    assert out[2].isnan().any() and not out[[0, 1, 3]].isnan().any()


def test_opcheck():
    w = _weight(128, 128, torch.float16)
    values_hw, meta_hw = cuda_backend.hw_weight(w.values, w.meta)
    x = torch.randn(5, 128, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.sparsekern._nm24_mma, (x, values_hw, meta_hw, 128, None))
