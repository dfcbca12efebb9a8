"""Quantized block-sparse weights (int8, int4 two per byte, per-block-row scale groups, optional
zeros) through the compiled CPU op, on every ISA path this machine has, against the reference in
float64.

Rows 1..4 take the decode kernels (AVX-512: bsr_linear_quant_avx512.cpp; AVX2:
bsr_linear_quant_avx2.cpp; portable: the scalar loop), 5+ the batched micro-kernel (its pack
step dequantizes), and fp32 x past 60% of blocks stored the dequantized-tile GEMM. Group sizes: 8 and 16 columns (runs that cut the kernels'
16- / 32-column chunks: the per-lane scale path), whole chunks, and one per block row.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_reference

import sparsekern as sk
from sparsekern import _extension, reference
from sparsekern.formats.bsr import bsr_to_dense, dequantize_blocks

pytestmark = pytest.mark.skipif(not _extension.HAS_C_EXT, reason="compiled extension not loaded")

# Square and not; widths 8 (one 8-column chunk), 16, 24 (8 past a 16-column chunk), 32, 40 (int4:
# 8 past a 32-column chunk), 64, 128; heights 8 .. 128.
BLOCKS = [(8, 8), (16, 32), (32, 32), (8, 64), (32, 128), (64, 16), (16, 24), (24, 40), (128, 128)]
ROWS = [1, 2, 3, 4, 5, 17, 40]
DTYPES = [torch.float32, torch.bfloat16]


def _qweight(out, k, block, quant, group_size, symmetric, dtype, sparsity=0.5):
    w = sk.BlockSparseWeight.from_dense(torch.randn(out, k), block=block, sparsity=sparsity)
    return w.quantize(quant, group_size, symmetric).to(dtype)


def _op(x, wq, bias):
    return torch.ops.sparsekern._bsr_linear_cpu(
        x, wq.crow_indices, wq.col_indices, wq.blocks, bias, wq.scales, wq.zeros
    )


def _dense64(wq):
    """The dequantized weight in float64 from the stored scales (the reference's arithmetic)."""
    w = dequantize_blocks(wq.blocks, wq.scales.double(), wq.zeros)
    return bsr_to_dense(wq.crow_indices, wq.col_indices, w, wq.shape[1])


def _check(y, x, wq, bias, what, dense=None):
    """Against the reference in float64 from the stored scales; the bound per element is
    conftest's: twice torch's own error in x's dtype, one rounding to it, and a floor scaled to
    the element's sum of |w * x| (one dropped product lies far above it)."""
    dense = _dense64(wq) if dense is None else dense
    b64 = None if bias is None else bias.double()
    ref = reference.bsr_linear(
        x.double(), wq.crow_indices, wq.col_indices, wq.blocks, b64, wq.scales.double(), wq.zeros
    )
    same = F.linear(x, dense.to(x.dtype), bias)
    mag = F.linear(x.double().abs(), dense.abs(), None if bias is None else b64.abs())
    assert_matches_reference(y, ref, same, what, magnitude=mag)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "zeros"])
@pytest.mark.parametrize("group", [8, 16, 0])
@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def test_quantized_bsr_linear_cpu(isa, block, quant, group, symmetric, dtype):
    """Every row count of ROWS (decode 1..4, batched 5+) on one weight, fresh x each."""
    bm, bk = block
    if group and bk % group:
        pytest.skip(f"group {group} does not divide the block width {bk}")
    out, k = bm * 3, bk * 7
    wq = _qweight(out, k, block, quant, group, symmetric, dtype)
    dense = _dense64(wq)
    for rows in ROWS:
        x = torch.randn(rows, k).to(dtype)
        bias = torch.randn(out).to(dtype) if rows % 2 else None
        what = f"{isa} {block} {quant} g{group} sym={symmetric} rows={rows} {dtype}"
        _check(_op(x, wq, bias), x, wq, bias, what, dense)


