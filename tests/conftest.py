"""Shared test helpers. Every kernel output is poisoned (NaN) before the kernel writes it."""

import dataclasses
import os
import zlib

os.environ.setdefault("SPARSEKERN_POISON_OUTPUTS", "1")
# "auto" takes the first backend in AUTO_ORDER (no timing, deterministic) and never writes the
# user's dispatch cache; tests/test_dispatch.py switches the measured policy on where it tests it.
os.environ.setdefault("SPARSEKERN_DISPATCH", "first")
os.environ.setdefault(
    "SPARSEKERN_CACHE_DIR", os.path.join(__import__("tempfile").gettempdir(), f"sparsekern-test-cache-{os.getpid()}")
)

import jobs  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import sparsekern  # noqa: E402
import sparsekern.dispatch  # noqa: E402
import sparsekern.dispatch_cache  # noqa: E402
from sparsekern import _extension  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Unit roundoff per dtype: one rounding of a value v to the dtype moves it by at most U * |v|.
U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Per-element bound (assert_matches_reference): TORCH_K * torch's own error at that element,
# plus one rounding of the reference to the output dtype, plus FLOOR * the magnitude scale.
TORCH_K = 2
# Floor per dtype, relative to the magnitude scale (the element's sum |x|*|w| when the caller
# passes it, else max |ref|): fp32 accumulation in another order (kernels and torch both sum in
# fp32, so it is the same small term for every dtype, but fp32 outputs have no rounding term to
# hide it). NOTE: dropping one product |x*w| ~ 0.45 (the median for N(0,1) inputs) from one
# output of the tests/test_cpu_linear.py shapes (max |ref| ~ 20-60) must stay above the bound:
# tests/test_tolerance.py plants exactly that in every dtype.
FLOOR = {torch.float32: 2.0**-16, torch.float16: 2.0**-16, torch.bfloat16: 2.0**-12}


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random inputs per test, reproducible per test id (crc32: str hash() is salted per
    # process); SPARSEKERN_TEST_SEED shifts every seed to explore other inputs.
    salt = int(os.environ.get("SPARSEKERN_TEST_SEED", "0"))
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) + salt) % (2**31))


def matches_reference_bound(
    ref32: torch.Tensor, same_dtype: torch.Tensor, magnitude=None, rounded_terms: bool = False
) -> torch.Tensor:
    """Per-element fp32 bound on ``|out - ref32|`` for an output in ``same_dtype.dtype``.

    ``TORCH_K * |same_dtype - ref32|`` (torch's own error at that element, in that dtype)
    ``+ U[dtype] * |ref32|`` (one rounding to the output dtype: torch's error at an element can be
    0 by chance, and a correct kernel then still rounds, possibly to the other neighbour)
    ``+ FLOOR[dtype] * magnitude`` (fp32 accumulation order; ``magnitude`` is the element's
    sum of |terms|, e.g. ``F.linear(x.abs(), w.abs())``, or by default the scalar max |ref32|).

    ``rounded_terms``: the kernel rounds every term to the output dtype before the fp32 sum, as
    flash attention does with P before P @ V (torch's fp32-internal math does not, so its error
    says nothing about that): each term may then be off by ``U[dtype] * |term|``, and the floor
    is ``U[dtype] * magnitude`` (pass the sum of |terms|, e.g. attention over ``v.abs()``).
    """
    dtype = same_dtype.dtype
    ref = ref32.float()
    torch_err = (same_dtype.float() - ref).abs().nan_to_num(0.0)
    mag = ref.abs().amax() if magnitude is None else magnitude.float().abs()
    if ref.numel() == 0:
        mag = torch.zeros(())
    floor = U[dtype] if rounded_terms else FLOOR[dtype]
    return TORCH_K * torch_err + U[dtype] * ref.abs() + floor * mag


def assert_matches_reference(
    out: torch.Tensor,
    ref32: torch.Tensor,
    same_dtype: torch.Tensor,
    what: str = "",
    magnitude=None,
    rounded_terms: bool = False,
) -> None:
    """Every element of ``out`` within :func:`matches_reference_bound` of the fp32 reference.

    ``ref32`` is the fp32 reference; ``same_dtype`` is what plain torch computes in ``out``'s
    dtype for the same inputs. Per element, not scaled by the largest output: one wrong element
    of a small magnitude fails even when the output holds large values elsewhere.
    """
    assert out.shape == ref32.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    assert out.dtype == same_dtype.dtype, f"{what}: dtype {out.dtype} != {same_dtype.dtype}"
    assert not torch.isnan(out).any(), f"{what}: output has NaN (unwritten elements?)"
    err = (out.float() - ref32.float()).abs()
    bound = matches_reference_bound(ref32, same_dtype, magnitude, rounded_terms)
    bad = err > bound
    if bad.any():
        i = int((err - bound).flatten().argmax())
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), err.shape))
        torch_err = (same_dtype.float() - ref32.float()).abs()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements out of bound; worst at {idx}: "
            f"|out - ref| {err[idx]:.3g} > bound {bound[idx]:.3g} (ref {ref32[idx]:.4g}, out {out[idx]:.4g}, "
            f"torch's own error {torch_err[idx]:.3g})"
        )


