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
