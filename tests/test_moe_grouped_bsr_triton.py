"""Triton ``bsr_grouped_linear`` kernel: under the interpreter against the dense per-expert matmuls,
and compiled ahead of time for sm_80 / sm_90 (tensor-core instructions, no spills).

Triton picks interpreter or compiler per process at ``import triton`` (kernels/_common.py): the
interpreter tests run in a subprocess with ``TRITON_INTERPRET=1``, the compiles in one without
(this file run as a script, ``_aot_main``), unless this process already is the right kind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton_aot  # noqa: E402

HAVE_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
HERE = os.path.abspath(__file__)
CCS = (80, 90)
# Block shapes compiled: the Mixtral-ish 32x32, a non-square one and one padded (24 -> 32).
AOT_BLOCKS = ((32, 32), (16, 64), (24, 32))


def _aot_cases():
    """(label, constexprs, config, expect) per compiled config: every row block of each block shape,
    bf16 (split-K partials at the decode block) and fp32 at 32x32."""
    from sparsekern.kernels import bsr_grouped_linear as g

    for dt, elem, precision in (("bf16", 2, "tf32"), ("fp32", 4, "tf32x3")):
        for bm, bk in AOT_BLOCKS if dt == "bf16" else AOT_BLOCKS[:1]:
            for block_m in (16, 32, 64):
                for cfg in g.grouped_bsr_configs(block_m, bm, bk, elem):
                    cx = dict(PARTIAL=block_m == 16, BM=bm, BK=bk, DOT_PRECISION=precision, **cfg.kwargs)
                    expect = "wgmma" if block_m >= 64 else "mma"
                    yield f"bsr_grouped {bm}x{bk} {dt} BLOCK_M={block_m}", dt, cx, cfg, expect


def _aot_main() -> None:
    from sparsekern.kernels import bsr_grouped_linear as g

    for label, dt, cx, cfg, expect in _aot_cases():
        for cc in CCS:
            t0 = time.perf_counter()
            ptrs = dict(x_ptr=f"*{dt}", crow_ptr="*i32", col_ptr="*i32", blocks_ptr=f"*{dt}", sched_ptr="*i32",
                        y_ptr="*fp32" if cx["PARTIAL"] else f"*{dt}")  # fmt: skip
            sig = triton_aot.signature_of(g._bsr_grouped_kernel, ptrs, cx)
            aligned = ("x_ptr", "blocks_ptr", "y_ptr", "stride_xr")
            c = triton_aot.compile_for(g._bsr_grouped_kernel, sig, cx, cc, cfg.num_warps, cfg.num_stages, aligned)
            ptx = c.asm["ptx"]
            row = dict(label=label, **c.summary(), expect=expect, seconds=time.perf_counter() - t0)
            row.update(mma_sync="mma.sync" in ptx, wgmma="wgmma.mma_async" in ptx)
            print(json.dumps(row), flush=True)


if not triton_aot.interpreter_process():
    test_interpreter_suite_in_subprocess = triton_aot.interpreter_suite_test(HERE, cost=22)

    def test_aot_compiles_for_sm80_sm90():
        rows = triton_aot.run_script(HERE, shards=1, timeout=900)
        for r in rows:
            print(f"{r['label']:40} sm_{r['cc']} warps {r['num_warps']} regs {r['n_regs']} spill {r['n_spills']} "
                  f"smem {r['shared']} mma {r['mma_sync']} wgmma {r['wgmma']}")  # fmt: skip
        assert len(rows) == len(list(_aot_cases())) * len(CCS)
        bad = triton_aot.tensor_core_problems(rows)
        assert not bad, "\n".join(bad)

else:
    from test_moe_grouped_bsr import check, make_case, random_experts

    import sparsekern as sk
    from sparsekern.kernels import bsr_grouped_linear as g

    # (label, experts, out, K, block, density, rows per expert, experts storing no block): decode
    # (split-K on the interpreter's 4 "SMs"), empty experts, experts without blocks, odd and
    # non-square blocks, row blocks of 32 and 64, an expert spanning several row blocks.
    CASES = [
        ("T=1 one expert", 4, 64, 64, (32, 32), 0.5, [0, 1, 0, 0], ()),
        ("T=2 two experts", 4, 48, 96, (16, 32), 0.4, [1, 0, 0, 1], ()),
        ("odd blocks", 5, 40, 120, (8, 24), 0.3, [3, 0, 1, 2, 5], (2,)),
        ("prefill T=64", 8, 72, 96, (24, 32), 0.3, [20, 3, 0, 9, 1, 17, 8, 6], (5,)),
        ("blocks of 64", 3, 32, 64, (16, 16), 0.5, [70, 0, 5], ()),
    ]

    @pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
    @pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
    def test_triton_matches_dense(case, dtype):
        label, e, out, k, block, density, counts, no_blocks = case
        x, crow, col, blocks, offsets = make_case(e, out, k, counts, block, density, dtype, no_blocks)
        with sk.use_backend("triton"):
            y = sk.ops.bsr_grouped_linear(x, crow, col, blocks, offsets)
        check(y, x, crow, col, blocks, offsets, f"triton {label} {dtype}")

    @pytest.mark.parametrize("shape", [(7168, 1024), (1024, 3584)], ids=["gate_up", "down"])
    def test_mixtral_decode(shape):
        """E=8, 32x32 blocks at 90% sparsity, decode rows (split-K) for 3 experts, one of them storing no block."""
        out, k = shape
        x, crow, col, blocks, offsets = make_case(8, out, k, [0, 0, 1, 1, 0, 0, 1, 0], (32, 32), 0.1, torch.float16,
                                                  no_blocks=(3,))  # fmt: skip
        with sk.use_backend("triton"):
            y = sk.ops.bsr_grouped_linear(x, crow, col, blocks, offsets)
        check(y, x, crow, col, blocks, offsets, f"triton mixtral {shape}")

    @pytest.mark.parametrize("block_m", (16, 32, 64))
    def test_every_config(block_m):
        x, crow, col, blocks, offsets = make_case(3, 48, 64, [1, 0, 2], (16, 32), 0.5, torch.float16)
        (cfg,) = g.grouped_bsr_configs(block_m, 16, 32, 2)
        y = g.bsr_grouped_linear(x, crow, col, blocks, offsets, config=cfg)
        check(y, x, crow, col, blocks, offsets, f"BLOCK_M={block_m}")

    def test_nonfinite():
        crow, col, blocks = random_experts(3, 32, 64, (16, 16), 0.4, no_blocks=(2,))
        offsets = torch.tensor([0, 2, 2, 5])
        x = torch.randn(5, 64)
        x[1, 3], x[3, 0], x[4, 9] = float("nan"), float("inf"), float("nan")
        with sk.use_backend("triton"):
            y = sk.ops.bsr_grouped_linear(x, crow, col, blocks, offsets)
        dense = sk.reference.bsr_grouped_linear(x, crow, col, blocks, offsets)
        assert torch.equal(torch.isnan(y), torch.isnan(dense)) and torch.equal(torch.isinf(y), torch.isinf(dense))


if __name__ == "__main__":
    _aot_main()
