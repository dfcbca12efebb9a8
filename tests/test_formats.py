"""NMSparseWeight and BlockSparseWeight: packing, exact round trips, validation errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsekern import BlockSparseWeight, NMSparseWeight
from sparsekern.formats.nm import SUPPORTED_M, meta_per_word, pack_meta, unpack_meta

ALL_NM = [(n, m) for m in SUPPORTED_M for n in range(1, m)]


def _nm_dense(out, k, n, m, dtype=torch.float32):
    """A random dense tensor that already satisfies n:m (some groups with fewer non-zeros)."""
    w = torch.randn(out, k, dtype=dtype)
    keep = torch.rand(out, k // m, m).argsort(-1) < n
    keep &= torch.rand(out, k // m, m) > 0.1  # some groups keep fewer than n
    return w * keep.reshape(out, k).to(dtype)


@pytest.mark.parametrize("n,m", ALL_NM)
def test_nm_round_trip_exact_every_pattern(n, m):
    dense = _nm_dense(7, m * 11, n, m)
    w = NMSparseWeight.from_dense(dense, n=n, m=m).validate()
    assert w.values.shape == (7, 11 * n) and w.meta.dtype == torch.int32
    assert torch.equal(w.to_dense(), dense)


@settings(max_examples=40, deadline=None)
@given(
    nm=st.sampled_from(ALL_NM),
    out=st.integers(1, 9),
    groups=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_nm_prune_keeps_top_n_and_round_trips(nm, out, groups, dtype):
    n, m = nm
    dense = torch.randn(out, groups * m).to(dtype)
    w = NMSparseWeight.from_dense(dense, n=n, m=m, prune=True).validate()
    pruned = w.to_dense()
    assert pruned.dtype == dtype
    g_dense, g_pruned = dense.view(out, groups, m), pruned.view(out, groups, m)
    assert ((g_pruned != 0).sum(-1) <= n).all()
    # Every kept weight is one of the top-n magnitudes of its group, copied exactly.
    kth = g_dense.abs().float().topk(n, dim=-1).values[..., -1:]
    kept = g_pruned != 0
    assert (g_dense.abs().float()[kept] >= kth.expand_as(g_dense)[kept]).all()
    assert torch.equal(g_pruned[kept], g_dense[kept])
    again = NMSparseWeight.from_dense(pruned, n=n, m=m)
    assert torch.equal(again.to_dense(), pruned) and torch.equal(again.meta, w.meta)


def test_meta_packing_by_hand_2_4():
    row = torch.tensor([[0.0, 1.5, 0.0, 2.5, 3.0, 0.0, 0.0, 4.0]])
    w = NMSparseWeight.from_dense(row, n=2, m=4)
    assert w.values.tolist() == [[1.5, 2.5, 3.0, 4.0]]
    # in-group indices 1, 3, 0, 3 at 2 bits each, least significant first
    assert w.meta.tolist() == [[1 | 3 << 2 | 0 << 4 | 3 << 6]]


def test_meta_group_with_fewer_nonzeros_uses_lowest_free_positions():
    row = torch.tensor([[0.0, 0.0, 0.0, 5.0]])
    w = NMSparseWeight.from_dense(row, n=2, m=4)
    assert unpack_meta(w.meta, 4, 2).tolist() == [[0, 3]]
    assert w.values.tolist() == [[0.0, 5.0]]


@pytest.mark.parametrize("m", SUPPORTED_M)
def test_meta_words_span_and_sign_bit(m):
    kept = meta_per_word(m) * 3 + 1  # several full words (bit 31 in use) and a partial one
    idx = torch.randint(0, m, (5, kept))
    meta = pack_meta(idx, m)
    assert meta.shape == (5, 4) and meta.dtype == torch.int32
    assert torch.equal(unpack_meta(meta, m, kept), idx)


def test_nm_to_dtype_and_device_keeps_meta():
    w = NMSparseWeight.from_dense(torch.randn(4, 16), prune=True)
    h = w.to(torch.float16)
    assert h.values.dtype == torch.float16 and h.meta.dtype == torch.int32
    assert torch.equal(h.meta, w.meta)
    assert torch.equal(h.to_dense(), w.to_dense().half())
    assert w.to("cpu").device.type == "cpu"
    with pytest.raises(TypeError, match="dtype"):
        w.to(torch.int64)


def test_nm_errors_name_the_fault():
    with pytest.raises(ValueError, match="not divisible by m=4"):
        NMSparseWeight.from_dense(torch.randn(3, 10), n=2, m=4)
    dense = _nm_dense(4, 16, 2, 4)
    dense[2, 8:12] = torch.tensor([1.0, -2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match=r"row 2, group 2 \(columns 8..11\) has 3 non-zeros"):
        NMSparseWeight.from_dense(dense, n=2, m=4)
    with pytest.raises(ValueError, match="m: expected one of"):
        NMSparseWeight.from_dense(torch.randn(3, 12), n=2, m=3)
    with pytest.raises(ValueError, match="n: expected 0 < n < m=4"):
        NMSparseWeight.from_dense(torch.randn(3, 12), n=4, m=4)
    with pytest.raises(TypeError, match="n and m: expected int"):
        NMSparseWeight.from_dense(torch.randn(3, 12), n=2.0, m=4)
    with pytest.raises(TypeError, match="dense: expected dtype"):
        NMSparseWeight.from_dense(torch.randint(0, 3, (3, 12)), n=2, m=4)
    with pytest.raises(ValueError, match="2-D"):
        NMSparseWeight.from_dense(torch.randn(3, 4, 8), n=2, m=4)


def test_nm_validate_catches_bad_meta():
    w = NMSparseWeight.from_dense(torch.randn(3, 16), prune=True)
    bad = w.meta.clone()
    bad[1, 0] = 0  # every group of row 1 now holds indices (0, 0): repeated
    broken = NMSparseWeight(w.values, bad, 2, 4, w.shape)
    with pytest.raises(ValueError, match="meta: row 1, group 0 has indices"):
        broken.validate()
    padded = w.meta.clone()
    padded[0, 0] |= 1 << 30  # a bit beyond the 8 indices (16 bits) of the row
    with pytest.raises(ValueError, match="bits set beyond"):
        NMSparseWeight(w.values, padded, 2, 4, w.shape).validate()


def test_nm_validate_in_row_chunks_reports_the_row_and_reads_bit_31():
    # 5000 rows x 64 kept: more than one chunk of validate's uint8 unpacking.
    w = NMSparseWeight.from_dense(torch.randn(5000, 128), prune=True)
    assert (w.meta < 0).any()  # bit 31 is an ordinary payload bit of 2-bit fields
    w.validate()
    bad = w.meta.clone()
    bad[4500, 1] = 0  # word 1 holds groups 8..15: indices (0, 0) from group 8 on
    with pytest.raises(ValueError, match=r"meta: row 4500, group 8 has indices \[0, 0\]"):
        NMSparseWeight(w.values, bad, 2, 4, w.shape).validate()
    w8 = NMSparseWeight.from_dense(torch.randn(4, 80), n=4, m=8, prune=True)
    top = w8.meta.clone()
    top[2, 0] |= -(1 << 31)  # 3-bit fields: 10 a word in bits 0-29; bits 30-31 unused
    with pytest.raises(ValueError, match="bits set beyond"):
        NMSparseWeight(w8.values, top, 4, 8, w8.shape).validate()


def test_nm_constructor_checks_shapes():
    w = NMSparseWeight.from_dense(torch.randn(3, 16), prune=True)
    with pytest.raises(ValueError, match="values: expected shape"):
        NMSparseWeight(w.values[:, :5], w.meta, 2, 4, w.shape)
    with pytest.raises(TypeError, match="meta: expected dtype torch.int32"):
        NMSparseWeight(w.values, w.meta.long(), 2, 4, w.shape)
    with pytest.raises(ValueError, match="meta: expected shape"):
        NMSparseWeight(w.values, w.meta[:2], 2, 4, w.shape)


BLOCKS = [(8, 8), (16, 32), (32, 32), (64, 16), (32, 128), (128, 128)]


@pytest.mark.parametrize("block", BLOCKS)
def test_bsr_round_trip_and_torch_agreement(block):
    bm, bk = block
    out, k = bm * 3, bk * 5
    tiles = torch.randn(3, bm, 5, bk) * (torch.rand(3, 1, 5, 1) > 0.5)
    dense = tiles.reshape(out, k)
    b = BlockSparseWeight.from_dense(dense, block=block).validate()
    assert b.block == block
    assert torch.equal(b.to_dense(), dense)
    ref = dense.to_sparse_bsr(block)
    assert torch.equal(b.crow_indices.long(), ref.crow_indices())
    assert torch.equal(b.col_indices.long(), ref.col_indices())
    assert torch.equal(b.blocks, ref.values())


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9])
def test_bsr_sparsity_keeps_top_blocks_by_norm(sparsity):
    dense = torch.randn(128, 256)
    b = BlockSparseWeight.from_dense(dense, block=(32, 32), sparsity=sparsity)
    total = (128 // 32) * (256 // 32)
    assert b.nnz_blocks == round((1 - sparsity) * total)
    norms = dense.view(4, 32, 8, 32).permute(0, 2, 1, 3).flatten(2).norm(dim=-1)
    kept = b.to_dense().view(4, 32, 8, 32).permute(0, 2, 1, 3).flatten(2).norm(dim=-1) > 0
    assert norms[kept].min() >= norms[~kept].max()


def test_bsr_empty_rows_and_dtypes():
    dense = torch.zeros(64, 64, dtype=torch.bfloat16)
    dense[32:48, 16:32] = torch.randn(16, 16).bfloat16()
    b = BlockSparseWeight.from_dense(dense, block=(16, 16))
    assert b.nnz_blocks == 1 and b.crow_indices.tolist() == [0, 0, 0, 1, 1]
    assert torch.equal(b.to(torch.float32).to_dense(), dense.float())


def test_bsr_errors_name_the_fault():
    with pytest.raises(ValueError, match=r"block: \(32, 32\) does not divide the weight shape \(48, 64\)"):
        BlockSparseWeight.from_dense(torch.randn(48, 64), block=(32, 32))
    with pytest.raises(ValueError, match="block: expected sides in 8..128"):
        BlockSparseWeight.from_dense(torch.randn(256, 256), block=(4, 256))
    with pytest.raises(TypeError, match="block: expected a"):
        BlockSparseWeight.from_dense(torch.randn(64, 64), block=32)
    with pytest.raises(ValueError, match="sparsity: expected a fraction"):
        BlockSparseWeight.from_dense(torch.randn(64, 64), block=(16, 16), sparsity=1.0)


def test_bsr_validate_catches_bad_indices():
    b = BlockSparseWeight.from_dense(torch.randn(32, 64), block=(16, 16))
    col = b.col_indices.clone()
    col[1] = 9
    with pytest.raises(ValueError, match="col_indices: entry 1 is 9, out of range 0..3"):
        BlockSparseWeight(b.crow_indices, col, b.blocks, b.shape).validate()
    col = b.col_indices.clone()
    col[1] = col[0]
    with pytest.raises(ValueError, match="out of order or repeated"):
        BlockSparseWeight(b.crow_indices, col, b.blocks, b.shape).validate()
    crow = b.crow_indices.clone()
    crow[-1] = 3
    with pytest.raises(ValueError, match="crow_indices: expected to start at 0 and end at nnz=8"):
        BlockSparseWeight(crow, b.col_indices, b.blocks, b.shape).validate()
    with pytest.raises(ValueError, match="crow_indices: expected 3 entries"):
        BlockSparseWeight(b.crow_indices[:2], b.col_indices, b.blocks, b.shape)
