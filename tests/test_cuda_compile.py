"""CUDA 2:4 backend checks that need no GPU.

Split of the nvcc checks (each done once): ctest (cmake/cuda_checks.cmake, `make cpp-test`)
compiles the torch-free kernels csrc/cuda/*.cu for sm_80 and sm_90a and asserts HMMA.SP in the
SASS and no spills; this file compiles the torch wrapper csrc/cuda/nm24_mma_op.cu against torch's
headers (the part ctest cannot build without libtorch) and checks the Python side on CPU.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jobs
import pytest
import torch

import sparsekern
from sparsekern import dispatch, info
from sparsekern.backends import cuda as cuda_backend
from sparsekern.formats import sm80

ROOT = Path(__file__).resolve().parents[1]


def test_registered_off_by_default():
    impl = dispatch.implementations("nm_linear")["cuda"]
    assert impl.auto is False
    assert "cuda (off by default)" in info.gather()["backends.nm_linear"]


def test_supports_reasons_on_cpu():
    x = torch.randn(3, 64, dtype=torch.float16)
    w = sparsekern.NMSparseWeight.from_dense(torch.randn(8, 64, dtype=torch.float16), prune=True)
    assert "CUDA" in cuda_backend.supports(x, w.values, w.meta, 2, 4)
    assert "2:4" in cuda_backend.supports(x, w.values, w.meta, 1, 4)
    if not torch.cuda.is_available():
        assert not cuda_backend.has_kernel()
    with pytest.raises(ValueError, match="cuda"), sparsekern.use_backend("cuda"):
        sparsekern.ops.nm_linear(x, w)


def test_fake_impl_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 100, dtype=torch.bfloat16)
        v = torch.empty(128, 64, dtype=torch.bfloat16)
        e = torch.empty(4, 128, dtype=torch.int32)
        y = torch.ops.sparsekern._nm24_mma(x, v, e, 37)
    assert y.shape == (5, 37) and y.dtype == torch.bfloat16


def test_hw_cache_follows_in_place_updates():
    w = sparsekern.NMSparseWeight.from_dense(torch.randn(40, 64, dtype=torch.float16), prune=True)
    first = cuda_backend.hw_weight(w.values, w.meta)
    assert cuda_backend.hw_weight(w.values, w.meta) is first
    with torch.no_grad():
        w.values.mul_(2)
    again = cuda_backend.hw_weight(w.values, w.meta)
    assert again is not first and torch.equal(again[0][:40, :32], w.values)
    assert torch.equal(again[1], sm80.hw_layout(w)[1])


def _compile_torch_wrapper():
    """nvcc -c of the torch wrapper against torch's headers: (exit code, stderr, bytes of op.o)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The CPU wheel ships c10/cuda headers but not their generated config header; an empty one
        # is enough to compile (not link) the wrapper.
        shim = tmp / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
        inc = Path(torch.__file__).parent / "include"
        cmd = [
            "nvcc", "-c", "-arch=sm_80", "-O0", "-std=c++17", "-DSPARSEKERN_TORCH",
            "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
            f"-I{ROOT / 'csrc'}", f"-I{inc}", f"-I{inc / 'torch/csrc/api/include'}", f"-I{tmp / 'shim'}",
            "-Xcompiler", "-fPIC", "-diag-suppress", "3306",
            "-o", str(tmp / "op.o"), str(ROOT / "csrc/cuda/nm24_mma_op.cu"),
        ]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, timeout=300)
        size = (tmp / "op.o").stat().st_size if (tmp / "op.o").exists() else 0
        return res.returncode, res.stderr, size


# ~45 s of one core (nvcc parses the torch headers for host and device): a job of tests/jobs.py,
# run beside the other single-threaded ones.
if shutil.which("nvcc"):
    jobs.register("nvcc torch wrapper", _compile_torch_wrapper, cost=45)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.job("nvcc torch wrapper")
def test_torch_wrapper_compiles():
    returncode, stderr, size = jobs.result("nvcc torch wrapper")
    assert returncode == 0, stderr[-4000:]
    assert size > 0
