"""Build ``sparsekern._C`` with its CUDA sources on a lent GPU machine, without pip.

    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 bench/gpu_build.py

The GPU machine has its own torch (a CUDA build) and setuptools, and no network: ``pip install -e``
may not work there. This compiles the same sources with the same flags as setup.py through
torch's JIT builder (ninja), then copies the library to ``sparsekern/_C<suffix>`` and links
``sparsekern/kernels`` to ``kernels/`` (what setup.py's package_dir does for an install), so the
work tree imports as an installed package with ``PYTHONPATH=.``.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig
import time

from torch.utils.cpp_extension import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["-O3", "-std=c++17", "-DSPARSEKERN_TORCH"]  # setup.py's, which also adds -fopenmp for C++


def main() -> None:
    os.chdir(ROOT)
    build = os.environ.get("SPARSEKERN_GPU_BUILD_DIR", "/tmp/sparsekern-gpu-build")
    os.makedirs(build, exist_ok=True)
    sources = ["csrc/module.cpp", *sorted(glob.glob("csrc/cpu/*.cpp")), *sorted(glob.glob("csrc/cuda/*.cu"))]
    t0 = time.perf_counter()
    load(
        name="_C",
        sources=sources,
        extra_cflags=[*FLAGS, "-fopenmp"],
        extra_cuda_cflags=[*FLAGS, "-lineinfo"],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        build_directory=build,
        is_python_module=False,
        verbose=True,
    )
    target = os.path.join("sparsekern", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    shutil.copy(os.path.join(build, "_C.so"), target + ".new")
    os.replace(target + ".new", target)
    link = os.path.join("sparsekern", "kernels")
    if not os.path.exists(link):
        os.symlink(os.path.join("..", "kernels"), link)
    print(f"gpu_build: {len(sources)} sources -> {target} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
