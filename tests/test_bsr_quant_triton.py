"""Triton ``bsr_linear`` on quantized blocks (int8; int4 two per byte; scales per group of a stored
block row, with or without zero points) under the interpreter, against the reference.

The yardstick is the weight as the kernel multiplies it (conftest's ``triton_quant_weight``): with
several scale groups per block row, the op's definition (``sparsekern.reference.bsr_linear``:
dequantized in fp32, rounded once to the scales' dtype); with one scale per block row, dequantized
in fp32 without that rounding (the kernel scales after ``tl.dot`` on the integers). It is
multiplied in float64; the bound is conftest's ``assert_matches_reference`` against torch in x's
dtype on the op's weight.
Outputs are poisoned with NaN before the kernel writes them (conftest). The compiled sm_80 / sm_90
cases are in test_triton_compile.py.

Triton picks interpreter or compiler per process at ``import triton`` (kernels/_common.py): unless
this process interprets, the file reruns itself in a subprocess with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_reference, triton_quant_yardsticks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton_aot  # noqa: E402

import sparsekern as sk  # noqa: E402
from sparsekern.formats.bsr import BlockSparseWeight  # noqa: E402

HAVE_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")

if not triton_aot.interpreter_process():
    test_interpreter_suite_in_subprocess = triton_aot.interpreter_suite_test(os.path.abspath(__file__), cost=20)

else:
    DTYPES = (torch.float32, torch.float16)  # bf16 is broken in the interpreter; tests/gpu has it
    ROWS = (1, 3, 17, 40)  # decode (split-K at these sizes), 16-row tile, 64-row tile, two of them

    def _qweight(out, k, block, quant, group_size, symmetric, dtype, sparsity=0.6):
        w = BlockSparseWeight.from_dense(torch.randn(out, k), block, sparsity)
        return w.quantize(quant, group_size, symmetric=symmetric).to(dtype)

    def _check(out, x, wq, bias, what):
        ref, same, mag = triton_quant_yardsticks(x, wq, bias)
        assert_matches_reference(out, ref, same, what, magnitude=mag)

    def _run(x, wq, bias):
        with sk.use_backend("triton"):
            return sk.ops.bsr_linear(x, wq, bias)

    BLOCKS = [(16, 16), (16, 32), (32, 64), (48, 24)]  # 48x24: padded tile, three groups of 8
    CASES = [
        (quant, sym, group, block)
        for quant, sym, group, block in itertools.product(("int8", "int4"), (True, False), (8, 16, 0), BLOCKS)
        if not group or block[1] % group == 0
    ]

    @pytest.mark.parametrize(
        "quant, symmetric, group_size, block",
        CASES,
        ids=[f"{q}-{'sym' if s else 'zeros'}-g{g or 'bk'}-{b[0]}x{b[1]}" for q, s, g, b in CASES],
    )
    def test_quantized_blocks(quant, symmetric, group_size, block):
        """Every quant / zero point / group size / block; rows and dtype cycle over the cases."""
        assert sk.ops.POISON_OUTPUTS, "outputs must be NaN-poisoned before the kernel writes them"
        i = CASES.index((quant, symmetric, group_size, block))
        rows, dtype = ROWS[i % 4], DTYPES[i // 4 % 2]
        bm, bk = block
        out, k = bm * 3, bk * 5  # 3 block rows, 5 block columns: odd, no tile multiple
        wq = _qweight(out, k, block, quant, group_size, symmetric, dtype)
        x = torch.randn(rows, k).to(dtype)
        bias = torch.randn(out).to(dtype) if i % 3 else None
        _check(_run(x, wq, bias), x, wq, bias, f"{quant} sym={symmetric} g{group_size} {block} rows={rows} {dtype}")

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("rows", ROWS)
    def test_rows_and_split_k(monkeypatch, rows, dtype):
        """int4 with zero points, 90% sparse, an empty block row (its outputs: the bias alone):
        12 block rows fill the interpreter's pretend 4 SMs, 3 block rows split K."""
        from sparsekern.kernels import bsr_linear as kb

        splits = []
        reduce = kb.splitk_reduce
        monkeypatch.setattr(kb, "splitk_reduce", lambda ws, *a: splits.append(ws.shape[0]) or reduce(ws, *a))
        for out, split in ((192, False), (48, True)):
            dense = torch.randn(out, 512)
            dense[16:32] = 0  # block row 1 holds no block
            wq = BlockSparseWeight.from_dense(dense, (16, 32), 0.9).quantize("int4", 16, symmetric=False).to(dtype)
            assert int(wq.crow_indices[2] - wq.crow_indices[1]) == 0
            x, bias = torch.randn(rows, 512).to(dtype), torch.randn(out).to(dtype)
            before = len(splits)
            _check(_run(x, wq, bias), x, wq, bias, f"int4 g16 zeros out={out} rows={rows} {dtype}")
            assert (len(splits) > before) == split, f"out={out} rows={rows}: split-K {splits[before:]}"

    @pytest.mark.parametrize("rows", (1, 40))
    def test_every_config(rows):
        """Each config of ``bsr_configs`` (the tuner runs only the first here), pinned by keyword."""
        from sparsekern.kernels import bsr_linear as kb
        from sparsekern.kernels._common import rows_bucket

        for quant in ("int8", "int4"):
            wq = _qweight(96, 160, (32, 32), quant, 16, False, torch.float16)
            x, b = torch.randn(rows, 160).to(torch.float16), torch.randn(96).to(torch.float16)
            for cfg in kb.bsr_configs(rows_bucket(rows), 32, 32, 2):
                out = kb.bsr_linear(x, wq.crow_indices, wq.col_indices, wq.blocks, b, wq.scales, wq.zeros, config=cfg)
                _check(out, x, wq, b, f"{quant} config {cfg}")

    def test_public_op_int4_asymmetric(monkeypatch):
        """``sparsekern.ops.bsr_linear`` under ``use_backend("triton")``, leading dims, and the
        kernel really is the one called with the scales and zeros."""
        from sparsekern.kernels import bsr_linear as kb

        calls = []
        kernel = kb.bsr_linear

        def spy(x, crow, col, blocks, bias=None, scales=None, zeros=None, config=None):
            calls.append((blocks.dtype, scales is not None, zeros is not None))
            return kernel(x, crow, col, blocks, bias, scales, zeros, config)

        monkeypatch.setattr(kb, "bsr_linear", spy)
        for dtype in DTYPES:
            weight = BlockSparseWeight.from_dense(torch.randn(96, 144), (32, 48), 0.6).quantize(
                "int4", 16, symmetric=False
            )
            weight = weight.to(dtype)
            x, bias = torch.randn(2, 5, 144).to(dtype), torch.randn(96).to(dtype)
            with sk.use_backend("triton"):
                out = sk.ops.bsr_linear(x, weight, bias)
                plain = sk.ops.bsr_linear(x[0], weight)
            _check(out.reshape(10, 96), x.reshape(10, 144), weight, bias, f"public op int4 {dtype}")
            _check(plain, x[0], weight, None, f"public op int4 no bias {dtype}")
        assert calls == [(torch.uint8, True, True)] * 4

    def test_no_blocks_at_all():
        """nnz = 0 (scales [0, bm, groups]): the output is the bias alone, every element written."""
        crow, col = torch.zeros(5, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
        blocks, scales = torch.zeros(0, 16, 32, dtype=torch.int8), torch.ones(0, 16, 2)
        wq = BlockSparseWeight(crow, col, blocks, (64, 96), scales)
        for rows in (1, 20):
            x, bias = torch.randn(rows, 96), torch.randn(64)
            # Against the bias itself: to_dense() of a quantized weight with no block raises
            # (formats/quant.py dequantize cannot view 0 rows into groups).
            assert torch.equal(_run(x, wq, bias), bias.expand(rows, 64)), f"nnz=0 rows={rows}"

    def test_backend_takes_quantized_blocks():
        from sparsekern import dispatch

        wq = _qweight(32, 64, (16, 32), "int4", 16, False, torch.float32)
        args = (torch.randn(1, 64), wq.crow_indices, wq.col_indices, wq.blocks, None, wq.scales, wq.zeros)
        assert dispatch.implementations("bsr_linear")["triton"].supports(*args) is None

    def _nonfinite_x(rows, k, dtype):
        x = torch.randn(rows, k)
        x[0, 1] = float("nan")
        x[rows - 1, k - 2] = float("inf")  # last row: in the last block column
        x[rows // 2, k // 2] = -float("inf")
        x[rows // 2, k // 2 + 1] = float("inf")  # same block: kept +inf and -inf give NaN, too
        return x.to(dtype)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("rows", (1, 21))
    @pytest.mark.parametrize("quant", ("int8", "int4"))
    def test_nonfinite_like_dense(no_host_scan, quant, rows, dtype):
        """NaN/Inf in x give NaN/Inf exactly where dense ``F.linear`` on the dequantized weight does:
        at pruned blocks (kernels/nonfinite.py) and at stored weights that dequantize to zero."""
        wq = _qweight(48 * 4, 24 * 6, (48, 24), quant, 8, True, dtype)
        wq.blocks[0, :3] = 0 if quant == "int8" else 0x88  # the symmetric zero point: weight 0, 0 * inf = nan
        x = _nonfinite_x(rows, 24 * 6, dtype)
        out = _run(x, wq, None)
        ref = F.linear(x.double(), wq.to_dense().double())
        assert torch.equal(out.isnan(), ref.isnan()), (
            f"NaN at {out.isnan().nonzero().tolist()}, dense {ref.isnan().nonzero().tolist()}"
        )
        assert torch.equal(out.isinf(), ref.isinf()) and torch.equal(out[ref.isinf()], ref[ref.isinf()].to(out.dtype))
        fin = torch.isfinite(ref)
        torch.testing.assert_close(out[fin].double(), ref[fin], rtol=1e-2, atol=1e-2)