def triton_quant_weight(wq, rows: int) -> torch.Tensor:
    """A quantized weight as the Triton kernels multiply it, dense float64: the yardstick of their
    tests. Rounded once to x's dtype (``to_dense()``, the reference op's weight) where the kernel
    feeds dequantized tiles to ``tl.dot`` (N:M above ``GEMV_MAX_ROWS`` rows; BSR unless
    ``scales_after_dot``); dequantized in fp32 where it does not (the N:M gemv; BSR blocks that go
    to ``tl.dot`` as integers, scaled after it)."""
    from sparsekern.kernels.nm_linear import GEMV_MAX_ROWS

    if isinstance(wq, sparsekern.NMSparseWeight):
        if rows > GEMV_MAX_ROWS:
            return wq.to_dense().double()
        return dataclasses.replace(wq, scales=wq.scales.float(), act_block=0).to_dense().double()
    from sparsekern.kernels.bsr_linear import scales_after_dot

    bk = wq.block[1]
    if not scales_after_dot(4 if wq.quant == "int4" else 8, bk // wq.scales.shape[-1], bk):
        return wq.to_dense().double()
    return dataclasses.replace(wq, scales=wq.scales.float()).to_dense().double()


def triton_quant_yardsticks(x: torch.Tensor, wq, bias) -> tuple:
    """For :func:`assert_matches_reference` on a Triton kernel with the quantized weight ``wq``
    (no int8 activations): ``(ref, same, magnitude)``, the float64 product of
    :func:`triton_quant_weight`, torch in x's dtype on the op's weight (``to_dense()``: rounded once
    to the scales' dtype), and each element's sum of |terms|."""
    dense = triton_quant_weight(wq, x.shape[0])
    b64 = None if bias is None else bias.double()
    ref = torch.nn.functional.linear(x.double(), dense, b64)
    same = torch.nn.functional.linear(x, wq.to_dense(), bias)
    mag = torch.nn.functional.linear(x.double().abs(), dense.abs(), None if bias is None else b64.abs())
    return ref, same, mag


def assert_matches_dense(out: torch.Tensor, x: torch.Tensor, dense32: torch.Tensor, bias, what: str = "") -> None:
    """``out`` against ``x @ dense32.T + bias`` in fp32 (``dense32``: the weight as the kernels see
    it, e.g. dequantized from fp32 scales), with :func:`assert_matches_reference`'s per-element
    bound on the magnitudes ``|x| @ |W|.T + |bias|``."""
    b32 = None if bias is None else bias.float()
    ref32 = torch.nn.functional.linear(x.float(), dense32, b32)
    same = torch.nn.functional.linear(x, dense32.to(x.dtype), bias)
    mag = torch.nn.functional.linear(x.float().abs(), dense32.abs(), None if bias is None else b32.abs())
    assert_matches_reference(out, ref32, same, what, magnitude=mag)


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Measured policy, a private cache dir, and a registry we may change (restored after)."""
    monkeypatch.setenv("SPARSEKERN_DISPATCH", "measured")
    monkeypatch.setenv("SPARSEKERN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    monkeypatch.setattr(
        sparsekern.dispatch, "_registry", {op: dict(impls) for op, impls in sparsekern.dispatch._registry.items()}
    )
    monkeypatch.setattr(sparsekern.dispatch_cache, "_memory", {})
    monkeypatch.setattr(sparsekern.dispatch, "_chosen", {})
    sparsekern.dispatch._invalidate()  # choices remembered by SparseLinear plans, too
    yield tmp_path
    sparsekern.dispatch._invalidate()


ISAS = _extension.CPU_ISAS
_detected_isa = _extension.detected_cpu_isa


# Levels above the CPU's are not generated at all: on an AVX2 machine their cases were half the
# suite's items (15 000 skips, ~45 s of a 2-core Zen 3's CI). The header says which were left out.
RUNNABLE_ISAS = [name for name, level in ISAS.items() if level <= _detected_isa()]


def pytest_configure(config):
    config.addinivalue_line("markers", "job(key): the test asserts on a subprocess job of tests/jobs.py")


def pytest_collection_finish(session):
    # The subprocess jobs (tests/jobs.py) of the tests that will run: only those are started.
    jobs.select({m.args[0] for item in session.items for m in item.iter_markers("job")})


def pytest_report_header(config):
    absent = [name for name in ISAS if name not in RUNNABLE_ISAS]
    return f"sparsekern CPU ISA levels tested: {', '.join(RUNNABLE_ISAS)}" + (
        f"; not on this CPU, not generated: {', '.join(absent)}" if absent else ""
    )


@pytest.fixture(params=RUNNABLE_ISAS)
def isa(request, monkeypatch):
    """Each CPU instruction-set level this CPU has, set through SPARSEKERN_CPU_ISA (a test module
    may define its own ``isa`` with fewer levels)."""
    want = ISAS[request.param]
    monkeypatch.setenv("SPARSEKERN_CPU_ISA", request.param)
    assert int(torch.ops.sparsekern._cpu_isa()) == want
    return request.param


@pytest.fixture
def no_host_scan(monkeypatch):
    """For nonfinite_exact backends (Triton): the public op must not call all_finite(), a host
    sync per call on a GPU."""
    import sparsekern.plan

    def fail(x):
        raise AssertionError("all_finite() called: a host sync per call")

    monkeypatch.setattr(sparsekern.plan, "all_finite", fail)


def only_backends(op, *backends):
    """Keep just these registered backends of ``op`` (the real CPU kernel would compete)."""
    sparsekern.dispatch._registry[op] = {b: i for b, i in sparsekern.dispatch._registry[op].items() if b in backends}
