"""Builds sparsekern and its optional compiled extension ``sparsekern._C``.

- CPU sources (``csrc/module.cpp``, ``csrc/cpu/*.cpp``) always, with OpenMP.
- CUDA sources (``csrc/cuda/*.cu``) only when torch is a CUDA build and nvcc is on PATH.
- ``SPARSEKERN_SKIP_BUILD=1``: pure Python (every op runs on the reference path).
- ``SPARSEKERN_SKIP_CUDA_BUILD=1``: CPU sources only.

Install with ``pip install -e . --no-build-isolation``: an isolated build would pull a multi-GB
CUDA torch into the build environment.
"""

import glob
import os
import shutil
import sys

from setuptools import setup


def _extensions():
    if os.environ.get("SPARSEKERN_SKIP_BUILD") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("sparsekern: torch not importable at build time; building pure Python", file=sys.stderr)
        return [], {}
    sources = ["csrc/module.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -g1 (line tables, for perf annotate) after Python's -g: full debug info of the AVX-512 kernels'
    # template instances took 2.3x the compile time (nm_linear_avx512_f32.cpp on a Zen 3: 235 s
    # with -g, 111 s with -g1), a third of `make test` on a fresh clone.
    cxx = ["-O3", "-g1", "-std=c++17", "-fopenmp", "-DSPARSEKERN_TORCH"]
    args = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"], include_dirs=[os.path.abspath("csrc")])
    cu = sorted(glob.glob("csrc/cuda/*.cu"))
    want_cuda = os.environ.get("SPARSEKERN_SKIP_CUDA_BUILD") != "1" and torch.version.cuda and shutil.which("nvcc")
    if want_cuda and cu:
        # Arch list comes from TORCH_CUDA_ARCH_LIST (or the visible GPU); never a hard-coded -arch.
        args["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++17", "-lineinfo", "-DSPARSEKERN_TORCH"]
        ext = CUDAExtension("sparsekern._C", sources + cu, **args)
    else:
        ext = CppExtension("sparsekern._C", sources, **args)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=[
        "sparsekern",
        "sparsekern.backends",
        "sparsekern.bench",
        "sparsekern.formats",
        "sparsekern.hf",
        "sparsekern.lean",
        "sparsekern.nn",
        "sparsekern.prune",
        "sparsekern.serve",
        "sparsekern.vllm",
        "sparsekern.kernels",
    ],
    package_dir={"sparsekern": "sparsekern", "sparsekern.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
