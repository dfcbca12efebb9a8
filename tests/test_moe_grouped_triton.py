"""Triton ``nm_grouped_linear`` kernel: under the interpreter against the dense per-expert matmuls,
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


def _aot_cases():
    """(label, constexprs, config, expect) per compiled config: every config of every row block,
    bf16 (split-K partials at the decode block) and fp32."""
    from sparsekern.formats.nm import meta_bits, meta_per_word
    from sparsekern.kernels import nm_grouped_linear as g

    for dt, elem, precision in (("bf16", 2, "tf32"), ("fp32", 4, "tf32x3")):
        for block_m in (16, 32, 64):
            for cfg in g.grouped_configs(block_m, elem):
                for n, m in ((2, 4), (1, 4)) if dt == "bf16" and block_m == 64 else ((2, 4),):
                    cx = dict(PARTIAL=block_m == 16, N=n, M=m, BITS=meta_bits(m), PER_WORD=meta_per_word(m),
                              DOT_PRECISION=precision, BLOCK_M=block_m, **cfg.kwargs)  # fmt: skip
                    expect = "wgmma" if block_m >= 64 else "mma"
                    yield f"nm_grouped {n}:{m} {dt} BLOCK_M={block_m}", dt, cx, cfg, expect


def _aot_main() -> None:
    from sparsekern.kernels import nm_grouped_linear as g

    for label, dt, cx, cfg, expect in _aot_cases():
        for cc in CCS:
            t0 = time.perf_counter()
            ptrs = dict(x_ptr=f"*{dt}", values_ptr=f"*{dt}", meta_ptr="*i32", sched_ptr="*i32",
                        y_ptr="*fp32" if cx["PARTIAL"] else f"*{dt}")  # fmt: skip
            sig = triton_aot.signature_of(g._nm_grouped_kernel, ptrs, cx)
            aligned = ("x_ptr", "values_ptr", "meta_ptr", "y_ptr", "stride_xr", "stride_vr", "stride_mr")
            c = triton_aot.compile_for(g._nm_grouped_kernel, sig, cx, cc, cfg.num_warps, cfg.num_stages, aligned)
            ptx = c.asm["ptx"]
            row = dict(label=label, **c.summary(), expect=expect, seconds=time.perf_counter() - t0)
            row.update(mma_sync="mma.sync" in ptx, wgmma="wgmma.mma_async" in ptx)
            print(json.dumps(row), flush=True)


if not triton_aot.interpreter_process():
    test_interpreter_suite_in_subprocess = triton_aot.interpreter_suite_test(HERE, cost=13)

    def test_aot_compiles_for_sm80_sm90():
        rows = triton_aot.run_script(HERE, shards=1, timeout=900)
        for r in rows:
            print(f"{r['label']:36} sm_{r['cc']} warps {r['num_warps']} regs {r['n_regs']} spill {r['n_spills']} "
                  f"smem {r['shared']} mma {r['mma_sync']} wgmma {r['wgmma']}")  # fmt: skip
        assert len(rows) == len(list(_aot_cases())) * len(CCS)
        bad = triton_aot.tensor_core_problems(rows)
        assert not bad, "\n".join(bad)

else:
    from test_moe_grouped import check, make_case, offsets_of, random_experts

    import sparsekern as sk
    from sparsekern.kernels import nm_grouped_linear as g

    PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8)]
    # (label, experts, out, K, rows per expert): decode (split-K on the interpreter's 4 "SMs"),
    # empty experts, odd K / out, blocks of 32 and 64 rows, an expert spanning several blocks.
    CASES = [
        ("T=1 one expert", 4, 40, 48, [0, 1, 0, 0]),
        ("T=2 two experts", 4, 72, 64, [1, 0, 0, 1]),
        ("odd K/out", 5, 37, 200, [3, 0, 1, 2, 5]),
        ("prefill T=64", 8, 72, 96, [20, 3, 0, 9, 1, 17, 8, 6]),
        ("blocks of 64", 3, 40, 64, [70, 0, 5]),
    ]

    @pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
    @pytest.mark.parametrize("n,m", PATTERNS, ids=[f"{n}:{m}" for n, m in PATTERNS])
    @pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
    def test_triton_matches_dense(case, n, m, dtype):
        label, e, out, k, counts = case
        x, values, meta, offsets = make_case(e, out, k, counts, n, m, dtype)
        with sk.use_backend("triton"):
            y = sk.ops.nm_grouped_linear(x, values, meta, offsets, n, m)
        check(y, x, values, meta, offsets, n, m, f"triton {label} {n}:{m} {dtype}")

    @pytest.mark.parametrize("cfg", range(2), ids=["config0", "config1"])
    def test_every_config(cfg):
        values, meta = random_experts(3, 150, 128, 2, 4, torch.float16)
        offsets = offsets_of([1, 0, 2])
        x = torch.randn(3, 128).half()
        y = g.nm_grouped_linear(x, values, meta, offsets, 2, 4, config=g.grouped_configs(16)[cfg])
        check(y, x, values, meta, offsets, 2, 4, f"config {cfg}")

    def test_schedule_and_nonfinite():
        assert g.block_schedule([0, 0, 20, 21], 16, torch.device("cpu")).tolist() == [
            [1, 1, 2],
            [0, 16, 20],
            [20, 20, 21],
        ]
        values, meta = random_experts(3, 16, 32, 2, 4)
        offsets = offsets_of([2, 0, 3])
        x = torch.randn(5, 32)
        x[1, 3], x[4, 0] = float("nan"), float("inf")
        with sk.use_backend("triton"):
            y = sk.ops.nm_grouped_linear(x, values, meta, offsets, 2, 4)
        dense = sk.reference.nm_grouped_linear(x, values, meta, offsets, 2, 4)
        assert torch.equal(torch.isnan(y), torch.isnan(dense)) and torch.equal(torch.isinf(y), torch.isinf(dense))


if __name__ == "__main__":
    _aot_main()
