"""Triton ``token_scores`` / ``pruned_attention`` (kernels/attention.py): interpreter + AOT.

- Under the interpreter (CPU tensors, fp32 and fp16; bf16 is broken in the interpreter) through
  the public ops with ``use_backend("triton")``, against the reference, outputs poisoned.
- Compiled ahead of time for sm_80 and sm_90 (no GPU needed): it compiles, ``mma`` in the sm_80
  PTX and ``wgmma`` in the sm_90 PTX (the kernels use ``tl.dot``), no register spills.

Triton picks interpreter or compiler per process at ``import triton`` (kernels/_common.py): the
interpreter tests rerun this file in a ``TRITON_INTERPRET=1`` subprocess and the compiles run
it as a script in a subprocess without it (tests/triton_aot.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
import triton_aot

HAVE_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
HERE = os.path.dirname(os.path.abspath(__file__))


def _interpreter_process() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    tl = sys.modules.get("triton.language")
    return tl is None or type(tl.cdiv).__name__ == "InterpretedFunction"


# -- ahead-of-time compiles (this file run as a script) -----------------------------------------


def _aot_cases():
    """(label, kernel name, dtype, constexprs, head dim, ccs)."""
    fwd = dict(CAUSAL=True, GATHER=True, WITH_V=True, WRITE_LSE=False)
    yield "fwd bf16 d128 causal", "_attn_fwd_kernel", "bf16", fwd, 128, (80, 90)
    yield "fwd fp16 d64 +lse", "_attn_fwd_kernel", "fp16", {**fwd, "WRITE_LSE": True}, 64, (90,)
    yield "fwd fp32 d64", "_attn_fwd_kernel", "fp32", {**fwd, "CAUSAL": False}, 64, (90,)
    lse_only = dict(CAUSAL=True, GATHER=False, WITH_V=False, WRITE_LSE=True)
    yield "lse-only bf16 d64 (token_scores)", "_attn_fwd_kernel", "bf16", lse_only, 64, (90,)
    yield "key_scores bf16 d64 gather", "_key_scores_kernel", "bf16", dict(CAUSAL=True, GATHER=True), 64, (80, 90)
    yield "key_scores bf16 d128 all keys", "_key_scores_kernel", "bf16", dict(CAUSAL=False, GATHER=False), 128, (90,)


def _aot_main(shard: int, shards: int) -> None:
    import json

    sys.path.insert(0, HERE)
    import triton_aot

    from sparsekern.kernels import _common, attention

    jobs = [(case, cc) for case in _aot_cases() for cc in case[-1]]
    for (label, name, dt, flags, d, _), cc in jobs[shard::shards]:
        kernel = getattr(attention, name)
        torch_dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
        cfg = attention._config(d, torch_dt, cc)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        cx = dict(flags, DOT_PRECISION=_common.dot_precision(torch_dt), **cfg)
        ptrs = {p: f"*{dt}" for p in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
        ptrs.update(keep_ptr="*i64", lse_ptr="*fp32")
        if name == "_key_scores_kernel":
            ptrs["out_ptr"] = "*fp32"
        sig = triton_aot.signature_of(kernel, ptrs, cx)
        for f in ("qk_scale", "inv_sq"):
            if f in sig:
                sig[f] = "fp32"
        c = triton_aot.compile_for(kernel, sig, cx, cc, num_warps=warps, num_stages=stages)
        ptx = c.asm["ptx"]
        row = dict(label=label, **c.summary(), mma_sync="mma.sync" in ptx, wgmma="wgmma.mma_async" in ptx)
        print(json.dumps(row), flush=True)


if not _interpreter_process():
    test_interpreter_suite_in_subprocess = triton_aot.interpreter_suite_test(os.path.abspath(__file__), cost=13)

    def test_aot_compiles_sm80_sm90():
        sys.path.insert(0, HERE)
        import triton_aot

        rows = triton_aot.run_script(os.path.abspath(__file__), shards=min(2, os.cpu_count() or 1), timeout=900)
        expected = sum(len(case[-1]) for case in _aot_cases())
        assert len(rows) == expected, f"{len(rows)} compiles reported, expected {expected}"
        for r in rows:
            print(r)
            assert r["n_spills"] == 0, f"{r['label']} sm_{r['cc']}: {r['n_spills']} bytes spilled"
            if r["cc"] == 80:
                assert r["mma_sync"], f"{r['label']} sm_80: no mma.sync in the PTX"
            else:
                assert r["wgmma"], f"{r['label']} sm_90: no wgmma in the PTX"

else:
    from conftest import assert_matches_reference

    import sparsekern as sk
    from sparsekern import reference

    DTYPES = (torch.float32, torch.float16)

    def _inputs(b, h, sq, sk_len, d, kept, dtype):
        q, k, v = (torch.randn(b, h, s, d).to(dtype) for s in (sq, sk_len, sk_len))
        keep = torch.stack([torch.randperm(sk_len)[:kept] for _ in range(b * h)]).view(b, h, kept)
        return q, k, v, keep

    def _f32(*ts):
        return [t.float() for t in ts]

    @pytest.mark.parametrize("shape", [(2, 3, 113, 203, 59, 70), (1, 2, 1, 150, 128, 37), (1, 1, 70, 64, 32, 64)])
    @pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_pruned_attention(shape, causal, dtype):
        q, k, v, keep = _inputs(*shape, dtype)
        with sk.use_backend("triton"):
            out, scores = sk.ops.pruned_attention(q, k, v, keep, causal=causal, return_scores=True)
            out_only = sk.ops.pruned_attention(q, k, v, keep, causal=causal)
        ref, ref_scores = reference.pruned_attention_with_scores(*_f32(q, k, v), keep, causal)
        same = reference.pruned_attention(q, k, v, keep, causal)  # fp32 math, rounded to dtype
        # The kernel rounds P to q's dtype before P @ V (flash attention's choice; the fp32-math
        # yardstick does not), so each term sum_j p_j * v_j may be off by U * p_j * |v_j|.
        mag = reference.pruned_attention(*_f32(q, k), v.float().abs(), keep, causal)
        assert_matches_reference(
            out, ref, same, f"{shape} {dtype}", magnitude=mag, rounded_terms=dtype != torch.float32
        )
        torch.testing.assert_close(out_only, out, atol=0, rtol=0)
        assert_matches_reference(scores, ref_scores, ref_scores, "scores")

    def test_batch_offsets_past_2_31():
        """q, k, v share one ~4 GiB (virtual, untouched) storage with a batch stride such that
        batch 2 starts past 2**31 elements: int32 ``b * stride_b`` wrapped and read before it."""
        b, sq, sk_len, d, kept = 3, 5, 40, 32, 17
        stride = -(-(2**31 + 64) // (b - 1) // 64) * 64
        store = torch.empty(stride * (b - 1) + (sq + 2 * sk_len) * d, dtype=torch.float16)
        q, k, v = (
            store.as_strided((b, 1, s, d), (stride, 0, d, 1), off * d).copy_(torch.randn(b, 1, s, d).half())
            for s, off in ((sq, 0), (sk_len, sq), (sk_len, sq + sk_len))
        )
        keep = torch.stack([torch.randperm(sk_len)[:kept] for _ in range(b)]).view(b, 1, kept)
        with sk.use_backend("triton"):
            out, scores = sk.ops.pruned_attention(q, k, v, keep, causal=True, return_scores=True)
        ref, ref_scores = reference.pruned_attention_with_scores(*_f32(q, k, v), keep, True)
        mag = reference.pruned_attention(*_f32(q, k), v.float().abs(), keep, True)
        same = reference.pruned_attention(q, k, v, keep, True)
        assert_matches_reference(out, ref, same, "batch stride past 2**31", magnitude=mag, rounded_terms=True)
        assert_matches_reference(scores, ref_scores, ref_scores, "scores")

    def test_query_that_sees_nothing():
        q, k, v, _ = _inputs(1, 1, 6, 10, 32, 3, torch.float32)
        keep = torch.tensor([[[9, 7, 8]]])
        with sk.use_backend("triton"):
            out, scores = sk.ops.pruned_attention(q, k, v, keep, causal=True, return_scores=True)
        ref, ref_scores = reference.pruned_attention_with_scores(q, k, v, keep, True)
        assert (out[0, 0, :3] == 0).all()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores, ref_scores, atol=1e-6, rtol=1e-5)

    @pytest.mark.parametrize("mode", ["full", "causal", "cls"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_token_scores(mode, dtype):
        q, k, _, _ = _inputs(2, 2, 77, 130, 64, 1, dtype)
        causal, cls_only = mode == "causal", mode == "cls"
        with sk.use_backend("triton"):
            out = sk.ops.token_scores(q, k, causal=causal, cls_only=cls_only)
        ref = reference.token_scores(*_f32(q, k), causal, None, cls_only)
        assert_matches_reference(out, ref, ref, mode)
        torch.testing.assert_close(out.sum(-1), torch.ones(2, 2), atol=1e-4, rtol=0)


if __name__ == "__main__":
    _aot_main(int(sys.argv[1]), int(sys.argv[2]))
