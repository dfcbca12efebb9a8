"""The runner behind ``sparsekern bench``: layer, attention and model suites, roofline, plots.

``sparsekern.bench.run(suites=("layer", "attention"), quick=True, device="cpu", out="sparsekern_results")``
returns the results dict that is also written as JSON (see :mod:`sparsekern.bench.runner`).
"""

from __future__ import annotations


def run(*args, **kwargs):
    """See :func:`sparsekern.bench.runner.run` (imported lazily: it pulls rich and matplotlib)."""
    from sparsekern.bench.runner import run as _run

    return _run(*args, **kwargs)


def load(path):
    """A results JSON written by :func:`run`."""
    from sparsekern.bench.runner import load as _load

    return _load(path)


__all__ = ["load", "run"]
