"""Every Triton linear kernel, at every autotune config, compiles for sm_80 and sm_90 (no GPU).

Checks per compiled config: it compiles; tensor-core instructions where they belong
(``mma.sync`` in the sm_80 PTX of every ``tl.dot`` kernel, ``wgmma`` in the sm_90 PTX of the
prefill configs, i.e. ``BLOCK_M >= 64``, the smallest warpgroup tile); no register spills.
``pytest -s`` prints registers and shared memory per config.

Triton must be in compile mode, so the compiles run in one subprocess (this file run as a
script, see ``_main``) that prints a JSON line per compiled config.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton_aot  # noqa: E402

pytest.importorskip("triton")

CCS = (80, 90)
# Compile processes side by side (compiling is single-threaded).
SHARDS = min(2, os.cpu_count() or 1)
# Pointer and stride arguments the JIT would mark 16-divisible on Llama shapes.
ALIGNED = (
    "x_ptr", "values_ptr", "meta_ptr", "bias_ptr", "y_ptr", "crow_ptr", "col_ptr", "blocks_ptr", "ws_ptr",
    "stride_xr", "stride_vr", "stride_mr",
)  # fmt: skip


def _cases():
    """(label, kernel, pointers, constexprs, config, expect, ccs) for every kernel config to compile."""
    from sparsekern.formats.nm import meta_bits, meta_per_word
    from sparsekern.kernels import _common, bsr_linear, nm_linear, nonfinite

    def nm_consts(n, m, partial, qbits=0, zeros=False):
        return dict(HAS_BIAS=not partial, PARTIAL=partial, N=n, M=m, BITS=meta_bits(m), PER_WORD=meta_per_word(m),
                    QBITS=qbits, HAS_ZEROS=zeros)  # fmt: skip

    def nm_ptrs(dt, partial, qbits=0):
        values = {0: f"*{dt}", 8: "*i8", 4: "*u8"}[qbits]
        return dict(x_ptr=f"*{dt}", values_ptr=values, meta_ptr="*i32", bias_ptr=f"*{dt}",
                    y_ptr="*fp32" if partial else f"*{dt}", scales_ptr=f"*{dt}", zeros_ptr="*i8")  # fmt: skip

    for bucket in (1, 4):  # decode: split-K partials, no tensor cores
        for cfg in nm_linear.nm_gemv_configs(bucket):
            cx = {**nm_consts(2, 4, True), "BLOCK_R": bucket, **cfg.kwargs}
            yield f"nm_gemv 2:4 rows<={bucket}", nm_linear._nm_gemv_kernel, nm_ptrs("bf16", True), cx, cfg, None, CCS
    for bucket in (16, 64, 128):
        for cfg in nm_linear.nm_gemm_configs(bucket):
            partial = bucket <= 16
            cx = {**nm_consts(2, 4, partial), "DOT_PRECISION": "tf32", **cfg.kwargs}
            expect = "wgmma" if cfg.kwargs["BLOCK_M"] >= 64 else "mma"
            label = f"nm_gemm 2:4 rows<={bucket}"
            yield label, nm_linear._nm_gemm_kernel, nm_ptrs("bf16", partial), cx, cfg, expect, CCS
    # Other patterns and fp32 at the main prefill tile, sm_90 only (sm_80 codegen is the same
    # path): keeps the run to a few dozen compiles.
    big = nm_linear.nm_gemm_configs(4096)[0]
    for n, m in ((1, 4), (2, 8), (4, 16)):
        cx = {**nm_consts(n, m, False), "DOT_PRECISION": "tf32", **big.kwargs}
        yield f"nm_gemm {n}:{m} prefill", nm_linear._nm_gemm_kernel, nm_ptrs("bf16", False), cx, big, "wgmma", (90,)
    for cfg in nm_linear.nm_gemm_configs(4096, elem_bytes=4):
        cx = {**nm_consts(2, 4, False), "DOT_PRECISION": "tf32x3", **cfg.kwargs}
        yield "nm_gemm 2:4 fp32 prefill", nm_linear._nm_gemm_kernel, nm_ptrs("fp32", False), cx, cfg, "mma", (90,)
    # Quantized values (int8 per row; int4 per group with zero points): decode and prefill tiles.
    for qbits, zeros in ((8, False), (4, True)):
        cfg = nm_linear.nm_gemv_configs(1)[0]
        cx = {**nm_consts(2, 4, True, qbits, zeros), "BLOCK_R": 1, **cfg.kwargs}
        yield f"nm_gemv 2:4 int{qbits}", nm_linear._nm_gemv_kernel, nm_ptrs("bf16", True, qbits), cx, cfg, None, CCS
        cx = {**nm_consts(2, 4, False, qbits, zeros), "DOT_PRECISION": "tf32", **big.kwargs}
        label = f"nm_gemm 2:4 int{qbits} prefill"
        yield label, nm_linear._nm_gemm_kernel, nm_ptrs("bf16", False, qbits), cx, big, "wgmma", (90,)

    def bsr_ptrs(dt, partial, qbits=0):
        blocks = {0: f"*{dt}", 8: "*i8", 4: "*u8"}[qbits]
        return dict(x_ptr=f"*{dt}", crow_ptr="*i32", col_ptr="*i32", blocks_ptr=blocks, bias_ptr=f"*{dt}",
                    y_ptr="*fp32" if partial else f"*{dt}", scales_ptr=f"*{dt}", zeros_ptr="*i8")  # fmt: skip

    def bsr_consts(bm, bk, partial, qbits=0, group=0, zeros=False):
        return dict(HAS_BIAS=not partial, PARTIAL=partial, BM=bm, BK=bk, GROUP=group or bk, QBITS=qbits,
                    HAS_ZEROS=zeros, INT_DOT=bsr_linear.scales_after_dot(qbits, group or bk, bk))  # fmt: skip

    def bsr_cases(bm, bk, buckets, qbits=0, group=0, zeros=False):
        for bucket in buckets:
            for cfg in bsr_linear.bsr_configs(bucket, bm, bk, 2):
                partial = bucket <= 16
                cx = {**bsr_consts(bm, bk, partial, qbits, group, zeros), "DOT_PRECISION": "tf32", **cfg.kwargs}
                expect = "wgmma" if cfg.kwargs["BLOCK_M"] >= 64 else "mma"
                quant = f" int{qbits} g{group}" if qbits else ""
                label = f"bsr {bm}x{bk}{quant} rows<={bucket}"
                yield label, bsr_linear._bsr_kernel, bsr_ptrs("bf16", partial, qbits), cx, cfg, expect, CCS

    yield from bsr_cases(64, 64, (16, 64, 128))
    for bm, bk in ((16, 16), (128, 128), (32, 128), (48, 24)):  # other blocks: main tile, sm_90
        *case, _ = next(bsr_cases(bm, bk, (128,)))
        yield (*case, (90,))
    # Quantized blocks with zero points (one scale per block row: int8 and int4, scaled after the
    # integer tl.dot; int4 per 16 columns: dequantized tiles): decode and prefill tiles on both
    # targets, other blocks at the main tile on sm_90.
    for qbits, group in ((8, 0), (4, 0), (4, 16)):
        yield from bsr_cases(64, 64, (16, 128), qbits, group, True)
        for bm, bk in ((16, 32), (128, 128)):
            *case, _ = next(bsr_cases(bm, bk, (128,), qbits, group, True))
            yield (*case, (90,))
    cfg = bsr_linear.bsr_configs(128, 64, 64, 4)[0]
    cx = {**bsr_consts(64, 64, False), "DOT_PRECISION": "tf32x3", **cfg.kwargs}
    yield "bsr 64x64 fp32 prefill", bsr_linear._bsr_kernel, bsr_ptrs("fp32", False), cx, cfg, "mma", (90,)
    reduce_cfg = _common.triton.Config({"BLOCK": _common.REDUCE_BLOCK}, num_warps=4, num_stages=1)
    cx = dict(HAS_BIAS=True, BLOCK=_common.REDUCE_BLOCK)
    ptrs = dict(ws_ptr="*fp32", bias_ptr="*bf16", y_ptr="*bf16")
    yield "splitk_reduce", _common._splitk_reduce_kernel, ptrs, cx, reduce_cfg, None, (90,)
    # NaN/Inf fix-up after every GPU linear (kernels/nonfinite.py): no tensor cores, no spills.
    nf_cfg = _common.triton.Config({}, num_warps=4, num_stages=1)
    tiles = dict(BLOCK_M=nonfinite.BLOCK_M, BLOCK_K=nonfinite.BLOCK_K)
    for n, m in ((2, 4), (3, 8)):
        cx = dict(N=n, M=m, BITS=meta_bits(m), PER_WORD=meta_per_word(m), BLOCK_N=nonfinite.BLOCK_N,
                  BLOCK_J=nonfinite.BLOCK_J, **tiles)  # fmt: skip
        ptrs = dict(x_ptr="*bf16", meta_ptr="*i32", y_ptr="*bf16")
        yield f"nm_nonfinite {n}:{m}", nonfinite._nm_nonfinite_kernel, ptrs, cx, nf_cfg, None, CCS
    for bm, bk in ((32, 32), (48, 24)):
        cx = dict(BM=bm, BK=bk, BLOCK_I=max(16, 1 << (bm - 1).bit_length()), BLOCK_T=max(16, 1 << (bk - 1).bit_length()),
                  **tiles)  # fmt: skip
        ptrs = dict(x_ptr="*bf16", crow_ptr="*i32", col_ptr="*i32", y_ptr="*bf16")
        yield f"bsr_nonfinite {bm}x{bk}", nonfinite._bsr_nonfinite_kernel, ptrs, cx, nf_cfg, None, CCS


def _main(shard: int, shards: int) -> None:
    import json

    jobs = [(case, cc) for case in _cases() for cc in case[-1]]
    for (label, kernel, ptrs, cx, cfg, expect, _), cc in jobs[shard::shards]:
        t0 = time.perf_counter()
        sig = triton_aot.signature_of(kernel, ptrs, cx)
        aligned = tuple(a for a in ALIGNED if a in sig and sig[a] != "constexpr")
        c = triton_aot.compile_for(kernel, sig, cx, cc, cfg.num_warps, cfg.num_stages, aligned)
        ptx = c.asm["ptx"]
        tiles = " ".join(f"{k[6:]}{v}" for k, v in cfg.kwargs.items() if k.startswith("BLOCK"))
        row = dict(label=label, tiles=tiles, **c.summary(), expect=expect, seconds=time.perf_counter() - t0)
        row.update(mma_sync="mma.sync" in ptx, wgmma="wgmma.mma_async" in ptx)
        print(json.dumps(row), flush=True)


@pytest.fixture(scope="module")
def compiled():
    t0 = time.perf_counter()
    rows = triton_aot.run_script(os.path.abspath(__file__), shards=SHARDS, timeout=900)
    total = time.perf_counter() - t0
    print(f"\n{len(rows)} compiles in {total:.1f}s")
    print(f"{'kernel':28} {'tiles (BLOCK_*)':16} cc  warps stages regs spill  smem_B  mma wgmma")
    for r in rows:
        print(
            f"{r['label']:28} {r['tiles']:16} {r['cc']}  {r['num_warps']:5} {r['num_stages']:6} {r['n_regs']:4}"
            f" {r['n_spills']:5} {r['shared']:7}  {r['mma_sync']!s:5} {r['wgmma']!s:5}"
        )
    return rows


def test_every_config_compiles(compiled):
    labels = {r["label"] for r in compiled}
    assert len(compiled) >= 2 * 20, f"expected every config for both targets, got {len(compiled)} results"
    assert {cc for r in compiled for cc in [r["cc"]]} == set(CCS)
    assert any(label.startswith("nm_gemv") for label in labels) and any(label.startswith("bsr") for label in labels)


def test_tensor_cores_used(compiled):
    bad = []
    for r in compiled:
        if r["expect"] is None:
            continue
        if r["cc"] == 80 and not r["mma_sync"]:
            bad.append(f"{r['label']} {r['tiles']} sm_80: no mma.sync in PTX")
        if r["cc"] == 90 and r["expect"] == "wgmma" and not r["wgmma"]:
            bad.append(f"{r['label']} {r['tiles']} sm_90: no wgmma in PTX")
        if r["cc"] == 90 and r["expect"] == "mma" and not (r["mma_sync"] or r["wgmma"]):
            bad.append(f"{r['label']} {r['tiles']} sm_90: no tensor-core instruction in PTX")
    assert not bad, "\n".join(bad)


def test_no_register_spills(compiled):
    bad = [f"{r['label']} {r['tiles']} sm_{r['cc']}: {r['n_spills']} B spilled" for r in compiled if r["n_spills"]]
    assert not bad, "\n".join(bad)


if __name__ == "__main__":
    _main(*(int(a) for a in sys.argv[1:3]))
