"""The compiled CPU kernels for nm_linear / bsr_linear against the reference, on every ISA path.

Each case runs the public op under ``use_backend("cpu")`` with ``SPARSEKERN_CPU_ISA`` forced to
each instruction set this machine has (read by the kernels on every call); the others are not
generated (tests/conftest.py).
Shapes are odd on purpose (K and out not multiples of any tile); rows 1..8 take the decode
kernels, 37 and 130 the batched ones.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, RUNNABLE_ISAS, assert_matches_reference

import sparsekern as sk
from sparsekern import _extension, reference
from sparsekern.formats.nm import column_indices

pytestmark = pytest.mark.skipif(not _extension.HAS_C_EXT, reason="compiled extension not loaded")

NM = [(1, 2), (1, 4), (2, 4), (3, 4), (1, 8), (2, 8), (3, 8), (4, 8), (1, 16), (4, 16), (5, 16), (15, 16)]
# One row with block width 16, 32 or 64 takes a kernel of its own (x in registers): (64, 16),
# (16, 32), (32, 32), (8, 64); one row of bf16 x at the avx512bf16 level with width 32, 64 or 128
# takes the vdpbf16ps kernel (bsr_linear_avx512.cpp): (16, 32), (32, 32), (8, 64), (128, 128).
BLOCKS = [(8, 8), (16, 8), (16, 32), (32, 32), (64, 16), (8, 64), (12, 20), (128, 128)]
ROWS = [1, 3, 8, 13, 37, 130]  # 13: two 8-row decode passes (fp32 up to 32 rows, half types up to 64)
# Batched BSR: 5 and 7 leave partial 6-row micro tiles, 37 and 130 partial 24-row chunks.
BSR_ROWS = [1, 3, 5, 7, 8, 37, 130]


def _check(out, ref_fn, x, bias, what):
    ref32 = ref_fn(x.float(), None if bias is None else bias.float())
    same = ref_fn(x, bias)
    assert_matches_reference(out, ref32, same, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("nm", NM, ids=lambda p: f"{p[0]}:{p[1]}")
def test_nm_linear_cpu(isa, nm, rows, dtype):
    n, m = nm
    out, k = 19, m * 23  # 23 groups: the kept count is odd for odd n, never a multiple of 8
    w = sk.NMSparseWeight.from_dense(torch.randn(out, k), n=n, m=m, prune=True).to(dtype)
    x = torch.randn(rows, k).to(dtype)
    bias = torch.randn(out).to(dtype) if rows % 2 else None
    with sk.use_backend("cpu"):
        y = sk.ops.nm_linear(x, w, bias)
    dense = w.to_dense()
    _check(y, lambda xx, bb: F.linear(xx, dense.to(xx.dtype), bb), x, bias, f"{isa} {n}:{m} rows={rows} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", BSR_ROWS)
# 0.2: dense-GEMM fallback when batched (fp32 above 60% of blocks stored); 0.9: micro-kernel
@pytest.mark.parametrize("sparsity", [0.2, 0.9])
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def test_bsr_linear_cpu(isa, block, sparsity, rows, dtype):
    bm, bk = block
    out, k = bm * (3 if bm < 128 else 2), bk * (7 if bk < 128 else 3)
    w = sk.BlockSparseWeight.from_dense(torch.randn(out, k), block=block, sparsity=sparsity).to(dtype)
    x = torch.randn(rows, k).to(dtype)
    bias = torch.randn(out).to(dtype) if rows % 2 else None
    with sk.use_backend("cpu"):
        y = sk.ops.bsr_linear(x, w, bias)
    dense = w.to_dense()
    _check(y, lambda xx, bb: F.linear(xx, dense.to(xx.dtype), bb), x, bias, f"{isa} {block} rows={rows} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 37])
@pytest.mark.parametrize("block", [(16, 8), (12, 20), (32, 32)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_bsr_empty_block_rows(isa, block, rows, dtype):
    """No stored blocks at all, and one block row left empty between full ones: bias only there."""
    bm, bk = block
    out, k = 3 * bm, 5 * bk
    x, bias = torch.randn(rows, k).to(dtype), torch.randn(out).to(dtype)
    empty = torch.ops.sparsekern._bsr_linear_cpu(
        x, torch.zeros(4, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.randn(0, bm, bk).to(dtype), bias
    )
    torch.testing.assert_close(empty, bias.expand(rows, out), rtol=0, atol=0)
    # Blocks (0, 1), (0, 3), (2, 0), (2, 4): 4 of 15 stored (sparse kernel, not the GEMM
    # fallback), block row 1 stores nothing.
    keep = torch.zeros(3, 5, dtype=torch.bool)
    keep[0, 1] = keep[0, 3] = keep[2, 0] = keep[2, 4] = True
    dense = torch.randn(out, k) * keep.repeat_interleave(bm, 0).repeat_interleave(bk, 1)
    w = sk.BlockSparseWeight.from_dense(dense, block=block).to(dtype)
    assert w.crow_indices.tolist() == [0, 2, 2, 4]
    y = torch.ops.sparsekern._bsr_linear_cpu(x, w.crow_indices, w.col_indices, w.blocks, bias)
    ref = w.to_dense()
    _check(y, lambda xx, bb: F.linear(xx, ref.to(xx.dtype), bb), x, bias, f"{isa} {block} rows={rows} {dtype}")


@pytest.mark.parametrize("rows", [2, 37])
def test_leading_dims_and_reference_agree(isa, rows):
    w = sk.NMSparseWeight.from_dense(torch.randn(24, 40), n=2, m=4, prune=True)
    x = torch.randn(2, rows, 40)
    with sk.use_backend("cpu"):
        y = sk.ops.nm_linear(x, w)
    torch.testing.assert_close(y, reference.nm_linear(x, w.values, w.meta, 2, 4), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize("nm", [(2, 4), (3, 8), (1, 16)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_nm_garbage_meta_does_not_crash(isa, nm, rows):
    n, m = nm
    out, k = 33, m * 17
    w = sk.NMSparseWeight.from_dense(torch.randn(out, k), n=n, m=m, prune=True)
    garbage = torch.randint(-(2**31), 2**31 - 1, w.meta.shape, dtype=torch.int32)
    x = torch.randn(rows, k)
    y = torch.ops.sparsekern._nm_linear_cpu(x, w.values, garbage, n, m, None)
    assert y.shape == (rows, out) and torch.isfinite(y).all()


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_bsr_garbage_indices_are_refused(isa, rows):
    # The op checks the indices before any kernel reads them (csrc/cpu/op_checks.h).
    w = sk.BlockSparseWeight.from_dense(torch.randn(64, 96), block=(16, 16), sparsity=0.6)
    nnz = w.blocks.shape[0]
    crow = torch.tensor([5, -3, 2 * nnz, 1, nnz + 7], dtype=torch.int32)
    col = torch.randint(-10, 20, (nnz,), dtype=torch.int32)
    x = torch.randn(rows, 96)
    with pytest.raises(ValueError, match="crow: expected to start at 0"):
        torch.ops.sparsekern._bsr_linear_cpu(x, crow, col, w.blocks, None)


def test_backend_refuses_non_cpu_tensors():
    from sparsekern import dispatch

    impl = dispatch.implementations("nm_linear")["cpu"]
    assert "meta" in impl.supports(torch.empty(2, 8, device="meta"))
    assert impl.supports(torch.randn(2, 8)) is None


@pytest.mark.parametrize("rows", [1, 37])
def test_opcheck_nm(rows):
    w = sk.NMSparseWeight.from_dense(torch.randn(20, 48), n=2, m=4, prune=True)
    args = (torch.randn(rows, 48), w.values, w.meta, 2, 4, torch.randn(20))
    torch.library.opcheck(torch.ops.sparsekern._nm_linear_cpu.default, args)


@pytest.mark.parametrize("rows", [1, 37])
def test_opcheck_bsr(rows):
    w = sk.BlockSparseWeight.from_dense(torch.randn(32, 48), block=(16, 16), sparsity=0.5)
    args = (torch.randn(rows, 48), w.crow_indices, w.col_indices, w.blocks, torch.randn(32))
    torch.library.opcheck(torch.ops.sparsekern._bsr_linear_cpu.default, args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 70])  # 70: decompressed tiles and the GEMM
# kept = K / 2: one partial meta word (8, 20 -> 2 words), whole 16- and 32-value steps (32, 64, 128),
# and a 32-value step plus 1 or 2 words left (92, 100, 4132). fp32 with 5 rows past 16 KB of x
# (2052, 4132) takes the column-chunked kernel: 64 steps + 2 values (chunks of 32 steps end
# exactly), and 129 steps + 2. One row sums steps in 4 interleaved sums: fp32 steps 4 (128),
# 10 (324: 8 + 2 left), 129 (4132: 128 + 1); bf16 5 (324: 4 + 1), 32 (2052), 64 (4132).
@pytest.mark.parametrize("k", [16, 40, 64, 92, 100, 128, 324, 2052, 4132])
def test_nm24_every_step_tail(isa, k, rows, dtype):
    """2:4 decode kernels (the AVX-512 ones step 16 fp32 or 32 bf16 values at a time) at each tail.
    Values this short take the AVX-512 row kernels' far prefetch on any pages; the page-boundary
    prefetch of long values on 4 KiB pages runs in tests/test_real_shapes.py."""
    w = sk.NMSparseWeight.from_dense(torch.randn(21, k), n=2, m=4, prune=True).to(dtype)
    x = torch.randn(rows, k).to(dtype)
    bias = torch.randn(21).to(dtype)
    with sk.use_backend("cpu"):
        y = sk.ops.nm_linear(x, w, bias)
    dense = w.to_dense()
    _check(y, lambda xx, bb: F.linear(xx, dense.to(xx.dtype), bb), x, bias, f"{isa} 2:4 k={k} rows={rows} {dtype}")


# The sparse GEMMs. On AVX-512 BF16 (2:4 and 4:8 with 13+ rows of x; 1:4 and 2:8 with 9+ of bf16
# x, 7+ of fp32): 12-row micro tiles (7, 13, 25, 143 rows), 288-row passes (289, 300, 650),
# 16-feature tiles (in pairs in bf16) and tasks of up to 8 tiles (out 1, 15, 17, 33, 47, 300), K
# in blocks of 128 columns read as 32- (bf16) or 16-column (fp32) windows (k 4, 36, 132, 260,
# 4100; at M = 8 the next multiple of 8: a last window of 8 columns), a last slot pair of one slot
# (1:4 at k 4, 36, 132, 260), bias or none. On AVX2 (1:4 and 2:8 with 11+ rows, 4:8 13+, 2:4
# 17+; fp16 x too): passes of up to 10 vectors of 8 rows split evenly (25: 4 vectors; 143: 9 + 9;
# 289: 10 + 9 + 9 + 9; 300: 10 + 10 + 9 + 9), 640 rows transposed at a time (650: 640 + 10),
# tasks of 64 features (out 300: 4 + a partial one of 44, 5 groups of 8 and 4) or 128 (out 1100
# on 2 threads), K blocks of 64 columns (k 132: 64 + 64 + 4), a row's last 8-slot step partial
# (kept 18 at 2:4 and k 36, 33 at 1:4 and k 132). fp16 x differs only in its conversions: 2:4
# only. The other levels take the decompressed tiles here, which test_nm_linear_cpu covers.
def _gemm_tail_cases():
    # Only the cases that run: levels with a sparse GEMM that this CPU has, fp16 at AVX2 2:4, and
    # the largest shapes once (rows * out * k past 300 * 47 * 4100: covered by a smaller
    # combination of the same tails), so that no item is generated just to be skipped.
    for isa in (level for level in ("avx2", "avx512bf16") if level in RUNNABLE_ISAS):
        for n, m in ((2, 4), (1, 4), (2, 8), (4, 8)):
            for dtype in (torch.bfloat16, torch.float32, torch.float16):
                if dtype == torch.float16 and (isa != "avx2" or (n, m) != (2, 4)):
                    continue
                for rows, out, k in itertools.product(
                    [7, 13, 25, 143, 289, 300, 650], [1, 15, 17, 33, 47, 300, 1100], [4, 36, 132, 260, 4100]
                ):
                    if rows * out * k <= 300 * 47 * 4100:
                        yield pytest.param(
                            isa, (n, m), rows, out, k, dtype, id=f"{isa}-{n}:{m}-{str(dtype)[6:]}-{rows}-{out}-{k}"
                        )


@pytest.mark.parametrize(("isa", "nm", "rows", "out", "k", "dtype"), list(_gemm_tail_cases()), indirect=["isa"])
def test_nm_gemm_tails(isa, nm, rows, out, k, dtype):
    n, m = nm
    k = (k + m - 1) // m * m
    w = sk.NMSparseWeight.from_dense(torch.randn(out, k), n=n, m=m, prune=True).to(dtype)
    x = torch.randn(rows, k).to(dtype)
    bias = torch.randn(out).to(dtype) if out % 2 else None
    with sk.use_backend("cpu"):
        y = sk.ops.nm_linear(x, w, bias)
    dense = w.to_dense()
    what = f"{isa} {n}:{m} {dtype} rows={rows} out={out} k={k}"
    _check(y, lambda xx, bb: F.linear(xx, dense.to(xx.dtype), bb), x, bias, what)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rows", [5, 40])  # the decode kernel and the GEMM (fp32: or the tiles)
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (2, 8), (4, 8)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_nm_any_meta_is_the_sum_over_slots(isa, nm, rows, dtype):
    """Garbage meta (index pairs out of order, or twice the same column) gives what the format
    says: the sum over kept slots of value * x[row, its group's column], in the decode kernels and
    the sparse GEMMs (the decompressed tiles, which 40 rows take at the portable and plain AVX-512
    levels, keep one value per column instead)."""
    n, m = nm
    if rows > 32 and isa not in ("avx2", "avx512bf16"):
        pytest.skip("40 rows take the decompressed tiles here")
    out, k = 37, 260 if m == 4 else 520  # 32-slot steps and a tail: 2:4 4 + 2, 1:4 2 + 1, 4:8 8 + 4, 2:8 4 + 2
    w = sk.NMSparseWeight.from_dense(torch.randn(out, k), n=n, m=m, prune=True).to(dtype)
    garbage = torch.randint(-(2**31), 2**31 - 1, w.meta.shape, dtype=torch.int32)
    x = torch.randn(rows, k).to(dtype)
    y = torch.ops.sparsekern._nm_linear_cpu(x, w.values, garbage, n, m, None)
    kept = k // m * n
    cols = column_indices(garbage, n, m, kept)  # (the format's own decoding: fields masked to log2(m) bits)
    terms = x.float()[:, cols] * w.values.float()  # [rows, out, kept]
    ref = terms.sum(-1)
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-20
    bound = u * ref.abs() + u / 4 * terms.abs().sum(-1) + 1e-6  # (a GEMM sums 260 kept terms in one fp32 sum)
    assert ((y.float() - ref).abs() <= bound).all(), f"{isa} rows={rows}: max err {(y.float() - ref).abs().max():.3g}"


@pytest.mark.parametrize("rows", [1, 2, 5])
# kept = K / 2 (4:8) or K / 4 (1:4, 2:8) in steps of 32: a partial step only (64 at 1:4, 2:8),
# whole steps (128, 640), steps and a tail (200, 1344, 4160); one row sums steps in 4 interleaved
# sums (4:8 at 640: 10 steps, 8 + 2 left); 4:8 walks the five phases of its 3-bit meta (640, 1344:
# 21 steps, 4160: 65). 2 and 5 rows at 4160 pass 16 KB of x and take the column-chunked kernel
# (chunks of 32 steps: 32 + a tail at 1:4 and 2:8, 2 chunks + 1 step at 4:8).
@pytest.mark.parametrize("k", [64, 128, 200, 640, 1344, 4160])
@pytest.mark.parametrize("nm", [(1, 4), (2, 8), (4, 8)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_nm_bf16_every_step_tail(isa, nm, k, rows):
    """bf16 N:M other than 2:4 (on AVX-512 BF16 + VBMI: the vdpbf16ps decode kernel, 32 kept
    values a step over one or two 64-column windows of x) at each tail."""
    n, m = nm
    w = sk.NMSparseWeight.from_dense(torch.randn(21, k), n=n, m=m, prune=True).to(torch.bfloat16)
    x = torch.randn(rows, k).to(torch.bfloat16)
    bias = torch.randn(21).to(torch.bfloat16)
    with sk.use_backend("cpu"):
        y = sk.ops.nm_linear(x, w, bias)
    dense = w.to_dense()
    _check(y, lambda xx, bb: F.linear(xx, dense.to(xx.dtype), bb), x, bias, f"{isa} {n}:{m} k={k} rows={rows}")