@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("quant", ["int8", "int4"])
# Every group size the format admits for these widths: 24 / 40 / 48 cut 16- and 32-column chunks
# unevenly, 32 / 64 whole ones.
@pytest.mark.parametrize("bk,group", [(bk, g) for bk in (48, 96, 120, 128) for g in range(8, bk + 1, 8) if bk % g == 0])
def test_every_group_size(isa, bk, group, quant, rows):
    wq = _qweight(40, bk * 5, (8, bk), quant, group, rows != 3, torch.float32)
    x = torch.randn(rows, bk * 5)
    bias = torch.randn(40)
    _check(_op(x, wq, bias), x, wq, bias, f"{isa} bk={bk} {quant} g{group} rows={rows}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [1, 4, 40])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_public_op_and_dense_fallback(isa, quant, rows, dtype):
    """sparsekern.ops.bsr_linear under the cpu backend, fp16 x too, at 20% sparsity (40 rows of
    fp32 x: the dequantized-tile GEMM)."""
    wq = _qweight(96, 256, (32, 32), quant, 16, rows != 4, dtype, sparsity=0.2)
    x = torch.randn(2, rows, 256).to(dtype)  # leading dims
    bias = torch.randn(96).to(dtype)
    with sk.use_backend("cpu"):
        y = sk.ops.bsr_linear(x, wq, bias)
    assert y.shape == (2, rows, 96)
    _check(y.reshape(-1, 96), x.reshape(-1, 256), wq, bias, f"{isa} public {quant} rows={rows} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant,group,symmetric", [("int8", 32, True), ("int4", 32, False), ("int4", 128, True)])
def test_real_shape(isa, quant, group, symmetric, dtype):
    """TinyLlama's MLP down projection, 2048 x 5632, block 32x32 at 90% (group 128: blocks
    32x128 at 90%), 1, 4 and 17 rows."""
    block = (32, 32) if group == 32 else (32, 128)
    wq = _qweight(2048, 5632, block, quant, group, symmetric, dtype, sparsity=0.9)
    dense = _dense64(wq)
    for rows in (1, 4, 17):
        x = torch.randn(rows, 5632).to(dtype)
        with sk.use_backend("cpu"):
            y = sk.ops.bsr_linear(x, wq)
        _check(y, x, wq, None, f"{isa} 2048x5632 {block} {quant} g{group} rows={rows} {dtype}", dense)


@pytest.mark.parametrize("rows", [1, 4, 17])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_empty_block_rows(isa, quant, rows):
    """One block row stores nothing (bias only there), the others a block each at either end."""
    bm, bk = 16, 32
    keep = torch.zeros(3, 5, dtype=torch.bool)
    keep[0, 0] = keep[2, 4] = True
    dense = torch.randn(3 * bm, 5 * bk) * keep.repeat_interleave(bm, 0).repeat_interleave(bk, 1)
    wq = sk.BlockSparseWeight.from_dense(dense, block=(bm, bk)).quantize(quant, 16, False)
    assert wq.crow_indices.tolist() == [0, 1, 1, 2]
    x, bias = torch.randn(rows, 5 * bk), torch.randn(3 * bm)
    y = _op(x, wq, bias)
    torch.testing.assert_close(y[:, bm : 2 * bm], bias[bm : 2 * bm].expand(rows, bm), rtol=0, atol=0)
    _check(y, x, wq, bias, f"{isa} empty block row {quant} rows={rows}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [3, 17])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_nonfinite_rows_like_dense(isa, quant, rows, dtype):
    """Rows of x holding Inf / NaN come out as from the dense op (the sparse kernels skip absent
    blocks, so the op redoes those rows densely); the other rows stay finite."""
    wq = _qweight(64, 256, (32, 32), quant, 32, False, dtype)
    x = torch.randn(rows, 256).to(dtype)
    x[1, 5] = float("inf")
    x[2, 7] = float("nan")
    y = _op(x, wq, None)
    ref = F.linear(x.float(), wq.to(torch.float32).to_dense())
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    assert (~torch.isfinite(y[1:3])).any(dim=1).all() and torch.isfinite(y[[0] + list(range(3, rows))]).all()


@pytest.mark.parametrize("rows", [1, 17])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_opcheck(quant, rows):
    wq = _qweight(32, 64, (16, 32), quant, 16, False, torch.float32)
    args = (torch.randn(rows, 64), wq.crow_indices, wq.col_indices, wq.blocks, torch.randn(32), wq.scales, wq.zeros)
    torch.library.opcheck(torch.ops.sparsekern._bsr_linear_cpu.default, args)


# bf16 x, block widths of whole 32-column chunks, one group per block row or groups of whole
# chunks: the vdpbf16ps path on AVX-512 BF16 (its 64-byte loads hold 4 int4 / 2 int8 chunks, so
# heights 10, 9 leave the last load of a block partial; 96 wide: loads that wrap a block row).
WHOLE_CHUNKS = [(10, 32), (9, 64), (9, 96), (16, 96), (11, 128), (32, 128)]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "zeros"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize(
    "bm,bk,group",
    [(bm, bk, g) for bm, bk in WHOLE_CHUNKS for g in [0, *range(32, bk, 32)] if not g or bk % g == 0],
    ids=lambda v: str(v),
)
def test_bf16_whole_chunks(isa, bm, bk, group, quant, symmetric):
    """Rows 1..4 (one, two, three, four x rows per kernel pass), x offset from zero on odd rows
    (the kernel subtracts (offset + zero) * sum(x) from exact sums of (offset + q) * x)."""
    k = bk * 6
    wq = _qweight(bm * 3, k, (bm, bk), quant, group, symmetric, torch.bfloat16)
    dense = _dense64(wq)
    for rows in (1, 2, 3, 4):
        x = (torch.randn(rows, k) + 1.5 * (rows % 2)).to(torch.bfloat16)
        bias = torch.randn(bm * 3).to(torch.bfloat16) if rows % 2 else None
        what = f"{isa} {bm}x{bk} {quant} g{group} sym={symmetric} rows={rows}"
        _check(_op(x, wq, bias), x, wq, bias, what, dense)


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "zeros"])
@pytest.mark.parametrize("group", [8, 16, 24, 32])
def test_fp16_x_rows_1_to_4(isa, quant, symmetric, group):
    """fp16 x and scales through the decode kernels, group sizes that cut the AVX2 kernel's
    16-column int4 steps (8, 24) and whole ones (16, 32), odd block height, x offset from zero."""
    bk = 48 if group in (8, 16, 24) else 64
    wq = _qweight(9 * 3, bk * 5, (9, bk), quant, group, symmetric, torch.float16)
    dense = _dense64(wq)
    for rows in (1, 2, 3, 4):
        x = (torch.randn(rows, bk * 5) + 1.5).to(torch.float16)
        bias = torch.randn(27).to(torch.float16) if rows % 2 else None
        _check(_op(x, wq, bias), x, wq, bias, f"{isa} fp16 {quant} g{group} sym={symmetric} rows={rows}", dense)


