"""The 2:4 hardware layout (sparsekern/formats/sm80.py) against PyTorch's own pure-torch CUTLASS
conversions, and against an emulation of how mma.sp reads metadata lane by lane (PTX ISA,
"Sparse matrix storage" / m16n8k32 .f16 metadata figure)."""

import pytest
import torch
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from sparsekern import NMSparseWeight
from sparsekern.formats import sm80

HALF = (torch.float16, torch.bfloat16)


def random_24(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense 2:4 weight with exactly two non-zeros per group, at random positions."""
    keep = torch.rand(rows, k // 4, 4).argsort(-1)[..., :2]
    mask = torch.zeros(rows, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).view(rows, k)
    if dtype == torch.int8:
        dense = torch.randint(1, 127, (rows, k), dtype=torch.int8) * (torch.randint(0, 2, (rows, k)) * 2 - 1).to(
            torch.int8
        )
    else:
        dense = torch.randn(rows, k).to(dtype)
        dense[dense == 0] = 1
    return dense * mask


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(32, 64), (64, 128), (96, 320), (32, 32)])
def test_to_cutlass_matches_torch(dtype, shape):
    dense = random_24(*shape, dtype)
    packed, meta = sparse_semi_structured_from_dense_cutlass(dense)
    w = NMSparseWeight.from_dense(dense)
    ours_packed, ours_meta = sm80.nm_to_cutlass(w)
    assert torch.equal(ours_packed, packed)
    assert ours_meta.dtype == meta.dtype and torch.equal(ours_meta, meta)
    back = sm80.cutlass_to_nm(packed, meta)
    assert torch.equal(back.values, w.values) and torch.equal(back.meta, w.meta)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(ours_packed, ours_meta), dense)


@pytest.mark.parametrize("dtype", HALF)
def test_cutlass_round_trip_of_torch_encoding(dtype):
    # Groups with fewer than 2 non-zeros: torch picks its own index pairs (e.g. 2,3 for all-zero);
    # ours -> CUTLASS -> ours and CUTLASS -> ours -> CUTLASS must both be bit-exact.
    dense = random_24(64, 128, dtype)
    dense[:, :8] = 0
    dense[3, 17] = 0
    packed, meta = sparse_semi_structured_from_dense_cutlass(dense)
    w = sm80.cutlass_to_nm(packed, meta)
    assert torch.equal(w.to_dense(), dense)
    p2, m2 = sm80.nm_to_cutlass(w)
    assert torch.equal(p2, packed) and torch.equal(m2, meta)


def test_int8_meta_matches_torch():
    dense = random_24(48, 128, torch.int8)
    _, meta = sparse_semi_structured_from_dense_cutlass(dense)
    idx = (dense.view(48, 32, 4) != 0).nonzero()[:, 2].view(48, 32, 2)
    assert meta.dtype == torch.int32
    assert torch.equal(sm80.cutlass_meta_from_indices(idx, torch.int8), meta)
    assert torch.equal(sm80.indices_from_cutlass_meta(meta, torch.int8), idx)


def emulate_mma_sp_dense(values_hw: torch.Tensor, meta_hw: torch.Tensor) -> torch.Tensor:
    """Dense W as mma.sp m16n8k32 (.f16/.bf16) would read it, written lane by lane from the PTX ISA:
    lane l = 4g + t; selector 0 takes metadata from t in {0,1} for rows 0-15 of a 32-row block,
    selector 1 from t in {2,3} for rows 16-31; thread t%2 covers K columns 16*(t%2)..+15; bits
    [15:0] are row g, [31:16] row g+8; nibble q of a half is group q (idx0 bits 1:0, idx1 bits 3:2);
    compressed column c of a row is kept value c%2 of group c//2 (A fragment = dense m16n8k16)."""
    n_pad, half_k = values_hw.shape
    dense = torch.zeros(n_pad, half_k * 2, dtype=values_hw.dtype)
    words = meta_hw.to(torch.int64) & 0xFFFFFFFF
    for j in range(meta_hw.shape[0]):
        for block in range(n_pad // 32):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                word = int(words[j, block * 32 + lane])
                tile_row = block * 32 + 16 * (t // 2)
                for hl, row in ((0, tile_row + g), (1, tile_row + g + 8)):
                    for q in range(4):
                        nib = (word >> (16 * hl + 4 * q)) & 0xF
                        group = 8 * j + 4 * (t % 2) + q
                        for s, idx in enumerate((nib & 3, nib >> 2)):
                            assert nib & 3 < nib >> 2, "invalid metadata nibble"
                            dense[row, 4 * group + idx] = values_hw[row, 2 * group + s]
    return dense


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(1, 64), (37, 100), (128, 64), (130, 132)])
def test_hw_layout_as_mma_sp_reads_it(dtype, shape):
    dense = random_24(*shape, dtype)
    w = NMSparseWeight.from_dense(dense)
    values_hw, meta_hw = sm80.hw_layout(w)
    n_pad, k_pad = sm80.hw_padded_shape(shape)
    assert n_pad % 128 == 0 and k_pad % 64 == 0
    assert values_hw.shape == (n_pad, k_pad // 2) and meta_hw.shape == (k_pad // 32, n_pad)
    assert meta_hw.dtype == torch.int32 and values_hw.dtype == dtype
    seen = emulate_mma_sp_dense(values_hw, meta_hw)
    assert torch.equal(seen[: shape[0], : shape[1]], dense)
    assert not seen[shape[0] :].any() and not seen[:, shape[1] :].any()
    back = sm80.hw_to_nm(values_hw, meta_hw, shape)
    assert torch.equal(back.values, w.values) and torch.equal(back.meta, w.meta)


@pytest.mark.parametrize("dtype", HALF)
def test_hw_and_cutlass_share_word_order(dtype):
    dense = random_24(128, 192, dtype)
    packed, meta = sparse_semi_structured_from_dense_cutlass(dense)
    values_hw, meta_hw = sm80.cutlass_to_hw(packed, meta)
    # Unpadded K (192 = 3 * 64) and N: the words are CUTLASS's int16 pairs, byte for byte.
    assert torch.equal(meta_hw.view(torch.int16).reshape(-1), meta.reshape(-1))
    assert torch.equal(values_hw, packed)
    p2, m2 = sm80.hw_to_cutlass(values_hw, meta_hw, (128, 192))
    assert torch.equal(p2, packed) and torch.equal(m2, meta)


def test_hw_layout_no_copy_when_aligned():
    w = NMSparseWeight.from_dense(random_24(128, 128, torch.float16))
    values_hw, _ = sm80.hw_layout(w)
    assert values_hw.data_ptr() == w.values.data_ptr()


def test_bad_inputs():
    w = NMSparseWeight.from_dense(torch.randn(8, 16), n=1, m=4, prune=True)
    with pytest.raises(ValueError, match="2:4"):
        sm80.hw_layout(w)
    with pytest.raises(TypeError, match="dtype"):
        sm80.hw_layout(NMSparseWeight.from_dense(torch.randn(8, 16), prune=True))
    with pytest.raises(ValueError, match="rows % 32"):
        sm80.nm_to_cutlass(NMSparseWeight.from_dense(torch.randn(30, 64).half(), prune=True))
    with pytest.raises(ValueError, match="expected shapes"):
        sm80.hw_to_nm(torch.zeros(128, 32, dtype=torch.half), torch.zeros(2, 128, dtype=torch.int32), (128, 128))
    bad = torch.zeros(32, 4, dtype=torch.int16)  # nibble 0: indices (0, 0), invalid
    with pytest.raises(ValueError, match="increasing indices"):
        sm80.cutlass_to_nm(torch.zeros(32, 32, dtype=torch.half), bad)
