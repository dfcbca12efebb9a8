"""The test tolerance itself (conftest.assert_matches_reference) catches a kernel that drops one product.

A kernel that skips one kept weight in one output element is the smallest real bug a sparse
linear can have (a wrong meta bit, an off-by-one tail). Here it is planted on the real op output
(the CPU kernels where the extension is built) at the shapes of tests/test_cpu_linear.py: the
dropped product has the median magnitude of that output's kept products, at a random element,
and the bound must reject it for every seed in every dtype, while the untouched output passes.
The previous bound (``2 * max torch error + ATOL * max |ref|``) let 37 of 100 such bf16 bugs pass.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, assert_matches_reference

import sparsekern as sk

SEEDS = 100
ROWS = 8


def _median_product(x_row: torch.Tensor, w_row: torch.Tensor) -> torch.Tensor:
    prods = x_row.float() * w_row.float()
    kept = prods[w_row != 0]
    return kept[kept.abs().argsort()[len(kept) // 2]]


def _plant(out, x, dense, gen):
    """``out`` with one element missing the median-magnitude product of its row."""
    r = int(torch.randint(out.shape[0], (), generator=gen))
    o = int(torch.randint(out.shape[1], (), generator=gen))
    bad = out.clone()
    bad[r, o] = (out[r, o].float() - _median_product(x[r], dense[o])).to(out.dtype)
    return bad


def _caught(out, ref32, same) -> bool:
    try:
        assert_matches_reference(out, ref32, same, "planted")
    except AssertionError:
        return True
    return False


def _nm(k_groups, gen, dtype):
    w = sk.NMSparseWeight.from_dense(torch.randn(19, 4 * k_groups, generator=gen), n=2, m=4, prune=True)
    return w.to(dtype), sk.ops.nm_linear


def _bsr(k_groups, gen, dtype):
    dense = torch.randn(96, 32 * 7, generator=gen)
    return sk.BlockSparseWeight.from_dense(dense, block=(32, 32), sparsity=0.5).to(dtype), sk.ops.bsr_linear


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("make", [_nm, _bsr], ids=["nm_2:4", "bsr_32x32"])
def test_one_dropped_product_is_caught(make, dtype):
    missed = []
    for seed in range(SEEDS):
        gen = torch.Generator().manual_seed(seed)
        w, op = make(23, gen, dtype)
        x = torch.randn(ROWS, w.shape[1], generator=gen).to(dtype)
        out = op(x, w)
        dense = w.to_dense()
        ref32 = F.linear(x.float(), dense.float())
        same = F.linear(x, dense)
        assert_matches_reference(out, ref32, same, f"correct output, seed {seed}")
        if not _caught(_plant(out, x, dense, gen), ref32, same):
            missed.append(seed)
    assert not missed, f"{dtype}: a dropped product passed the bound for seeds {missed}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_element_is_not_hidden_by_large_ones(dtype):
    """An error relative to a small element fails even when other outputs are 100x larger."""
    ref32 = torch.tensor([[100.0, 0.5]])
    same = ref32.to(dtype)
    out = same.clone()
    assert_matches_reference(out, ref32, same, "exact")
    out[0, 1] = 0.25  # off by 50% of its own value, 0.25% of the largest output
    with pytest.raises(AssertionError, match=r"1 of 2 elements out of bound; worst at \(0, 1\)"):
        assert_matches_reference(out, ref32, same, "wrong small element")


def test_magnitude_scales_the_floor():
    """Given per-element magnitudes (sum |x|*|w|), an element with cancellation gets fp32 slack."""
    ref32 = torch.tensor([1e-3, 1.0])
    out = ref32 + torch.tensor([2e-5, 0.0])
    with pytest.raises(AssertionError):
        assert_matches_reference(out, ref32, ref32, "no magnitude")
    assert_matches_reference(out, ref32, ref32, "with magnitude", magnitude=torch.tensor([100.0, 1.0]))