@pytest.mark.parametrize("rows", [1, 4, 17])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_no_stored_blocks(isa, quant, rows):
    """nnz = 0 (scales [0, bm, groups]): the output is the bias alone, every element written."""
    w = sk.BlockSparseWeight.from_dense(torch.zeros(32, 96), block=(16, 32)).quantize(quant, 16, False)
    assert w.blocks.shape[0] == 0
    x, bias = torch.randn(rows, 96), torch.randn(32)
    assert torch.equal(_op(x, w, bias), bias.expand(rows, 32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("bk,group", [(256, 8), (256, 32), (256, 256), (136, 8), (136, 136), (192, 64)])
def test_blocks_wider_than_128(isa, bk, group, quant, rows, dtype):
    """The raw op takes blocks wider than BlockSparseWeight makes (up to 128): the AVX-512
    kernel hands them to the AVX2 one (it has room for 8 chunks and 16 groups a block row)."""
    bm, kb, groups = 8, 3, bk // group
    crow, col = torch.tensor([0, 2, 2, 3], dtype=torch.int32), torch.tensor([0, 2, 1], dtype=torch.int32)
    nnz = col.numel()
    if quant == "int8":
        blocks = torch.randint(-128, 128, (nnz, bm, bk), dtype=torch.int8)
    else:
        blocks = torch.randint(0, 256, (nnz, bm, bk // 2), dtype=torch.uint8)
    zeros = torch.randint(-3, 12, (nnz, bm, groups), dtype=torch.int8) if rows != 3 else None
    scales = (torch.rand(nnz, bm, groups) * 0.05 + 0.01).to(dtype)
    wq = SimpleNamespace(crow_indices=crow, col_indices=col, blocks=blocks, scales=scales, zeros=zeros,
                         shape=(3 * bm, kb * bk))  # fmt: skip
    x = torch.randn(rows, kb * bk).to(dtype)
    bias = torch.randn(3 * bm).to(dtype)
    y = _op(x, wq, bias)
    assert torch.equal(y[:, bm : 2 * bm], bias[bm : 2 * bm].expand(rows, bm))
    _check(y, x, wq, bias, f"{isa} {bm}x{bk} {quant} g{group} zeros={zeros is not None} rows={rows} {dtype}")
