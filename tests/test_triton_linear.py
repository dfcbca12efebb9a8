"""Triton ``nm_linear`` / ``bsr_linear`` kernels under the interpreter, against the reference.

Runs through the public ops with ``use_backend("triton")`` on CPU tensors, outputs poisoned
(conftest), fp32 and fp16, odd shapes, decode and prefill rows, every N:M pattern, block
shapes 8..128 including non-square and non-power-of-two ones, split-K included.

Triton chooses interpreter or compiler for the whole process at ``import triton``
(kernels/_common.py). Unless this process was started with ``TRITON_INTERPRET=1`` (and triton
is not already imported in compile mode), the file reruns itself in a subprocess that is.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
import torch.nn.functional as F
import triton_aot
from conftest import assert_matches_reference

import sparsekern as sk

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _interpreter_process() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    tl = sys.modules.get("triton.language")
    return tl is None or type(tl.cdiv).__name__ == "InterpretedFunction"


pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")

if not _interpreter_process():
    test_interpreter_suite_in_subprocess = triton_aot.interpreter_suite_test(os.path.abspath(__file__), cost=37)

else:
    DTYPES = (torch.float32, torch.float16)
    PATTERNS = [(n, m) for m in (2, 4, 8, 16) for n in range(1, m)]

    def _check(run, x, weight, bias, what):
        """Triton in x's dtype vs the fp32 reference and vs torch in x's dtype."""
        with sk.use_backend("triton"):
            out = run(x, weight, bias)
        dense = weight.to_dense()
        ref32 = F.linear(x.float(), dense.float(), None if bias is None else bias.float())
        with sk.use_backend("reference"):
            same = run(x, weight, bias)
        assert_matches_reference(out, ref32, same, what)

    def _nm_case(rows, out, k, n, m, dtype, bias=True, lead=()):
        w = sk.NMSparseWeight.from_dense(torch.randn(out, k), n=n, m=m, prune=True).to(dtype)
        x = torch.randn(*lead, rows, k).to(dtype)
        b = torch.randn(out).to(dtype) if bias else None
        _check(sk.ops.nm_linear, x, w, b, f"nm_linear {n}:{m} rows={rows} out={out} K={k} {dtype}")

    @pytest.mark.parametrize("n,m", PATTERNS, ids=[f"{n}:{m}" for n, m in PATTERNS])
    def test_nm_every_pattern(n, m):
        i = PATTERNS.index((n, m))
        rows = (1, 3, 7, 33)[i % 4]  # gemv, gemv, tensor-core decode, prefill
        dtype = DTYPES[i % 2]
        _nm_case(rows, out=40, k=m * 9, n=n, m=m, dtype=dtype, bias=i % 3 != 0)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("rows", (1, 2, 4, 5, 16, 33, 100))
    def test_nm_rows_odd_shapes(rows, dtype):
        # out 72 and K 200 are multiples of no tile size.
        _nm_case(rows, out=72, k=200, n=2, m=4, dtype=dtype)

    @pytest.mark.parametrize("rows", (1, 9, 70))
    def test_nm_split_k(rows):
        from sparsekern.kernels import _common

        # One output tile and a long K: the wrapper splits K (the interpreter pretends 4 SMs).
        assert _common.splits_for(1, 16, torch.device("cpu")) > 1
        _nm_case(rows, out=24, k=1024, n=2, m=4, dtype=torch.float32)

    def test_nm_leading_dims_and_strided_x():
        _nm_case(3, out=40, k=64, n=2, m=4, dtype=torch.float16, lead=(2,))
        w = sk.NMSparseWeight.from_dense(torch.randn(24, 96), n=1, m=4, prune=True)
        x = torch.randn(96, 5).t()  # last dim not contiguous
        _check(sk.ops.nm_linear, x, w, None, "nm_linear strided x")

    def _all_nm_configs(rows, elem_bytes):
        from sparsekern.kernels import nm_linear as kn
        from sparsekern.kernels._common import rows_bucket

        if rows <= kn.GEMV_MAX_ROWS:
            return kn.nm_gemv_configs(rows_bucket(rows))
        return [c for b in (16, 64, 4096) for c in kn.nm_gemm_configs(b, elem_bytes)]

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("rows", (3, 21))
    def test_nm_every_config(rows, dtype):
        """Each autotune config (the tuner only ever runs the first one here), pinned."""
        from sparsekern.kernels import nm_linear as kn

        w = sk.NMSparseWeight.from_dense(torch.randn(40, 136), n=2, m=4, prune=True).to(dtype)
        x, b = torch.randn(rows, 136).to(dtype), torch.randn(40).to(dtype)
        ref32 = F.linear(x.float(), w.to_dense().float(), b.float())
        same = F.linear(x, w.to_dense(), b)
        for cfg in _all_nm_configs(rows, x.element_size()):
            out = kn.nm_linear(x, w.values, w.meta, 2, 4, b, config=cfg)
            assert_matches_reference(out, ref32, same, f"nm_linear config {cfg}")

    def test_nm_bf16():
        pytest.skip("bf16 is broken in the Triton interpreter here; tests/gpu covers bf16")

    @pytest.mark.parametrize("act_block", (0, 32))
    @pytest.mark.parametrize("rows", (1, 3, 9))  # gemv, gemv with 4-row tiles, gemm
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize(
        "quant, group_size, symmetric", [("int8", 0, True), ("int4", 32, True), ("int4", 64, False)]
    )
    def test_nm_quantized(quant, group_size, symmetric, dtype, rows, act_block):
        """int8 / int4 kept weights dequantized in the kernels, against the reference backend."""
        k = 192
        w = sk.NMSparseWeight.from_dense(torch.randn(40, k), n=2, m=4, prune=True)
        wq = w.quantize(quant, group_size, symmetric, act_block=act_block).to(dtype)
        x = torch.randn(rows, k).to(dtype)
        b = torch.randn(40).to(dtype)
        with sk.use_backend("triton"):
            out = sk.ops.nm_linear(x, wq, b)
        with sk.use_backend("reference"):
            same = sk.ops.nm_linear(x, wq, b)
        fp32 = sk.NMSparseWeight(wq.values, wq.meta, 2, 4, wq.shape, wq.scales.float(), wq.zeros, group_size, act_block)
        ref32 = sk.ops.nm_linear(x.float(), fp32, b.float()) if not act_block else same.float()
        if act_block:
            from sparsekern.reference import quantize_x

            dense32 = sk.NMSparseWeight(wq.values, wq.meta, 2, 4, wq.shape, wq.scales.float(), wq.zeros, group_size)
            ref32 = F.linear(quantize_x(x, act_block), dense32.to_dense(), b.float())
        mag = F.linear(
            x.float().abs(), fp32.to_dense().abs() if not act_block else dense32.to_dense().abs(), b.float().abs()
        )
        assert_matches_reference(
            out, ref32, same, f"nm_linear {quant} g{group_size} a{act_block} rows={rows} {dtype}", mag
        )

    BLOCKS = [(8, 8), (16, 16), (32, 16), (16, 64), (48, 24), (64, 64), (128, 128)]

    def _bsr_case(rows, out, k, block, dtype, sparsity=0.6, bias=True):
        w = sk.BlockSparseWeight.from_dense(torch.randn(out, k), block=block, sparsity=sparsity).to(dtype)
        x = torch.randn(rows, k).to(dtype)
        b = torch.randn(out).to(dtype) if bias else None
        _check(sk.ops.bsr_linear, x, w, b, f"bsr_linear {block} rows={rows} out={out} K={k} {dtype}")
        return w

    @pytest.mark.parametrize("block", BLOCKS, ids=[f"{a}x{b}" for a, b in BLOCKS])
    @pytest.mark.parametrize("rows", (1, 5, 33))
    def test_bsr_blocks(rows, block):
        bm, bk = block
        dtype = DTYPES[(rows + bm) % 2]
        _bsr_case(rows, out=bm * 3, k=bk * 5, block=block, dtype=dtype, bias=rows != 5)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("rows", (1, 16, 100))
    def test_bsr_empty_block_rows_and_split(rows, dtype):
        # 95% sparse over 12 block rows: some rows hold no block (output = bias alone), and
        # the few block rows with long K split across programs.
        w = _bsr_case(rows, out=192, k=512, block=(16, 32), dtype=dtype, sparsity=0.95)
        counts = w.crow_indices[1:] - w.crow_indices[:-1]
        assert (counts == 0).any(), "test shape should contain an empty block row"

    @pytest.mark.parametrize("rows", (1, 40, 100))
    def test_bsr_every_config(rows):
        from sparsekern.kernels import bsr_linear as kb
        from sparsekern.kernels._common import rows_bucket

        w = sk.BlockSparseWeight.from_dense(torch.randn(96, 160), block=(32, 32), sparsity=0.5).to(torch.float16)
        x, b = torch.randn(rows, 160).to(torch.float16), torch.randn(96).to(torch.float16)
        ref32 = F.linear(x.float(), w.to_dense().float(), b.float())
        same = F.linear(x, w.to_dense(), b)
        for cfg in kb.bsr_configs(rows_bucket(rows), 32, 32, 2):
            out = kb.bsr_linear(x, w.crow_indices, w.col_indices, w.blocks, b, config=cfg)
            assert_matches_reference(out, ref32, same, f"bsr_linear config {cfg}")

    @pytest.mark.parametrize("rows", (1, 20))
    def test_bsr_no_blocks_at_all(rows):
        dense = torch.zeros(64, 96)  # nnz = 0: the output is the bias alone, every element written
        w = sk.BlockSparseWeight.from_dense(dense, block=(16, 32))
        assert w.nnz_blocks == 0
        _check(sk.ops.bsr_linear, torch.randn(rows, 96), w, torch.randn(64), "bsr_linear nnz=0")

    def _rows_2_31_apart(rows, k, dtype=torch.float16):
        """x [rows, k] whose row stride times the last row index passes 2**31 elements.

        The storage is ~4 GiB of virtual memory of which only the rows' pages are ever touched
        (torch.empty does not write it; the interpreter runs on the same storage).
        """
        stride = -(-(2**31 + 64) // (rows - 1) // 64) * 64  # rounded up to 64 elements
        assert stride < 2**31 <= stride * (rows - 1)  # fits an int32 argument, the product does not
        x = torch.empty(stride * (rows - 1) + k, dtype=dtype).as_strided((rows, k), (stride, 1))
        return x.copy_(torch.randn(rows, k).to(dtype))

    @pytest.mark.parametrize("rows", (3, 5))  # the gemv and the tensor-core kernel
    def test_nm_row_offsets_past_2_31(rows):
        """int32 row offsets (row * stride_xr) wrapped here and read 4 GiB before x (a segfault)."""
        x = _rows_2_31_apart(rows, 64)
        _check(sk.ops.nm_linear, x, sk.NMSparseWeight.from_dense(torch.randn(24, 64), n=2, m=4, prune=True).to(x.dtype),
               None, f"nm_linear rows={rows} row stride {x.stride(0)}")  # fmt: skip

    def test_bsr_row_offsets_past_2_31():
        x = _rows_2_31_apart(3, 64)
        w = sk.BlockSparseWeight.from_dense(torch.randn(32, 64), block=(16, 16), sparsity=0.5).to(x.dtype)
        _check(sk.ops.bsr_linear, x, w, torch.randn(32).to(x.dtype), f"bsr_linear row stride {x.stride(0)}")

    def _nonfinite_x(rows, k, dtype):
        x = torch.randn(rows, k)
        x[0, 1] = float("nan")
        x[rows - 1, k - 2] = float("inf")  # last row: in the tail group / block
        x[rows // 2, k // 2] = -float("inf")
        x[rows // 2, k // 2 + 1] = float("inf")  # same group: kept +inf and -inf give NaN, too
        return x.to(dtype)

    def _assert_like_dense(out, x, dense, bias):
        ref = F.linear(x.float(), dense.float(), None if bias is None else bias.float())
        assert torch.equal(out.isnan(), ref.isnan()), (
            f"NaN at {out.isnan().nonzero().tolist()}, dense {ref.isnan().nonzero().tolist()}"
        )
        assert torch.equal(out.isinf(), ref.isinf()) and torch.equal(out[ref.isinf()], ref[ref.isinf()].to(out.dtype))
        fin = torch.isfinite(ref)
        torch.testing.assert_close(out[fin].float(), ref[fin], rtol=1e-2, atol=1e-2)

    @pytest.fixture(params=[256, 16], ids=["chunk256", "chunk16"])
    def chunk_cols(request, monkeypatch):
        """Columns per program of the NaN/Inf pass: one chunk for these widths, or several."""
        from sparsekern.kernels import nonfinite

        monkeypatch.setattr(nonfinite, "CHUNK_COLS", request.param)
        return request.param

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("rows", (1, 3, 21))  # gemv, gemv + split-K, tensor-core kernel
    @pytest.mark.parametrize("nm", [(2, 4), (3, 8)], ids=["2:4", "3:8"])
    def test_nm_nonfinite_like_dense(no_host_scan, chunk_cols, nm, rows, dtype):
        n, m = nm
        w = sk.NMSparseWeight.from_dense(torch.randn(36, m * 30), n=n, m=m, prune=True).to(dtype)
        w.values[5, :3] = 0  # stored zeros: 0 * inf = nan there, too
        x, b = _nonfinite_x(rows, m * 30, dtype), torch.randn(36).to(dtype)
        with sk.use_backend("triton"):
            out = sk.ops.nm_linear(x, w, b)
        _assert_like_dense(out, x, w.to_dense(), b)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("rows", (1, 21))
    @pytest.mark.parametrize("block", [(16, 16), (48, 24)], ids=["16x16", "48x24"])
    def test_bsr_nonfinite_like_dense(no_host_scan, chunk_cols, block, rows, dtype):
        bm, bk = block
        w = sk.BlockSparseWeight.from_dense(torch.randn(bm * 4, bk * 6), block=block, sparsity=0.6).to(dtype)
        x = _nonfinite_x(rows, bk * 6, dtype)
        with sk.use_backend("triton"):
            out = sk.ops.bsr_linear(x, w)
        _assert_like_dense(out, x, w.to_dense(), None)

    def test_backend_refuses_cpu_without_interpreter(monkeypatch):
        monkeypatch.delenv("TRITON_INTERPRET")
        w = sk.NMSparseWeight.from_dense(torch.randn(8, 16), n=2, m=4, prune=True)
        with sk.use_backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            sk.ops.nm_linear(torch.randn(2, 16), w)
