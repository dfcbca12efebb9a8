"""Ahead-of-time compilation of Triton kernels for real GPUs, on a machine without one.

``compile_for`` runs Triton's whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) for a
``GPUTarget`` and reports what a launch would: the assembly of every stage, registers per
thread, spilled bytes and shared memory per program. Registers and spills come from ``ptxas -v``
(Triton's own copy) because Triton only learns them when it loads the cubin on a device.

Triton fixes interpreter-or-compiler per process at ``import triton`` (kernels/_common.py), so
compile checks run in a subprocess without ``TRITON_INTERPRET``: see :func:`run_script`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

PTX_ARCH = {80: "sm_80", 90: "sm_90a"}


@dataclass
class Compiled:
    name: str
    cc: int
    num_warps: int
    num_stages: int
    n_regs: int
    n_spills: int  # bytes of spill stores + spill loads reported by ptxas
    shared: int  # bytes of shared memory per program
    asm: dict = field(repr=False, default_factory=dict)

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "asm"}


def _ptxas(cc: int) -> str:
    """The ptxas Triton itself uses for this target (a newer one for sm_90 and up)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(cc).path


def ptxas_usage(ptx: str, cc: int) -> tuple[int, int]:
    """(registers per thread, spill bytes) of the kernel in ``ptx``, from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [_ptxas(cc), f"-arch={PTX_ARCH[cc]}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        )
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas -arch={PTX_ARCH[cc]} failed:\n{log[-4000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    if regs is None:
        raise RuntimeError(f"ptxas -v printed no register count:\n{log}")
    spills = (int(stores.group(1)) if stores else 0) + (int(loads.group(1)) if loads else 0)
    return int(regs.group(1)), spills


def signature_of(kernel_fn, pointers: dict[str, str], constexprs: dict, ints: str = "i32") -> dict[str, str]:
    """Triton signature: ``pointers`` maps pointer args to ``"*bf16"`` etc., constexprs are marked."""
    sig = {}
    for name in kernel_fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = ints
    return sig


def compile_for(
    kernel_fn,
    signature: dict[str, str],
    constexprs: dict,
    cc: int,
    num_warps: int = 4,
    num_stages: int = 3,
    aligned: tuple[str, ...] = (),
) -> Compiled:
    """Compile ``kernel_fn`` (a ``@triton.jit`` JITFunction) for ``sm_<cc>``.

    ``aligned`` names arguments Triton may treat as divisible by 16, as its JIT does for 16-byte
    aligned pointers and for strides that are multiples of 16 (needed for vectorised loads).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(kernel_fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(kernel_fn, signature, constexprs, attrs)
    kernel = triton.compile(
        src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    regs, spills = ptxas_usage(kernel.asm["ptx"], cc)
    return Compiled(
        kernel_fn.__name__, cc, num_warps, num_stages, regs, spills, int(kernel.metadata.shared), dict(kernel.asm)
    )


def run_script(path: str, shards: int = 1, timeout: float = 600) -> list[dict]:
    """Run ``python path SHARD SHARDS`` for each shard at once, with Triton in compile mode.

    Each process prints one JSON object per line; the lines of all shards are returned.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    procs = [
        subprocess.Popen(
            [sys.executable, path, str(i), str(shards)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(shards)
    ]
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{path} failed (exit {p.returncode}):\n{out[-4000:]}\n{err[-8000:]}")
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows


def interpreter_process() -> bool:
    """Whether Triton interprets in this process: ``TRITON_INTERPRET=1`` set before the first
    ``import triton`` (test files that need it rerun themselves in a subprocess otherwise)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    tl = sys.modules.get("triton.language")
    return tl is None or type(tl.cdiv).__name__ == "InterpretedFunction"


def interpreter_suite_test(path: str, cost: float, timeout: float = 900):
    """A test that runs the test file ``path`` in a process where Triton interprets and fails with
    its output if it fails: a job of tests/jobs.py (single-threaded, run beside the others).
    ``cost``: its seconds here, for the order of the jobs."""
    import jobs
    import pytest

    key = f"Triton interpreter suite {os.path.basename(path)}"
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", path]
    jobs.register(key, lambda: jobs.python_subprocess(args, env=env, cwd=root, timeout=timeout), cost)

    @pytest.mark.job(key)
    def test_interpreter_suite_in_subprocess():
        res = jobs.result(key)
        tail = res.stdout.strip().splitlines()[-1:] or ["(no output)"]
        print(f"\ninterpreter suite: {tail[0]}")
        assert res.returncode == 0, f"interpreter suite failed:\n{res.stdout[-8000:]}\n{res.stderr[-4000:]}"

    test_interpreter_suite_in_subprocess.__doc__ = f"{os.path.basename(path)}'s tests, where Triton interprets."
    return test_interpreter_suite_in_subprocess


def tensor_core_problems(rows: list[dict]) -> list[str]:
    """What is wrong with compiled rows (``run_script`` output carrying ``label``, ``cc``,
    ``n_spills``, ``mma_sync``, ``wgmma``, ``expect``): spills, no ``mma.sync`` on sm_80, no
    ``wgmma`` on sm_90 where ``expect`` says so, no tensor-core instruction at all on sm_90."""
    bad = [f"{r['label']} sm_{r['cc']}: {r['n_spills']} B spilled" for r in rows if r["n_spills"]]
    bad += [f"{r['label']} sm_80: no mma.sync" for r in rows if r["cc"] == 80 and not r["mma_sync"]]
    bad += [
        f"{r['label']} sm_90: no wgmma" for r in rows if r["cc"] == 90 and r["expect"] == "wgmma" and not r["wgmma"]
    ]
    bad += [
        f"{r['label']} sm_90: no tensor-core instruction"
        for r in rows
        if r["cc"] == 90 and not (r["mma_sync"] or r["wgmma"])
    ]
    return bad


def gpu_skip_reason() -> str | None:
    """Why the Triton tests in tests/gpu cannot run in this process, or None when they can."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    tl = sys.modules.get("triton.language")
    if os.environ.get("TRITON_INTERPRET") == "1" or (
        tl is not None and type(tl.cdiv).__name__ == "InterpretedFunction"
    ):
        return "Triton is in interpreter mode in this process; run tests/gpu without TRITON_INTERPRET=1"
    return None
