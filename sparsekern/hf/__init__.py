"""Transformers integration: after ``import sparsekern``, ``from_pretrained`` reads sparsekern folders.

Importing transformers' quantizer registry costs ~4 s, so ``import sparsekern`` does not do it:
:func:`install` registers at once when transformers has already loaded its registry, and
otherwise leaves a finder on ``sys.meta_path`` that registers right after
``transformers.quantizers.auto`` executes (``from_pretrained`` imports it before reading any
``quantization_config``). The finder removes itself once it has fired.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

METHOD = "sparsekern"  # quant_method in config.json
_TARGET = "transformers.quantizers.auto"
_log = logging.getLogger("sparsekern")


def register() -> None:
    """Register ``quant_method: "sparsekern"`` with transformers now (imports transformers)."""
    from sparsekern.hf.quantizer import register as _register

    _register()


def install() -> None:
    """Register now if transformers' registry is loaded, else when it is. Cheap; idempotent."""
    if _TARGET in sys.modules:
        _safe_register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def _safe_register() -> None:
    # A transformers release that changed the quantizer API must not break `import transformers`.
    try:
        register()
    except Exception as exc:  # noqa: BLE001
        _log.warning("sparsekern: could not register with transformers (%s: %s)", type(exc).__name__, exc)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfter(spec.loader)
        return spec


class _RegisterAfter(importlib.abc.Loader):
    """Delegates to the real loader, then registers once the module body has run."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        # Imported by register() itself (its quantizer module imports this one): it registers
        # once that import completes.
        if "sparsekern.hf.quantizer" not in sys.modules:
            _safe_register()

    def __getattr__(self, name):  # get_source, get_filename, ... for tools that ask the loader
        return getattr(self._loader, name)
