"""The CPU kernels on each team of the parallel runtime (csrc/cpu/parallel.h).

By default a call's chunks are shared with OpenMP's team while it is hot and with the kernels'
own pool otherwise, so which one a test ran on depends on timing. ``SPARSEKERN_PARALLEL``
(read once per process) pins one: here the real-shape tests (long K loops, many output tiles,
thread splits) and the thread-count tests run in a fresh process per team. The runtime's own
rules (every chunk once, exceptions, stalls, the automatic choice) are ctest's test_parallel.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsekern import _extension

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _extension.HAS_C_EXT, reason="compiled extension not loaded"),
]

TESTS = Path(__file__).parent


@pytest.mark.parametrize("team", ["pool", "openmp"])
def test_kernels_on_each_team(team):
    files = [str(TESTS / f) for f in ("test_real_shapes.py", "test_lean_head.py", "test_moe_grouped.py")]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "real_shapes or threads or matches", *files],
        env=dict(os.environ, SPARSEKERN_PARALLEL=team),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    tail = run.stdout[-3000:] + run.stderr[-2000:]
    assert run.returncode == 0, f"SPARSEKERN_PARALLEL={team}:\n{tail}"
    assert " passed" in run.stdout and " failed" not in run.stdout, tail


_BOUND_CHILD = r"""
import os, torch, sparsekern as sk
from sparsekern.formats import NMSparseWeight
w = torch.randn(1024, 1024)
w.view(1024, 256, 4)[..., :2] = 0
sk.ops.nm_linear(torch.randn(1, 1024), NMSparseWeight.from_dense(w, 2, 4))  # 2 threads: starts a helper
for tid in sorted(os.listdir("/proc/self/task")):
    name = open(f"/proc/self/task/{tid}/comm").read().strip()
    cpus = sorted(os.sched_getaffinity(int(tid)))
    print("THREAD", tid == str(os.getpid()), name, ",".join(map(str, cpus)))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_pool_helpers_take_the_openmp_places_cpus():
    """Where OpenMP binds its threads to places (as vLLM's CPU worker does), the caller is bound to
    one CPU; the pool's helpers must not inherit that mask (they would share the caller's core)."""
    a, b = sorted(os.sched_getaffinity(0))[:2]
    env = dict(
        os.environ, OMP_PLACES=f"{{{a}}},{{{b}}}", OMP_PROC_BIND="true", OMP_NUM_THREADS="2",
        SPARSEKERN_PARALLEL="pool",
    )  # fmt: skip
    run = subprocess.run([sys.executable, "-c", _BOUND_CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split()[1:] for line in run.stdout.splitlines() if line.startswith("THREAD")]
    main = [cpus for is_main, _, cpus in rows if is_main == "True"]
    helpers = [cpus for _, name, cpus in rows if name.startswith("sk-pool-")]
    assert main == [str(a)], f"OpenMP did not bind the caller to CPU {a}: {rows}"  # else this test proves nothing
    assert helpers, f"no pool helper thread started: {rows}"
    assert all(cpus == f"{a},{b}" for cpus in helpers), f"helpers' CPUs {helpers}, expected {a},{b}"
