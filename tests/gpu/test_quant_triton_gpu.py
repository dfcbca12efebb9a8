"""Triton ``nm_linear`` / ``bsr_linear`` on quantized weights (int8; int4 two per byte; per-row or
per-group scales, with or without zero points) on a real GPU, against the reference (skipped
without one).

The interpreter tests (tests/test_triton_linear.py ``test_nm_quantized``,
tests/test_bsr_quant_triton.py) on CUDA: bf16 included, Llama-7B shapes, prefill rows, every
autotune config. The yardstick (conftest's ``triton_quant_yardsticks``) is the weight as the
kernels use it times x in float64; the bound is conftest's per-element ``assert_matches_reference``
with torch in x's dtype on the op's weight as torch's own error, scaled by each element's sum of
|terms|.
It passed on an H200 (2026-11-27, bench/results/gpu-h200-2026-11-27-quant.md); since then
quantized blocks are dispatch candidates on CUDA (``blocks_on_cuda`` in
sparsekern/backends/triton.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_reference, triton_quant_yardsticks
from triton_aot import gpu_skip_reason

import sparsekern as sk

pytestmark = pytest.mark.skipif(gpu_skip_reason() is not None, reason=gpu_skip_reason() or "")

DEVICE = "cuda"
LLAMA = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, K): qkvo, up/gate, down
ROWS = (1, 4, 16, 33, 4096)
# (quant, group_size, symmetric): per-row int8, grouped int8 with zero points, the GPTQ-style
# int4 g128, and a small asymmetric int4 group
QUANTS = [("int8", 0, True), ("int8", 128, False), ("int4", 128, True), ("int4", 32, False)]
QIDS = [f"{q}-g{g}-{'sym' if s else 'zeros'}" for q, g, s in QUANTS]


def _check(run, x, wq, bias, what):
    with sk.use_backend("triton"):
        out = run(x, wq, bias)
    ref, same, mag = triton_quant_yardsticks(x, wq, bias)
    assert_matches_reference(out, ref, same, what, magnitude=mag)


def _nm(out, k, n, m, quant, group_size, symmetric, dtype, act_block=0):
    w = sk.NMSparseWeight.from_dense(torch.randn(out, k, device=DEVICE), n=n, m=m, prune=True)
    return w.quantize(quant, group_size, symmetric, act_block=act_block).to(dtype)


def _bsr(out, k, block, sparsity, quant, group_size, symmetric, dtype):
    w = sk.BlockSparseWeight.from_dense(torch.randn(out, k, device=DEVICE), block=block, sparsity=sparsity)
    return w.quantize(quant, group_size, symmetric=symmetric).to(dtype)


def _inputs(rows, k, out, dtype, bias=True):
    x = torch.randn(rows, k, device=DEVICE, dtype=dtype)
    return x, (torch.randn(out, device=DEVICE, dtype=dtype) if bias else None)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", LLAMA, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("quant, group_size, symmetric", QUANTS, ids=QIDS)
def test_nm24_quant_llama(quant, group_size, symmetric, shape, rows, dtype):
    out, k = shape
    wq = _nm(out, k, 2, 4, quant, group_size, symmetric, dtype)
    x, b = _inputs(rows, k, out, dtype)
    _check(sk.ops.nm_linear, x, wq, b, f"2:4 {quant} g{group_size} sym={symmetric} {rows}x{k} -> {out} {dtype}")


@pytest.mark.parametrize("rows", (1, 16, 4096))
@pytest.mark.parametrize("pattern", [(1, 4), (2, 8), (4, 8)], ids=lambda p: f"{p[0]}:{p[1]}")
@pytest.mark.parametrize("quant, group_size, symmetric", [QUANTS[0], QUANTS[2]], ids=[QIDS[0], QIDS[2]])
def test_nm_quant_other_patterns(quant, group_size, symmetric, pattern, rows):
    (n, m), (out, k) = pattern, LLAMA[1]
    wq = _nm(out, k, n, m, quant, group_size, symmetric, torch.bfloat16)
    x, b = _inputs(rows, k, out, torch.bfloat16)
    _check(sk.ops.nm_linear, x, wq, b, f"{n}:{m} {quant} g{group_size} rows={rows}")


NM_ODD = [(n, m) for m in (2, 4, 8, 16) for n in range(1, m)]


@pytest.mark.parametrize("quant", ("int8", "int4"))
@pytest.mark.parametrize("n,m", NM_ODD, ids=[f"{n}:{m}" for n, m in NM_ODD])
def test_nm_quant_every_pattern_odd_shape(n, m, quant):
    """Odd out and K (K = 38 groups of m: an even kept count for int4), rows 1 / 7 / 100."""
    k, out = m * 38, 203
    wq = _nm(out, k, n, m, quant, 0 if quant == "int8" else 2 * m, quant == "int8", torch.bfloat16)
    for rows in (1, 7, 100):
        x, b = _inputs(rows, k, out, torch.bfloat16, bias=rows != 7)
        _check(sk.ops.nm_linear, x, wq, b, f"{n}:{m} {quant} rows={rows}")


@pytest.mark.parametrize("rows", (1, 16))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_nm24_int8_activations(rows, dtype):
    """``act_block``: x rounded to int8 per 32 columns (``reference.quantize_x``), as the op defines."""
    from sparsekern.reference import quantize_x

    out, k = LLAMA[1]
    wq = _nm(out, k, 2, 4, "int8", 0, True, dtype, act_block=32)
    x, b = _inputs(rows, k, out, dtype)
    with sk.use_backend("triton"):
        got = sk.ops.nm_linear(x, wq, b)
    with sk.use_backend("reference"):
        same = sk.ops.nm_linear(x, wq, b)  # fp32 weight and product, then x's dtype
    plain = sk.NMSparseWeight(wq.values, wq.meta, 2, 4, wq.shape, wq.scales.float(), wq.zeros, wq.group_size)
    dense = plain.to_dense().double()
    xq = quantize_x(x, 32).double()
    ref = F.linear(xq, dense, b.double())
    mag = F.linear(xq.abs(), dense.abs(), b.double().abs())
    assert_matches_reference(got, ref, same, f"2:4 int8 a32 rows={rows} {dtype}", magnitude=mag)


@pytest.mark.parametrize("rows", (2, 16, 300))
@pytest.mark.parametrize("quant", ("int8", "int4"))
def test_nm_quant_every_config(quant, rows):
    from sparsekern.kernels import nm_linear as kn
    from sparsekern.kernels._common import rows_bucket

    if rows <= kn.GEMV_MAX_ROWS:
        configs = kn.nm_gemv_configs(rows_bucket(rows))
    else:
        configs = [c for b in (16, 64, 4096) for c in kn.nm_gemm_configs(b, 2)]
    wq = _nm(1000, 1152, 2, 4, quant, 64, False, torch.bfloat16)
    x, b = _inputs(rows, 1152, 1000, torch.bfloat16)
    ref, same, mag = triton_quant_yardsticks(x, wq, b)
    for cfg in configs:
        got = kn.nm_linear(x, wq.values, wq.meta, 2, 4, b, wq.scales, wq.zeros, wq.group_size, 0, cfg)
        assert_matches_reference(got, ref, same, f"{quant} config {cfg}", magnitude=mag)


# One scale per block row (int8 per row, int4 g64 here): scaled after an integer tl.dot; several
# per block row (int4 g32): dequantized tiles.
BSR_QUANTS = [("int8", 0, True), ("int4", 64, False), ("int4", 32, False)]


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", LLAMA, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(
    "quant, group_size, symmetric", BSR_QUANTS, ids=[f"{q}-g{g}-{'sym' if s else 'zeros'}" for q, g, s in BSR_QUANTS]
)
def test_bsr_quant_llama_64x64_90(quant, group_size, symmetric, shape, rows, dtype):
    out, k = shape
    wq = _bsr(out, k, (64, 64), 0.9, quant, group_size, symmetric, dtype)
    x, b = _inputs(rows, k, out, dtype)
    _check(sk.ops.bsr_linear, x, wq, b, f"block64x64 90% {quant} g{group_size} {rows}x{k} -> {out} {dtype}")


BLOCKS = [(16, 16), (32, 16), (16, 64), (48, 24), (64, 64), (128, 128), (32, 128)]
BSR_CASES = list(itertools.product(BLOCKS, [("int8", 0, True), ("int4", 0, True), ("int4", 8, False)]))


@pytest.mark.parametrize("block, qcase", BSR_CASES, ids=[f"{a}x{b}-{q}-g{g}" for (a, b), (q, g, _) in BSR_CASES])
def test_bsr_quant_blocks(block, qcase):
    """Every block shape (48x24: padded tile), rows 1 / 5 / 130; one scale per block row (int8,
    int4), and groups of 8 with zero points (int4)."""
    (bm, bk), (quant, group, symmetric) = block, qcase
    wq = _bsr(bm * 7, bk * 9, block, 0.7, quant, group, symmetric, torch.bfloat16)
    for rows in (1, 5, 130):
        x, b = _inputs(rows, bk * 9, bm * 7, torch.bfloat16, bias=rows != 5)
        _check(sk.ops.bsr_linear, x, wq, b, f"{block} {quant} rows={rows}")


@pytest.mark.parametrize("rows", (1, 40, 300))
@pytest.mark.parametrize("group", (0, 32))
@pytest.mark.parametrize("quant", ("int8", "int4"))
def test_bsr_quant_every_config(quant, group, rows):
    from sparsekern.kernels import bsr_linear as kb
    from sparsekern.kernels._common import rows_bucket

    wq = _bsr(512, 1024, (64, 64), 0.8, quant, group, False, torch.bfloat16)
    x, b = _inputs(rows, 1024, 512, torch.bfloat16)
    ref, same, mag = triton_quant_yardsticks(x, wq, b)
    for cfg in kb.bsr_configs(rows_bucket(rows), 64, 64, 2):
        got = kb.bsr_linear(x, wq.crow_indices, wq.col_indices, wq.blocks, b, wq.scales, wq.zeros, config=cfg)
        assert_matches_reference(got, ref, same, f"{quant} config {cfg}", magnitude=mag)
