"""Triton ``nm_grouped_linear`` / ``bsr_grouped_linear`` (MoE) on a real GPU against per-expert
dense matmuls (skipped without one).

The interpreter tests (tests/test_moe_grouped_triton.py, tests/test_moe_grouped_bsr_triton.py) on
CUDA, bf16 included, at Mixtral's expert shapes: decode (1 token to 2 of 8 experts) and prefill.
Until this file has passed on a GPU, both ops' Triton backends stay registered with ``auto=False``
(sparsekern/backends/grouped.py).
"""

from __future__ import annotations

import pytest
import test_moe_grouped as nm_cases
import test_moe_grouped_bsr as bsr_cases
import torch
from triton_aot import gpu_skip_reason

import sparsekern as sk

pytestmark = pytest.mark.skipif(gpu_skip_reason() is not None, reason=gpu_skip_reason() or "")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIXTRAL = [("gate_up", 2 * 3584, 1024), ("down", 1024, 3584)]
COUNTS = {
    "decode": [0, 0, 1, 0, 0, 1, 0, 0],
    "T=2": [1, 0, 0, 1, 1, 0, 0, 1],
    "prefill": [12, 5, 0, 9, 14, 2, 15, 7],
    "long prefill": [700, 3, 0, 90, 141, 20, 150, 72],
}


def _cuda(*tensors):
    return [t.cuda() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("counts", COUNTS, ids=list(COUNTS))
@pytest.mark.parametrize("shape", MIXTRAL, ids=[s[0] for s in MIXTRAL])
def test_nm_grouped_mixtral(shape, counts, dtype):
    _, out, k = shape
    x, values, meta, offsets = nm_cases.make_case(8, out, k, COUNTS[counts], 2, 4, dtype)
    xc, vc, mc = _cuda(x, values, meta)
    with sk.use_backend("triton"):
        y = sk.ops.nm_grouped_linear(xc, vc, mc, offsets, 2, 4)
    nm_cases.check(y.cpu(), x, values, meta, offsets, 2, 4, f"triton cuda {shape} {counts} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("counts", COUNTS, ids=list(COUNTS))
@pytest.mark.parametrize("shape", MIXTRAL, ids=[s[0] for s in MIXTRAL])
@pytest.mark.parametrize("block", [(32, 32), (16, 64), (64, 64)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_bsr_grouped_mixtral(block, shape, counts, dtype):
    _, out, k = shape
    x, crow, col, blocks, offsets = bsr_cases.make_case(8, out, k, COUNTS[counts], block, 0.1, dtype, no_blocks=(3,))
    xc, cc, lc, bc = _cuda(x, crow, col, blocks)
    with sk.use_backend("triton"):
        y = sk.ops.bsr_grouped_linear(xc, cc, lc, bc, offsets)
    bsr_cases.check(y.cpu(), x, crow, col, blocks, offsets, f"triton cuda {block} {shape} {counts} {dtype}")


def test_bsr_grouped_nonfinite():
    x, crow, col, blocks, offsets = bsr_cases.make_case(3, 64, 128, [2, 0, 3], (32, 32), 0.3, torch.bfloat16)
    x[1, 3], x[3, 0] = float("nan"), float("inf")
    xc, cc, lc, bc = _cuda(x, crow, col, blocks)
    with sk.use_backend("triton"):
        y = sk.ops.bsr_grouped_linear(xc, cc, lc, bc, offsets).cpu()
    dense = sk.reference.bsr_grouped_linear(x, crow, col, blocks, offsets)
    assert torch.equal(torch.isnan(y), torch.isnan(dense)) and torch.equal(torch.isinf(y), torch.isinf(dense))
