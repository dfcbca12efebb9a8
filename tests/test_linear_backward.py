"""Gradients of nm_linear / bsr_linear (ops.nm_linear_backward / bsr_linear_backward) against
dense autograd of ``F.linear`` on the decompressed weight.

x.grad and bias.grad must equal the dense ones; values.grad / blocks.grad must equal the dense
weight's gradient read at the kept positions (in storage order). fp32, shapes that are multiples
of no tile, leading dims, and through SparseLinear (its planned path has its own autograd node).
"""

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.nn.linear import SparseLinear

TOL = dict(rtol=1e-5, atol=1e-5)


def _dense_grads(x, dense, bias, gy):
    """(x.grad, W.grad, bias.grad) of sum(F.linear(x, W, bias) * gy), all by dense autograd."""
    x = x.detach().requires_grad_(True)
    w = dense.detach().requires_grad_(True)
    b = None if bias is None else bias.detach().requires_grad_(True)
    out = F.linear(x, w, b)
    return out, torch.autograd.grad(out, [x, w] + ([b] if b is not None else []), gy)


def _block_grads(w_grad, weight: sk.BlockSparseWeight) -> torch.Tensor:
    """The dense gradient cut into the stored blocks, in crow/col order: [nnz, bm, bk]."""
    bm, bk = weight.block
    crow, col = weight.crow_indices.tolist(), weight.col_indices.tolist()
    tiles = []
    for r in range(len(crow) - 1):
        for i in range(crow[r], crow[r + 1]):
            tiles.append(w_grad[r * bm : (r + 1) * bm, col[i] * bk : (col[i] + 1) * bk])
    return torch.stack(tiles) if tiles else w_grad.new_zeros(0, bm, bk)


CASES_NM = [((2, 4), (7,), 37, 84), ((1, 4), (2, 3), 19, 92), ((3, 8), (1,), 5, 120), ((5, 16), (4, 5), 13, 208)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CASES_NM, ids=lambda c: f"{c[0][0]}:{c[0][1]}-{'x'.join(map(str, c[1]))}")
def test_nm_linear_backward_matches_dense(case, bias):
    (n, m), lead, out_f, k = case
    w = sk.NMSparseWeight.from_dense(torch.randn(out_f, k), n=n, m=m, prune=True)
    values = w.values.clone().requires_grad_(True)
    x = torch.randn(*lead, k, requires_grad=True)
    b = torch.randn(out_f, requires_grad=True) if bias else None
    gy = torch.randn(*lead, out_f)
    out = torch.ops.sparsekern.nm_linear(x, values, w.meta, n, m, b)
    got = torch.autograd.grad(out, [x, values] + ([b] if bias else []), gy)
    dense = w.to_dense()
    ref_out, (gx, gw, *gb) = _dense_grads(x, dense, b, gy)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(got[0], gx, **TOL)
    # Kept weights are non-zero (randn), in ascending column order per row, as values stores them.
    torch.testing.assert_close(got[1], gw[dense != 0].view(out_f, -1), **TOL)
    if bias:
        torch.testing.assert_close(got[2], gb[0], **TOL)


CASES_BSR = [((16, 8), (7,), 48, 40, 0.5), ((12, 20), (2, 3), 36, 100, 0.6), ((32, 32), (1,), 96, 160, 0.9)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CASES_BSR, ids=lambda c: f"{c[0][0]}x{c[0][1]}-{'x'.join(map(str, c[1]))}")
def test_bsr_linear_backward_matches_dense(case, bias):
    block, lead, out_f, k, sparsity = case
    w = sk.BlockSparseWeight.from_dense(torch.randn(out_f, k), block=block, sparsity=sparsity)
    blocks = w.blocks.clone().requires_grad_(True)
    x = torch.randn(*lead, k, requires_grad=True)
    b = torch.randn(out_f, requires_grad=True) if bias else None
    gy = torch.randn(*lead, out_f)
    out = torch.ops.sparsekern.bsr_linear(x, w.crow_indices, w.col_indices, blocks, b)
    got = torch.autograd.grad(out, [x, blocks] + ([b] if bias else []), gy)
    ref_out, (gx, gw, *gb) = _dense_grads(x, w.to_dense(), b, gy)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(got[0], gx, **TOL)
    torch.testing.assert_close(got[1], _block_grads(gw, w), **TOL)
    if bias:
        torch.testing.assert_close(got[2], gb[0], **TOL)


def test_bsr_backward_with_empty_block_rows():
    """Block row 1 stores nothing: its blocks get no gradient slot, the others keep their order."""
    keep = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    dense = torch.randn(48, 64) * keep.repeat_interleave(16, 0).repeat_interleave(16, 1)
    w = sk.BlockSparseWeight.from_dense(dense, block=(16, 16))
    assert w.crow_indices.tolist() == [0, 2, 2, 4]
    blocks = w.blocks.clone().requires_grad_(True)
    x, gy = torch.randn(5, 64), torch.randn(5, 48)
    out = torch.ops.sparsekern.bsr_linear(x, w.crow_indices, w.col_indices, blocks)
    (g,) = torch.autograd.grad(out, [blocks], gy)
    _, (_, gw) = _dense_grads(x, w.to_dense(), None, gy)
    torch.testing.assert_close(g, _block_grads(gw, w), **TOL)


@pytest.mark.parametrize("pattern", ["2:4", "block8x8:0.5"])
def test_sparse_linear_backward_matches_dense(pattern):
    lin = torch.nn.Linear(72, 40)
    layer = SparseLinear.from_linear(lin, pattern)
    param = layer.values if layer.block is None else layer.blocks
    x = torch.randn(2, 3, 72, requires_grad=True)
    gy = torch.randn(2, 3, 40)
    got = torch.autograd.grad(layer(x), [x, param, layer.bias], gy)
    dense = layer.weight.detach()
    _, (gx, gw, gb) = _dense_grads(x, dense, layer.bias, gy)
    torch.testing.assert_close(got[0], gx, **TOL)
    want = gw[dense != 0].view(40, -1) if layer.block is None else _block_grads(gw, layer.sparse_weight)
    torch.testing.assert_close(got[1], want, **TOL)
    torch.testing.assert_close(got[2], gb, **TOL)
