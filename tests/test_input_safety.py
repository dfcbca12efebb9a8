"""Bad input to the linear and attention ops: refused with the same ValueError/TypeError by the
public ops on every backend, by the registered CPU ops called directly (csrc/cpu/op_checks.h),
and by SparseLinear (forward and load_state_dict). Nothing out of bounds, never a silent answer."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern import dispatch
from sparsekern.formats.nm import pack_meta

ROOT = Path(__file__).resolve().parents[1]
cpu_ops = pytest.mark.skipif(not sk.HAS_C_EXT, reason="compiled extension not loaded")
BACKENDS = ("reference", "dense", pytest.param("cpu", marks=cpu_ops))


def _bsr(out=32, k=64, block=(16, 16)):
    """A BSR weight with every block stored (so each block row holds every column)."""
    return sk.BlockSparseWeight.from_dense(torch.randn(out, k), block=block)


def _error(fn):
    with pytest.raises((ValueError, TypeError)) as info:
        fn()
    return info.type, str(info.value)


# -- BSR index values: the same refusal everywhere -----------------------------------------------


def _bad_col_minus_one(w):
    col = w.col_indices.clone()
    col[0] = -1
    return w.crow_indices, col


def _bad_col_too_large(w):
    col = w.col_indices.clone()
    col[5] = 4  # 64 / 16 = 4 block columns
    return w.crow_indices, col


def _bad_col_repeated(w):
    col = w.col_indices.clone()
    col[1] = col[0]
    return w.crow_indices, col


def _bad_crow_start(w):
    crow = w.crow_indices.clone()
    crow[0] = 1
    return crow, w.col_indices


def _bad_crow_decreasing(w):
    crow = w.crow_indices.clone()
    crow[1] = 9  # 0, 9, 8: block row 1 decreases
    return crow, w.col_indices


def _bad_crow_last(w):
    crow = w.crow_indices.clone()
    crow[-1] -= 1
    return crow, w.col_indices


BAD_INDICES = {
    "col -1": (_bad_col_minus_one, "col: entry 0 is -1, out of range 0..3"),
    "col >= K/bk": (_bad_col_too_large, "col: entry 5 is 4, out of range 0..3"),
    "col repeated": (_bad_col_repeated, "col: block row 0 has columns out of order or repeated at entry 1"),
    "crow[0] != 0": (_bad_crow_start, "crow: expected to start at 0 and end at nnz=8, got 1..8"),
    "crow decreasing": (_bad_crow_decreasing, "crow: decreases at block row 1"),
    "crow[-1] != nnz": (_bad_crow_last, "crow: expected to start at 0 and end at nnz=8, got 0..7"),
}


@pytest.mark.parametrize("case", list(BAD_INDICES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bsr_bad_indices_refused_by_every_backend(case, backend):
    make, message = BAD_INDICES[case]
    w = _bsr()
    crow, col = make(w)
    x = torch.randn(3, 64)
    with sk.use_backend(backend):
        kind, text = _error(lambda: torch.ops.sparsekern.bsr_linear(x, crow, col, w.blocks))
    assert (kind, text) == (ValueError, message)


@cpu_ops
@pytest.mark.parametrize("case", list(BAD_INDICES))
def test_bsr_bad_indices_refused_by_cpu_op_directly(case):
    make, message = BAD_INDICES[case]
    w = _bsr()
    crow, col = make(w)
    for rows in (1, 8):  # decode and batched kernels
        x = torch.randn(rows, 64)
        with pytest.raises(ValueError) as info:
            torch.ops.sparsekern._bsr_linear_cpu(x, crow, col, w.blocks)
        assert str(info.value) == message


def test_bsr_index_check_is_redone_after_in_place_change():
    w = _bsr()
    x = torch.randn(2, 64)
    col = w.col_indices.clone()
    with sk.use_backend("reference"):
        torch.ops.sparsekern.bsr_linear(x, w.crow_indices, col, w.blocks)  # passes and is remembered
        col[3] = 7
        with pytest.raises(ValueError, match="col: entry 3 is 7, out of range 0..3"):
            torch.ops.sparsekern.bsr_linear(x, w.crow_indices, col, w.blocks)


# -- the CPU ops called directly: shapes, dtypes, N:M values -----------------------------------


def _nm_parts(out=4, k=16, n=2, m=4):
    return sk.NMSparseWeight.from_dense(torch.randn(out, k), n=n, m=m, prune=True)


NM_CPU_CASES = {
    # x [1, 4096] against a weight with K = 2 * 4 / 2 = 4: the kernel read x out of bounds.
    "K mismatch": (
        lambda w: (torch.randn(1, 4096), torch.randn(4, 2), torch.zeros(4, 1, dtype=torch.int32), 2, 4, None),
        ValueError,
        r"x: expected last dimension 4 \(in_features\), got shape \(1, 4096\)",
    ),
    "m=3": (lambda w: (torch.randn(1, 6), torch.randn(4, 4), w.meta, 2, 3, None), ValueError, "m: expected one of"),
    "n >= m": (lambda w: (torch.randn(1, 16), w.values, w.meta, 4, 4, None), ValueError, "n: expected 0 < n < m=4"),
    "meta shape": (
        lambda w: (torch.randn(1, 16), w.values, w.meta[:2], 2, 4, None),
        ValueError,
        r"meta: expected shape \(4, 1\), got \(2, 1\)",
    ),
    "meta dtype": (
        lambda w: (torch.randn(1, 16), w.values, w.meta.long(), 2, 4, None),
        TypeError,
        "meta: expected dtype",
    ),
    "values dtype": (
        lambda w: (torch.randn(1, 16), w.values.half(), w.meta, 2, 4, None),
        TypeError,
        r"values: expected dtype torch.float32 \(that of x\), got torch.float16",
    ),
    "x not 2-D": (lambda w: (torch.randn(2, 1, 16), w.values, w.meta, 2, 4, None), ValueError, "x: expected a 2-D"),
    "x int": (
        lambda w: (torch.ones(1, 16, dtype=torch.int64), w.values, w.meta, 2, 4, None),
        TypeError,
        "x: expected dtype",
    ),
    "bias shape": (
        lambda w: (torch.randn(1, 16), w.values, w.meta, 2, 4, torch.randn(5)),
        ValueError,
        r"bias: expected shape \(4,\), got \(5,\)",
    ),
}


@cpu_ops
@pytest.mark.parametrize("case", list(NM_CPU_CASES))
def test_nm_cpu_op_checks_its_arguments(case):
    make, kind, pattern = NM_CPU_CASES[case]
    with pytest.raises(kind, match=pattern):
        torch.ops.sparsekern._nm_linear_cpu(*make(_nm_parts()))


BSR_CPU_CASES = {
    "K not a multiple of bk": (
        lambda w: (torch.randn(1, 40), w.crow_indices, w.col_indices, w.blocks, None),
        ValueError,
        "x: last dimension 40 is not divisible by the block width 16",
    ),
    "blocks 2-D": (
        lambda w: (torch.randn(1, 64), w.crow_indices, w.col_indices, w.blocks[0], None),
        ValueError,
        r"blocks: expected \[nnz, bm, bk\]",
    ),
    "crow int64": (
        lambda w: (torch.randn(1, 64), w.crow_indices.long(), w.col_indices, w.blocks, None),
        TypeError,
        "crow: expected dtype",
    ),
    "col too short": (
        lambda w: (torch.randn(1, 64), w.crow_indices, w.col_indices[:-1], w.blocks, None),
        ValueError,
        "crow/col: expected 1-D crow and col with 8 entries",
    ),
    "blocks dtype": (
        lambda w: (torch.randn(1, 64), w.crow_indices, w.col_indices, w.blocks.bfloat16(), None),
        TypeError,
        r"blocks: expected dtype torch.float32 \(that of x\)",
    ),
    "bias shape": (
        lambda w: (torch.randn(1, 64), w.crow_indices, w.col_indices, w.blocks, torch.randn(64)),
        ValueError,
        r"bias: expected shape \(32,\), got \(64,\)",
    ),
}


@cpu_ops
@pytest.mark.parametrize("case", list(BSR_CPU_CASES))
def test_bsr_cpu_op_checks_its_arguments(case):
    make, kind, pattern = BSR_CPU_CASES[case]
    with pytest.raises(kind, match=pattern):
        torch.ops.sparsekern._bsr_linear_cpu(*make(_bsr()))


def _qkv(b=1, h=2, sq=4, sk=8, d=16):
    return torch.randn(b, h, sq, d), torch.randn(b, h, sk, d), torch.randn(b, h, sk, d)


ATTN_CASES = {
    "keep_idx >= Sk": (
        lambda q, k, v: (q, k, v, torch.full((1, 2, 3), 8)),
        ValueError,
        "keep_idx: expected key positions in 0..7, got values in 8..8",
    ),
    "keep_idx < 0": (
        lambda q, k, v: (q, k, v, torch.full((1, 2, 3), -1)),
        ValueError,
        "keep_idx: expected key positions in 0..7",
    ),
    "keep_idx shape": (
        lambda q, k, v: (q, k, v, torch.zeros(1, 3, 3, dtype=torch.long)),
        ValueError,
        r"keep_idx: expected \[1, 2, kept\]",
    ),
    "keep_idx dtype": (
        lambda q, k, v: (q, k, v, torch.zeros(1, 2, 3, dtype=torch.int32)),
        TypeError,
        "keep_idx: expected dtype",
    ),
    "keep_idx empty": (
        lambda q, k, v: (q, k, v, torch.zeros(1, 2, 0, dtype=torch.long)),
        ValueError,
        "keep_idx: the keep set is empty",
    ),
    "q 3-D": (
        lambda q, k, v: (q[0], k, v, torch.zeros(1, 2, 3, dtype=torch.long)),
        ValueError,
        r"q: expected \[batch, heads, seq, head_dim\]",
    ),
    "k dtype": (
        lambda q, k, v: (q, k.half(), v, torch.zeros(1, 2, 3, dtype=torch.long)),
        TypeError,
        r"k: expected dtype torch.float32 \(that of q\)",
    ),
    "v shape": (
        lambda q, k, v: (q, k, v[:, :, :5], torch.zeros(1, 2, 3, dtype=torch.long)),
        ValueError,
        r"v: expected shape \(1, 2, 8, 16\) \(that of k\)",
    ),
    "k head_dim": (
        lambda q, k, v: (q, k[..., :8], v[..., :8], torch.zeros(1, 2, 3, dtype=torch.long)),
        ValueError,
        r"k: expected \[1, 2, Sk, 16\]",
    ),
}


@cpu_ops
@pytest.mark.parametrize("op", ["_pruned_attention_cpu", "_pruned_attention_scores_cpu"])
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_cpu_ops_check_their_arguments(op, case):
    make, kind, pattern = ATTN_CASES[case]
    with pytest.raises(kind, match=pattern):
        getattr(torch.ops.sparsekern, op)(*make(*_qkv()), False, None)


@cpu_ops
def test_token_scores_cpu_op_checks_its_arguments():
    q, k, _ = _qkv()
    with pytest.raises(TypeError, match=r"k: expected dtype torch.float32 \(that of q\)"):
        torch.ops.sparsekern._token_scores_cpu(q, k.bfloat16(), False, None, False)
    with pytest.raises(ValueError, match=r"k: expected \[1, 2, Sk, 16\]"):
        torch.ops.sparsekern._token_scores_cpu(q, k[:, :1], False, None, False)


CLS_NO_QUERY_CALLS = {
    **{
        b: f"with sk.use_backend({b!r}): sk.ops.token_scores(q, k, cls_only=True)"
        for b in ("reference", "dense", "cpu")
    },
    "cpu op": "torch.ops.sparsekern._token_scores_cpu(q, k, False, None, True)",
}


@pytest.fixture(scope="module")
def cls_scores_of_no_query() -> dict:
    """What each call of CLS_NO_QUERY_CALLS (CLS scores of q [1, 2, 0, 8]) says, run in one child
    process (2.5 s to start one here): the CPU kernel read query 0 outside q and crashed."""
    code = "import torch, sparsekern as sk\nq, k = torch.randn(1, 2, 0, 8), torch.randn(1, 2, 5, 8)\n"
    for name, call in CLS_NO_QUERY_CALLS.items():
        code += (
            f"try:\n    {call}\n    print('[{name}]', 'no error')\n"
            f"except Exception as e:\n    print('[{name}]', type(e).__name__, e)\n"
        )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    lines = res.stdout.splitlines()
    return {name: next((ln for ln in lines if ln.startswith(f"[{name}] ")), "") for name in CLS_NO_QUERY_CALLS}


NO_QUERY = "ValueError q: cls_only scores the first query; expected at least one query, got shape (1, 2, 0, 8)"


@pytest.mark.parametrize("backend", BACKENDS)
def test_cls_scores_of_no_query_refused(backend, cls_scores_of_no_query):
    assert NO_QUERY in cls_scores_of_no_query[backend]


@cpu_ops
def test_cls_scores_of_no_query_refused_by_cpu_op_directly(cls_scores_of_no_query):
    assert NO_QUERY in cls_scores_of_no_query["cpu op"]


# -- SparseLinear: K is in_features; bad input is refused before any timing --------------------


@pytest.mark.parametrize("width", [32, 48])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_linear_refuses_x_narrower_than_in_features(width, backend):
    dense = torch.randn(64, 64)
    dense[:, 32:] = 0  # only block columns 0 and 1 stored: a narrower x passes the op's own checks
    layer = sk.SparseLinear(sk.BlockSparseWeight.from_dense(dense, block=(16, 16)))
    with (
        sk.use_backend(backend),
        pytest.raises(ValueError, match=rf"x: expected last dimension 64 \(in_features\), got shape \(2, {width}\)"),
    ):
        layer(torch.randn(2, width))


def _no_timing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a candidate was timed on invalid input")

    monkeypatch.setattr(dispatch, "time_impls", fail)


def test_measured_dispatch_never_times_bad_indices(measured, monkeypatch):
    _no_timing(monkeypatch)
    w = _bsr()
    crow, col = _bad_col_too_large(w)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="col: entry 5 is 4"):
        torch.ops.sparsekern.bsr_linear(x, crow, col, w.blocks)
    assert dispatch.cached_choice("bsr_linear", x, crow, col, w.blocks, None) is None


@pytest.mark.parametrize("width", [32, 48])
def test_measured_dispatch_never_times_sparse_linear_bad_width(measured, monkeypatch, width):
    _no_timing(monkeypatch)
    layer = sk.SparseLinear(_bsr(out=64, k=64))
    with pytest.raises(ValueError, match="x: expected last dimension 64"):
        layer(torch.randn(2, width))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_linear_planned_path_checks_indices(backend):
    layer = sk.SparseLinear(_bsr())
    with torch.no_grad():
        layer.col_indices[0] = -1
    with sk.use_backend(backend), pytest.raises(ValueError, match="col: entry 0 is -1, out of range 0..3"):
        layer(torch.randn(2, 64))


# -- SparseLinear.load_state_dict ------------------------------------------------------------


def _load_refused(layer, state, pattern):
    model = nn.Sequential(layer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=pattern):
        model.load_state_dict({f"0.{k}": v for k, v in state.items()})
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:  # nothing half-loaded
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("case", list(BAD_INDICES))
def test_load_state_dict_refuses_bad_bsr_indices(case):
    make, message = BAD_INDICES[case]
    layer = sk.SparseLinear(_bsr())
    state = dict(sk.SparseLinear(_bsr()).state_dict())
    state["crow_indices"], state["col_indices"] = make(
        sk.BlockSparseWeight(state["crow_indices"], state["col_indices"], state["blocks"], (32, 64))
    )
    name = message.split(":")[0]  # the op's name for it; the state dict key is <name>_indices
    _load_refused(layer, state, re.escape(message.replace(f"{name}:", f"0.{name}_indices:", 1)))


def test_load_state_dict_refuses_bad_bsr_indices_with_other_nnz():
    # A state dict with another block count resizes the layer: a bad one must not.
    layer = sk.SparseLinear(sk.BlockSparseWeight.from_dense(torch.randn(32, 64), block=(16, 16), sparsity=0.5))
    state = dict(sk.SparseLinear(_bsr()).state_dict())
    state["col_indices"] = state["col_indices"].clone()
    state["col_indices"][2] = 9
    _load_refused(layer, state, r"0\.col_indices: entry 2 is 9, out of range 0\.\.3")
    good = sk.SparseLinear(_bsr())
    layer.load_state_dict(good.state_dict())  # still loadable, resized to the good weight
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), good(x))


def test_load_state_dict_refuses_repeated_nm_indices():
    layer = sk.SparseLinear(_nm_parts(out=4, k=16))
    state = dict(sk.SparseLinear(_nm_parts(out=4, k=16)).state_dict())
    idx = torch.tensor([[0, 1] * 4] * 4)
    idx[2, 2:4] = torch.tensor([3, 3])  # row 2, group 1: the same position twice
    state["meta"] = pack_meta(idx, 4)
    _load_refused(layer, state, r"0\.meta: row 2, group 1 has indices \[3, 3\]")
