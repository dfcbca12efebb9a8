"""nm_grouped_linear (one N:M linear per expert, MoE): every CPU-side backend against dense matmuls.

Inputs are fresh random per test (conftest seeds), outputs poisoned (SPARSEKERN_POISON_OUTPUTS=1),
compared per element with conftest's bound (fp32 dense reference, torch's own error in the same
dtype, sum |x||w| floor): one dropped product fails. The Triton kernel is tested in
tests/test_moe_grouped_triton.py (interpreter, AOT compiles).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, assert_matches_reference

import sparsekern as sk
from sparsekern import dispatch
from sparsekern.formats.nm import NMSparseWeight, nm_to_dense, pack_meta, stack_nm

OPS = torch.ops.sparsekern
BACKENDS = ["reference", "dense"] + (["cpu"] if sk.HAS_C_EXT else [])
PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8)]


def random_experts(e: int, out: int, k: int, n: int, m: int, dtype=torch.float32):
    """Stacked ``(values, meta)`` of E random N:M weights (random kept positions, N(0,1) values)."""
    idx = torch.rand(e * out, k // m, m).argsort(-1)[..., :n].sort(-1).values.reshape(e * out, -1)
    meta = pack_meta(idx, m).view(e, out, -1)
    return torch.randn(e, out, k // m * n).to(dtype), meta


def offsets_of(counts) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)


def make_case(e, out, k, counts, n, m, dtype=torch.float32):
    """``(x, values, meta, offsets)``: E random experts and x with ``counts[e]`` rows for expert e."""
    values, meta = random_experts(e, out, k, n, m, dtype)
    offsets = offsets_of(counts)
    return torch.randn(int(offsets[-1]), k).to(dtype), values, meta, offsets


def check(out, x, values, meta, offsets, n, m, what):
    """``out`` against per-expert dense matmuls (fp32 and x's dtype), per element."""
    bounds = offsets.tolist()
    ref32, same, mag = (torch.zeros(x.shape[0], values.shape[1]) for _ in range(3))
    same = same.to(x.dtype)
    for e in range(values.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            w = nm_to_dense(values[e], meta[e], n, m)
            ref32[lo:hi] = x[lo:hi].float() @ w.float().T
            same[lo:hi] = F.linear(x[lo:hi], w)
            mag[lo:hi] = x[lo:hi].float().abs() @ w.float().abs().T
    assert_matches_reference(out, ref32, same, what, magnitude=mag)


def run(backend, x, values, meta, offsets, n, m):
    with sk.use_backend(backend):
        return sk.ops.nm_grouped_linear(x, values, meta, offsets, n, m)


# (label, experts, out, K, rows per expert): decode, empty experts, odd K / out, prefill.
CASES = [
    ("T=1 one expert", 4, 40, 48, [0, 1, 0, 0]),
    ("T=2 two experts", 4, 40, 48, [1, 0, 0, 1]),
    ("T=2 one expert", 3, 24, 32, [0, 2, 0]),
    ("zero rows", 3, 24, 32, [0, 0, 0]),
    ("odd K/out", 5, 37, 200, [3, 0, 1, 2, 5]),
    ("prefill T=64", 8, 72, 96, [20, 3, 0, 9, 1, 17, 8, 6]),
    ("GEMM expert + decode experts", 3, 33, 64, [1, 70, 2]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", PATTERNS, ids=[f"{n}:{m}" for n, m in PATTERNS])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_dense(case, n, m, dtype, backend):
    label, e, out, k, counts = case
    x, values, meta, offsets = make_case(e, out, k, counts, n, m, dtype)
    y = run(backend, x, values, meta, offsets, n, m)
    check(y, x, values, meta, offsets, n, m, f"{backend} {label} {n}:{m} {dtype}")


@pytest.mark.skipif(not sk.HAS_C_EXT, reason="compiled extension not loaded")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("counts", [[1, 0, 1], [2, 1, 3], [0, 40, 1]], ids=["2 experts", "3 experts", "gemm+1"])
def test_cpu_threads(counts, threads):
    """Both paths of the CPU op's decode job: serial per expert, and one pool job for all of them
    (chunks of 64+ output rows, so out=300 leaves a chunk shorter than the others)."""
    values, meta = random_experts(3, 300, 64, 2, 4)
    offsets = offsets_of(counts)
    x = torch.randn(int(offsets[-1]), 64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = run("cpu", x, values, meta, offsets, 2, 4)
    finally:
        torch.set_num_threads(before)
    check(y, x, values, meta, offsets, 2, 4, f"cpu threads={threads} {counts}")


MIXTRAL = [("gate_up", 2 * 3584, 1024), ("down", 1024, 3584)]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("counts", [[0, 0, 1, 0, 0, 1, 0, 0], [12, 5, 0, 9, 14, 2, 15, 7]], ids=["decode", "prefill"])
@pytest.mark.parametrize("shape", MIXTRAL, ids=[s[0] for s in MIXTRAL])
def test_mixtral_shapes(shape, counts, dtype, backend):
    _, out, k = shape
    x, values, meta, offsets = make_case(8, out, k, counts, 2, 4, dtype)
    check(run(backend, x, values, meta, offsets, 2, 4), x, values, meta, offsets, 2, 4, f"{backend} {shape} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_without_rows_are_not_read(backend):
    """Experts that no row was routed to may hold anything (NaN here): they cost nothing and
    change nothing."""
    values, meta = random_experts(4, 24, 32, 2, 4)
    values[0] = values[2] = float("nan")
    offsets = offsets_of([0, 3, 0, 2])
    x = torch.randn(5, 32)
    check(run(backend, x, values, meta, offsets, 2, 4), x, values, meta, offsets, 2, 4, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_like_dense(backend):
    values, meta = random_experts(3, 16, 32, 2, 4)
    offsets = offsets_of([2, 40, 1])  # decode, GEMM and decode experts on the CPU
    x = torch.randn(43, 32)
    x[1, 3], x[10, 0], x[42, 31] = float("nan"), float("inf"), float("-inf")
    y = run(backend, x, values, meta, offsets, 2, 4)
    dense = sk.reference.nm_grouped_linear(x, values, meta, offsets, 2, 4)
    assert torch.equal(torch.isnan(y), torch.isnan(dense)) and torch.equal(torch.isinf(y), torch.isinf(dense))
    assert torch.isnan(y[1]).any()  # row 1 meets its NaN at pruned columns too: dense semantics


def test_stack_nm():
    dense = torch.randn(3, 16, 32)
    values, meta = stack_nm(dense, n=2, m=4, prune=True)
    ws = [NMSparseWeight.from_dense(d, n=2, m=4, prune=True) for d in dense]
    for e, w in enumerate(ws):
        assert torch.equal(values[e], w.values) and torch.equal(meta[e], w.meta)
    v2, m2 = stack_nm(ws)
    assert torch.equal(v2, values) and torch.equal(m2, meta)
    with pytest.raises(ValueError, match=r"weights\[1\]: expected \(pattern, shape"):
        stack_nm([ws[0], NMSparseWeight.from_dense(dense[1], n=1, m=4, prune=True)])
    with pytest.raises(TypeError, match=r"weights\[1\]: expected NMSparseWeight, got Tensor"):
        stack_nm([ws[0], dense[1]])
    with pytest.raises(ValueError, match=r"weights\[0\]: expected float values, got int8"):
        stack_nm([ws[0].quantize("int8")])
    with pytest.raises(ValueError, match=r"weights: expected a 3-D"):
        stack_nm(dense[0])
    with pytest.raises(TypeError, match=r"weights: expected a 3-D tensor or a non-empty list"):
        stack_nm([])


def test_opcheck_and_compile():
    values, meta = random_experts(4, 24, 32, 2, 4)
    offsets = offsets_of([2, 0, 3, 1])
    x = torch.randn(6, 32)
    torch.library.opcheck(OPS.nm_grouped_linear, (x, values, meta, offsets, 2, 4))
    if sk.HAS_C_EXT:
        torch.library.opcheck(OPS._nm_grouped_linear_cpu, (x, values, meta, offsets, 2, 4))

    def f(x):
        return torch.relu(sk.ops.nm_grouped_linear(x * 2, values, meta, offsets, 2, 4)) + 1

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))


def test_dispatch_candidates_and_measured_bucket(measured):
    values, meta = random_experts(4, 24, 32, 2, 4)
    offsets = offsets_of([1, 0, 0, 1])
    x = torch.randn(2, 32)
    args = (x, values, meta, offsets, 2, 4)
    # The Triton kernel never ran on a GPU: it runs only when forced.
    assert dispatch.implementations("nm_grouped_linear")["triton"].auto is False
    assert dispatch.timing_set("nm_grouped_linear", *args) == [b for b in ("cpu", "dense") if b in BACKENDS]
    y = sk.ops.nm_grouped_linear(*args)
    check(y, x, values, meta, offsets, 2, 4, "measured auto")
    key = dispatch.bucket_key("nm_grouped_linear", *args)
    assert key == "nm_grouped_linear|float32|r4|e4|w24x32|2:4"
    assert dispatch.cached_choice("nm_grouped_linear", *args) in ("cpu", "dense")


# -- bad input: the public op and the C++ op refuse it with the same words ---------------------

OP_FNS = [("op", lambda *a: OPS.nm_grouped_linear(*a))]
if sk.HAS_C_EXT:
    OP_FNS.append(("cpu", lambda *a: OPS._nm_grouped_linear_cpu(*a)))


def _good():
    values, meta = random_experts(3, 8, 16, 2, 4)
    return dict(x=torch.randn(5, 16), values=values, meta=meta, offsets=offsets_of([2, 0, 3]), n=2, m=4)


def _bad_cases():
    g = _good()
    v, mt = g["values"], g["meta"]
    return [
        ("offsets int32", dict(offsets=g["offsets"].int()), TypeError, r"offsets: expected dtype in \['torch.int64'\]"),
        ("offsets length", dict(offsets=offsets_of([2, 3])), ValueError, r"offsets: expected shape \(4,\)"),
        ("offsets 2-D", dict(offsets=g["offsets"].view(1, 4)), ValueError, r"offsets: expected shape \(4,\)"),
        ("offsets start", dict(offsets=torch.tensor([1, 2, 2, 5])), ValueError, r"offsets: expected to start at 0.*1\.\.5"),
        ("offsets end", dict(offsets=torch.tensor([0, 2, 2, 4])), ValueError, r"offsets: .*end at the rows of x \(5\)"),
        ("offsets decrease", dict(offsets=torch.tensor([0, 3, 2, 5])), ValueError, r"non-decreasing, got 3 then 2 at expert 1"),
        ("offsets meta", dict(offsets=torch.empty(4, dtype=torch.int64, device="meta")), ValueError,
         r"offsets: expected device cpu"),
        ("values 2-D", dict(values=v[0]), ValueError, r"values: expected \[experts, out, K\*2/4\]"),
        ("meta experts", dict(meta=mt[:2]), ValueError, r"meta: expected shape \(3, 8, 1\), got \(2, 8, 1\)"),
        ("meta rows", dict(meta=mt[:, :7]), ValueError, r"meta: expected shape \(3, 8, 1\)"),
        ("meta dtype", dict(meta=mt.long()), TypeError, r"meta: expected dtype in \['torch.int32'\]"),
        ("K mismatch", dict(x=torch.randn(5, 20)), ValueError, r"x: expected last dimension 16 \(in_features\), got shape \(5, 20\)"),
        ("x 3-D", dict(x=torch.randn(1, 5, 16)), ValueError, r"x: expected a 2-D \[tokens, in_features\]"),
        ("x dtype", dict(x=torch.randn(5, 16).half()), TypeError, r"values: expected dtype torch.float16 \(that of x\)"),
        ("x int", dict(x=torch.ones(5, 16, dtype=torch.int32)), TypeError, r"x: expected dtype in"),
        ("quantized", dict(values=v.to(torch.int8)), ValueError, r"values: .*float values only.*torch.int8"),
        ("m", dict(m=3), ValueError, r"m: expected one of \(2, 4, 8, 16\), got 3"),
        ("n", dict(n=4), ValueError, r"n: expected 0 < n < m=4, got 4"),
    ]  # fmt: skip


@pytest.mark.parametrize("via", [name for name, _ in OP_FNS])
@pytest.mark.parametrize("case", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_bad_input(case, via):
    label, change, exc, msg = _bad_cases()[case]
    args = {**_good(), **change}
    fn = dict(OP_FNS)[via]
    with pytest.raises(exc, match=msg):
        fn(*args.values())


def test_bad_input_wrapper_and_fake():
    g = _good()
    with pytest.raises(TypeError, match=r"offsets: expected torch.Tensor, got list"):
        sk.ops.nm_grouped_linear(g["x"], g["values"], g["meta"], [0, 2, 2, 5], 2, 4)
    # The fake implementation runs the checks that need no data (torch.compile sees them too).
    from torch._subclasses.fake_tensor import FakeTensorMode

    short = offsets_of([2, 3])
    with FakeTensorMode() as mode:
        fx, fv, fm, fo = (mode.from_tensor(t) for t in (g["x"], g["values"], g["meta"], short))
        with pytest.raises(ValueError, match=r"offsets: expected shape \(4,\)"):
            OPS.nm_grouped_linear(fx, fv, fm, fo, 2, 4)
