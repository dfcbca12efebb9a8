"""The repository keeps its promises about itself: pinned installs, and docs that exist."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[\[<>=!~; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: expected NAME==VERSION, got {line!r}"
            pins[_name(name)] = version
    return pins


def test_every_dependency_is_pinned():
    # A range that admits a newer release lets a fresh machine install something CI never ran.
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"]) + [r for extra in meta["optional-dependencies"].values() for r in extra]
    pins = _pins()
    missing = sorted({_name(r) for r in reqs} - set(pins))
    assert not missing, f"constraints.txt: no exact version for {missing}"
    assert pins["torch"] == "2.13.0", "torch must stay the CPU build on local disk (a newer one pulls CUDA)"


def test_makefile_installs_from_the_constraints():
    make = (ROOT / "Makefile").read_text()
    assert "-c $(CONSTRAINTS)" in make and "CONSTRAINTS := constraints.txt" in make


def test_design_doc_referenced_where_it_is():
    assert (ROOT / "docs" / "DESIGN.md").is_file()
    files = [ROOT / "README.md", *(ROOT / "sparsekern").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]
    stale = [str(f.relative_to(ROOT)) for f in files if re.search(r"(?<!docs/)\bDESIGN\.md", f.read_text())]
    assert not stale, f"these point to a DESIGN.md that is not in the repository (use docs/DESIGN.md): {stale}"


def test_setup_ships_every_subpackage():
    # An editable install works without the list; a wheel built from it would not.
    listed = set(re.findall(r'"(sparsekern(?:\.\w+)*)"', (ROOT / "setup.py").read_text()))
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "sparsekern").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found <= listed, f"setup.py packages: missing {sorted(found - listed)}"


def test_gpu_build_compiles_what_setup_compiles():
    """bench/gpu_build.py (the lent GPU machine's build, without pip) globs the same sources and
    passes the same flags as setup.py, so the GPU runs test the extension users build."""
    setup, build = (ROOT / "setup.py").read_text(), (ROOT / "bench" / "gpu_build.py").read_text()
    for glob in ('"csrc/module.cpp"', '"csrc/cpu/*.cpp"', '"csrc/cuda/*.cu"'):
        assert glob in setup and glob in build, glob
    for flag in ('"-O3"', '"-std=c++17"', '"-DSPARSEKERN_TORCH"', '"-fopenmp"', '"-lineinfo"'):
        assert flag in setup and flag in build, flag


def test_gpu_session_script_parses():
    import subprocess

    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_session.sh")], check=True)
