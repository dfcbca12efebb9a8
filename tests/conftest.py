"""Shared test helpers. Every kernel output is poisoned (NaN) before the kernel writes it."""

import os
import zlib

os.environ.setdefault("SPARSEKERN_POISON_OUTPUTS", "1")
# "auto" takes the first backend in AUTO_ORDER (no timing, deterministic) and never writes the
# user's dispatch cache; tests/test_dispatch.py switches the measured policy on where it tests it.
os.environ.setdefault("SPARSEKERN_DISPATCH", "first")
os.environ.setdefault(
    "SPARSEKERN_CACHE_DIR", os.path.join(__import__("tempfile").gettempdir(), f"sparsekern-test-cache-{os.getpid()}")
)

import pytest  # noqa: E402
import torch  # noqa: E402

import sparsekern  # noqa: E402
import sparsekern.dispatch  # noqa: E402
import sparsekern.dispatch_cache  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Floor of the tolerance per dtype (absolute, on outputs of O(1) magnitude); the main bound is
# relative to torch's own error in the same dtype (see assert_matches_reference).
ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random inputs per test, reproducible per test id (crc32: str hash() is salted per
    # process); SPARSEKERN_TEST_SEED shifts every seed to explore other inputs.
    salt = int(os.environ.get("SPARSEKERN_TEST_SEED", "0"))
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) + salt) % (2**31))


def assert_matches_reference(out: torch.Tensor, ref32: torch.Tensor, same_dtype: torch.Tensor, what: str = "") -> None:
    """flash-attention rule: err(ours vs fp32 ref) <= 2 * err(torch in this dtype) + floor.

    ``ref32`` is the fp32 reference; ``same_dtype`` is what plain torch computes in ``out``'s
    dtype for the same inputs.
    """
    assert out.shape == ref32.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    assert out.dtype == same_dtype.dtype, f"{what}: dtype {out.dtype} != {same_dtype.dtype}"
    assert not torch.isnan(out).any(), f"{what}: output has NaN (unwritten elements?)"
    err = (out.float() - ref32.float()).abs().max().item()
    torch_err = (same_dtype.float() - ref32.float()).abs().max().item()
    scale = max(1.0, ref32.abs().max().item())
    bound = 2 * torch_err + ATOL[out.dtype] * scale
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (torch's own error {torch_err:.3g})"


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


def only_backends(op, *backends):
    """Keep just these registered backends of ``op`` (the real CPU kernel would compete)."""
    sparsekern.dispatch._registry[op] = {b: i for b, i in sparsekern.dispatch._registry[op].items() if b in backends}
