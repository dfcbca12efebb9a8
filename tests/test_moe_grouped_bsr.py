"""bsr_grouped_linear (one block-sparse linear per expert, MoE): every CPU-side backend against dense matmuls.

Mirrors tests/test_moe_grouped.py (the N:M op): fresh random inputs per test (conftest seeds),
outputs poisoned (SPARSEKERN_POISON_OUTPUTS=1), compared per element with conftest's bound (fp32
dense reference, torch's own error in the same dtype, sum |x||w| floor): one dropped product
fails. The Triton kernel is tested in tests/test_moe_grouped_bsr_triton.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, assert_matches_reference

import sparsekern as sk
from sparsekern import dispatch, plan
from sparsekern.formats.bsr import BlockSparseWeight, bsr_to_dense, stack_bsr

OPS = torch.ops.sparsekern
BACKENDS = ["reference", "dense"] + (["cpu"] if sk.HAS_C_EXT else [])


def random_experts(e, out, k, block, density, dtype=torch.float32, no_blocks=()):
    """``(crow, col, blocks)`` of E random BSR weights stacked (random kept blocks at ``density``,
    N(0,1) values); the experts in ``no_blocks`` store none."""
    bm, bk = block
    keep = torch.rand(e, out // bm, k // bk) < density
    keep[list(no_blocks)] = False
    counts = keep.sum(-1).flatten()
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    # Global indices: expert e's row r + 1 ends where expert e's row r + 1 of the flat rows does.
    rb = out // bm
    crow = torch.stack([crow[i * rb : (i + 1) * rb + 1] for i in range(e)]).to(torch.int32)
    col = keep.nonzero()[:, 2].to(torch.int32)
    return crow, col, torch.randn(col.numel(), bm, bk).to(dtype)


def offsets_of(counts) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)


def make_case(e, out, k, counts, block, density, dtype=torch.float32, no_blocks=()):
    """``(x, crow, col, blocks, offsets)``: E random experts and x with ``counts[e]`` rows for expert e."""
    crow, col, blocks = random_experts(e, out, k, block, density, dtype, no_blocks)
    offsets = offsets_of(counts)
    return torch.randn(int(offsets[-1]), k).to(dtype), crow, col, blocks, offsets


def expert_dense(crow, col, blocks, e: int, k: int) -> torch.Tensor:
    lo, hi = int(crow[e, 0]), int(crow[e, -1])
    return bsr_to_dense(crow[e] - lo, col[lo:hi], blocks[lo:hi], k)


def check(out, x, crow, col, blocks, offsets, what):
    """``out`` against per-expert dense matmuls (fp32 and x's dtype), per element."""
    bounds, k = offsets.tolist(), x.shape[1]
    n_out = (crow.shape[1] - 1) * blocks.shape[1]
    ref32, same, mag = (torch.zeros(x.shape[0], n_out) for _ in range(3))
    same = same.to(x.dtype)
    for e in range(crow.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            w = expert_dense(crow, col, blocks, e, k)
            ref32[lo:hi] = x[lo:hi].float() @ w.float().T
            same[lo:hi] = F.linear(x[lo:hi], w)
            mag[lo:hi] = x[lo:hi].float().abs() @ w.float().abs().T
    assert_matches_reference(out, ref32, same, what, magnitude=mag)


def run(backend, x, crow, col, blocks, offsets):
    with sk.use_backend(backend):
        return sk.ops.bsr_grouped_linear(x, crow, col, blocks, offsets)


# (label, experts, out, K, block, density, rows per expert, experts storing no block): decode,
# empty experts, experts without blocks, non-square and odd blocks, prefill, the CPU's GEMM path.
CASES = [
    ("T=1 one expert", 4, 48, 64, (16, 16), 0.5, [0, 1, 0, 0], ()),
    ("T=2 two experts", 4, 48, 64, (16, 16), 0.5, [1, 0, 0, 1], ()),
    ("T=2 one expert", 3, 32, 96, (8, 32), 0.4, [0, 2, 0], ()),
    ("zero rows", 3, 32, 32, (16, 16), 0.5, [0, 0, 0], ()),
    ("odd blocks", 5, 40, 120, (8, 24), 0.3, [3, 0, 1, 2, 5], ()),
    ("no blocks", 4, 48, 64, (16, 16), 0.5, [2, 3, 1, 9], (1, 3)),
    ("no blocks at all", 2, 32, 64, (16, 16), 0.5, [1, 6], (0, 1)),
    ("prefill T=64", 8, 72, 96, (24, 32), 0.3, [20, 3, 0, 9, 1, 17, 8, 6], (5,)),
    ("GEMM expert + decode experts", 3, 48, 64, (16, 16), 0.9, [1, 70, 2], ()),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_dense(case, dtype, backend):
    label, e, out, k, block, density, counts, no_blocks = case
    x, crow, col, blocks, offsets = make_case(e, out, k, counts, block, density, dtype, no_blocks)
    y = run(backend, x, crow, col, blocks, offsets)
    check(y, x, crow, col, blocks, offsets, f"{backend} {label} {dtype}")


@pytest.mark.skipif(not sk.HAS_C_EXT, reason="compiled extension not loaded")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("counts", [[1, 0, 1], [2, 1, 3], [0, 40, 1]], ids=["2 experts", "3 experts", "gemm+1"])
def test_cpu_threads(counts, threads):
    """Both paths of the CPU op's decode job: serial per expert, and one pool job for all of them
    (chunks of 64+ output rows: 37 block rows of 8 leave a chunk shorter than the others)."""
    crow, col, blocks = random_experts(3, 296, 64, (8, 16), 0.5)
    offsets = offsets_of(counts)
    x = torch.randn(int(offsets[-1]), 64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = run("cpu", x, crow, col, blocks, offsets)
    finally:
        torch.set_num_threads(before)
    check(y, x, crow, col, blocks, offsets, f"cpu threads={threads} {counts}")


MIXTRAL = [("gate_up", 2 * 3584, 1024), ("down", 1024, 3584)]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("counts", [[0, 0, 1, 0, 0, 1, 0, 0], [12, 5, 0, 9, 14, 2, 15, 7]], ids=["decode", "prefill"])
@pytest.mark.parametrize("shape", MIXTRAL, ids=[s[0] for s in MIXTRAL])
def test_mixtral_shapes(shape, counts, dtype, backend):
    """E=8 experts, 32x32 blocks at 90% sparsity: Mixtral's gate_up (7168x1024) and down."""
    _, out, k = shape
    x, crow, col, blocks, offsets = make_case(8, out, k, counts, (32, 32), 0.1, dtype)
    check(run(backend, x, crow, col, blocks, offsets), x, crow, col, blocks, offsets, f"{backend} {shape} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_without_rows_are_not_read(backend):
    """Experts that no row was routed to may hold anything (NaN here): they cost nothing and
    change nothing."""
    crow, col, blocks = random_experts(4, 32, 64, (16, 16), 0.5)
    for e in (0, 2):
        blocks[int(crow[e, 0]) : int(crow[e, -1])] = float("nan")
    offsets = offsets_of([0, 3, 0, 2])
    x = torch.randn(5, 64)
    check(run(backend, x, crow, col, blocks, offsets), x, crow, col, blocks, offsets, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_like_dense(backend):
    crow, col, blocks = random_experts(4, 32, 64, (16, 16), 0.4, no_blocks=(3,))
    offsets = offsets_of([2, 40, 1, 1])  # decode, batched and decode experts on the CPU; no blocks
    x = torch.randn(44, 64)
    x[1, 3], x[10, 0], x[42, 63], x[43, 5] = float("nan"), float("inf"), float("-inf"), float("nan")
    y = run(backend, x, crow, col, blocks, offsets)
    dense = sk.reference.bsr_grouped_linear(x, crow, col, blocks, offsets)
    assert torch.equal(torch.isnan(y), torch.isnan(dense)) and torch.equal(torch.isinf(y), torch.isinf(dense))
    assert torch.isnan(y[1]).all() and torch.isnan(y[43]).all()  # pruned blocks and an empty expert: NaN too
    ok = torch.isfinite(x).all(1)  # the other rows keep their numbers
    torch.testing.assert_close(y[ok], dense[ok], rtol=1e-5, atol=1e-4)


def test_dense_backend_honours_dense_fallback():
    x, crow, col, blocks, offsets = make_case(3, 32, 64, [1, 0, 2], (16, 16), 0.5)
    args = (x, crow, col, blocks, offsets)
    assert dispatch.implementations("bsr_grouped_linear")["dense"].supports(*args) is None
    plan.set_dense_fallback(blocks, False)
    try:
        assert "dense_fallback=False" in dispatch.implementations("bsr_grouped_linear")["dense"].supports(*args)
    finally:
        plan.set_dense_fallback(blocks, True)


def test_stack_bsr():
    dense = torch.randn(3, 32, 64)
    crow, col, blocks = stack_bsr(dense, block=(16, 16), sparsity=0.5)
    ws = [BlockSparseWeight.from_dense(d, block=(16, 16), sparsity=0.5) for d in dense]
    assert crow.dtype == col.dtype == torch.int32 and tuple(crow.shape) == (3, 3)
    for e, w in enumerate(ws):
        lo, hi = int(crow[e, 0]), int(crow[e, -1])
        assert torch.equal(crow[e] - lo, w.crow_indices) and torch.equal(col[lo:hi], w.col_indices)
        assert torch.equal(blocks[lo:hi], w.blocks)
        assert torch.equal(expert_dense(crow, col, blocks, e, 64), w.to_dense())
    assert int(crow[-1, -1]) == blocks.shape[0] == col.numel()
    c2, l2, b2 = stack_bsr(ws)
    assert torch.equal(c2, crow) and torch.equal(l2, col) and torch.equal(b2, blocks)
    with pytest.raises(ValueError, match=r"weights\[1\]: expected \(block, shape, dtype, device\)"):
        stack_bsr([ws[0], BlockSparseWeight.from_dense(dense[1], block=(16, 32), sparsity=0.5)])
    with pytest.raises(ValueError, match=r"weights\[1\]: expected \(block, shape, dtype, device\)"):
        stack_bsr([ws[0], ws[1].to(torch.float16)])
    with pytest.raises(TypeError, match=r"weights\[1\]: expected BlockSparseWeight, got Tensor"):
        stack_bsr([ws[0], dense[1]])
    with pytest.raises(ValueError, match=r"weights: expected a 3-D"):
        stack_bsr(dense[0])
    with pytest.raises(TypeError, match=r"weights: expected a 3-D tensor or a non-empty list"):
        stack_bsr([])


def test_opcheck_and_compile():
    x, crow, col, blocks, offsets = make_case(4, 32, 64, [2, 0, 3, 1], (16, 16), 0.5)
    torch.library.opcheck(OPS.bsr_grouped_linear, (x, crow, col, blocks, offsets))
    if sk.HAS_C_EXT:
        torch.library.opcheck(OPS._bsr_grouped_linear_cpu, (x, crow, col, blocks, offsets))

    def f(x):
        return torch.relu(sk.ops.bsr_grouped_linear(x * 2, crow, col, blocks, offsets)) + 1

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))


def test_dispatch_candidates_and_measured_bucket(measured):
    x, crow, col, blocks, offsets = make_case(4, 32, 64, [1, 0, 0, 1], (16, 16), 0.5)
    args = (x, crow, col, blocks, offsets)
    # The Triton kernel never ran on a GPU: it runs only when forced.
    assert dispatch.implementations("bsr_grouped_linear")["triton"].auto is False
    assert dispatch.timing_set("bsr_grouped_linear", *args) == [b for b in ("cpu", "dense") if b in BACKENDS]
    y = sk.ops.bsr_grouped_linear(*args)
    check(y, *args, "measured auto")
    key = dispatch.bucket_key("bsr_grouped_linear", *args)
    density = round(20 * blocks.shape[0] / (4 * 2 * 4)) / 20
    assert key == f"bsr_grouped_linear|float32|r4|e4|w32x64|b16x16|d{density:.2f}"
    assert dispatch.cached_choice("bsr_grouped_linear", *args) in ("cpu", "dense")


def test_info_lists_backends():
    from sparsekern import info

    assert "reference" in info.gather()["backends.bsr_grouped_linear"]


# -- bad input: the public op and the C++ op refuse it with the same words ---------------------

OP_FNS = [("op", lambda *a: OPS.bsr_grouped_linear(*a))]
if sk.HAS_C_EXT:
    OP_FNS.append(("cpu", lambda *a: OPS._bsr_grouped_linear_cpu(*a)))


def _good():
    # Every expert stores blocks in each block row: 3 experts x 2 block rows x 2 blocks (K=64, 16x16).
    crow = torch.tensor([[0, 2, 4], [4, 6, 8], [8, 10, 12]], dtype=torch.int32)
    col = torch.tensor([0, 2, 1, 3] * 3, dtype=torch.int32)
    return dict(x=torch.randn(5, 64), crow=crow, col=col, blocks=torch.randn(12, 16, 16), offsets=offsets_of([2, 0, 3]))


def _with(t, i, v):
    t = t.clone()
    t.view(-1)[i] = v
    return t


def _bad_cases():
    g = _good()
    c, cl, b = g["crow"], g["col"], g["blocks"]
    return [
        ("offsets int32", dict(offsets=g["offsets"].int()), TypeError, r"offsets: expected dtype in \['torch.int64'\]"),
        ("offsets length", dict(offsets=offsets_of([2, 3])), ValueError, r"offsets: expected shape \(4,\)"),
        ("offsets start", dict(offsets=torch.tensor([1, 2, 2, 5])), ValueError, r"offsets: expected to start at 0.*1\.\.5"),
        ("offsets end", dict(offsets=torch.tensor([0, 2, 2, 4])), ValueError, r"offsets: .*end at the rows of x \(5\)"),
        ("offsets decrease", dict(offsets=torch.tensor([0, 3, 2, 5])), ValueError, r"non-decreasing, got 3 then 2 at expert 1"),
        ("offsets meta", dict(offsets=torch.empty(4, dtype=torch.int64, device="meta")), ValueError,
         r"offsets: expected device cpu"),
        ("crow meta", dict(crow=torch.empty(3, 3, dtype=torch.int32, device="meta")), ValueError,
         r"crow: expected device cpu \(that of blocks\), got meta"),
        ("col meta", dict(col=torch.empty(12, dtype=torch.int32, device="meta")), ValueError,
         r"col: expected device cpu \(that of blocks\), got meta"),
        ("blocks int8", dict(blocks=b.to(torch.int8)), TypeError, r"blocks: expected dtype in"),
        ("blocks 2-D", dict(blocks=b[0]), ValueError, r"blocks: expected \[nnz, bm, bk\]"),
        ("crow 1-D", dict(crow=c[0]), ValueError, r"crow: expected \[experts >= 1, out/bm \+ 1\], got shape \(3,\)"),
        ("crow no experts", dict(crow=c[:0]), ValueError, r"crow: expected \[experts >= 1, out/bm \+ 1\]"),
        ("crow int64", dict(crow=c.long()), TypeError, r"crow: expected dtype in \['torch.int32'\]"),
        ("col length", dict(col=cl[:11]), ValueError, r"col: expected shape \(12,\) \(one entry per block\), got \(11,\)"),
        ("col int64", dict(col=cl.long()), TypeError, r"col: expected dtype in \['torch.int32'\]"),
        ("x 3-D", dict(x=torch.randn(1, 5, 64)), ValueError, r"x: expected a 2-D \[tokens, in_features\]"),
        ("x dtype", dict(x=torch.randn(5, 64).half()), TypeError, r"blocks: expected dtype torch.float16 \(that of x\)"),
        ("x int", dict(x=torch.ones(5, 64, dtype=torch.int32)), TypeError, r"x: expected dtype in"),
        ("K not blocks", dict(x=torch.randn(5, 56)), ValueError, r"x: last dimension 56 is not divisible by the block width 16"),
        ("experts vs offsets", dict(crow=c[:2]), ValueError, r"offsets: expected shape \(3,\)"),
        ("crow start", dict(crow=_with(c, 0, 1)), ValueError, r"crow: expected to start at 0 and end at nnz=12, got 1\.\.12"),
        ("crow end", dict(crow=_with(c, 8, 11)), ValueError, r"crow: expected to start at 0 and end at nnz=12, got 0\.\.11"),
        ("crow gap", dict(crow=_with(c, 3, 5)), ValueError, r"crow: expert 1 starts at 5, expected 4 \(where expert 0 ends\)"),
        ("crow decreases", dict(crow=_with(c, 4, 3)), ValueError, r"crow: decreases at expert 1 block row 0"),
        ("crow past nnz", dict(crow=_with(c, 7, 13)), ValueError, r"crow: decreases at expert 2 block row 1"),
        ("col range", dict(col=_with(cl, 9, 4)), ValueError, r"col: entry 9 is 4, out of range 0\.\.3"),
        ("col negative", dict(col=_with(cl, 2, -1)), ValueError, r"col: entry 2 is -1, out of range 0\.\.3"),
        ("col order", dict(col=_with(cl, 7, 1)), ValueError,
         r"col: expert 1 block row 1 has columns out of order or repeated at entry 7"),
    ]  # fmt: skip


@pytest.mark.parametrize("via", [name for name, _ in OP_FNS])
@pytest.mark.parametrize("case", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_bad_input(case, via):
    label, change, exc, msg = _bad_cases()[case]
    args = {**_good(), **change}
    fn = dict(OP_FNS)[via]
    with pytest.raises(exc, match=msg):
        fn(*args.values())


def test_good_input_passes():
    """The bad cases above change one thing each of an input that runs."""
    g = _good()
    check(OPS.bsr_grouped_linear(*g.values()), *g.values(), "good")


@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_changed_in_place_are_checked_again(backend):
    """The op scans the indices once per version of crow/col, not once per tensor (for the
    reference and dense backends that scan is all that stands between bad indices and a result)."""
    g = _good()
    run(backend, *g.values())
    g["crow"][1, 0] = 3
    with pytest.raises(ValueError, match=r"crow: expert 1 starts at 3, expected 4"):
        run(backend, *g.values())
    g["crow"][1, 0] = 4
    g["col"][0] = 7
    with pytest.raises(ValueError, match=r"col: entry 0 is 7, out of range 0\.\.3"):
        run(backend, *g.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """x, crow and blocks as non-contiguous views: the backends read them as the dense op would."""
    x, crow, col, blocks, offsets = make_case(3, 32, 64, [2, 0, 5], (16, 16), 0.5)
    xt = x.t().contiguous().t()
    blocks_t = blocks.transpose(1, 2).contiguous().transpose(1, 2)
    crow_wide = torch.zeros(3, 6, dtype=torch.int32)
    crow_wide[:, ::2] = crow
    y = run(backend, xt, crow_wide[:, ::2], col, blocks_t, offsets)
    check(y, x, crow, col, blocks, offsets, f"{backend} strided")


def test_bad_input_wrapper_and_fake():
    g = _good()
    with pytest.raises(TypeError, match=r"offsets: expected torch.Tensor, got list"):
        sk.ops.bsr_grouped_linear(g["x"], g["crow"], g["col"], g["blocks"], [0, 2, 2, 5])
    # The fake implementation runs the checks that need no data (torch.compile sees them too).
    from torch._subclasses.fake_tensor import FakeTensorMode

    short = offsets_of([2, 3])
    with FakeTensorMode() as mode:
        fx, fc, fl, fb, fo = (mode.from_tensor(t) for t in (g["x"], g["crow"], g["col"], g["blocks"], short))
        with pytest.raises(ValueError, match=r"offsets: expected shape \(4,\)"):
            OPS.bsr_grouped_linear(fx, fc, fl, fb, fo)
