"""The on-disk side of measured dispatch: one JSON file of winners per device and version.

``~/.cache/sparsekern/dispatch-<device>-sk<version>-torch<version>.json`` (or under
``$SPARSEKERN_CACHE_DIR``) maps a bucket key (see :func:`sparsekern.dispatch.bucket_key`) to
``{"backend": name, "times_ms": {...}}``. Files are replaced atomically and merged with what
other processes wrote meanwhile; a missing, partial or corrupt file counts as empty. Everything
here is guarded by :data:`lock`, which :mod:`sparsekern.dispatch` also holds while it measures.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("sparsekern")

lock = threading.RLock()
_memory: dict[Path, dict[str, dict]] = {}  # cache file -> key -> {"backend", "times_ms"}
_device_names: dict[str, str] = {}
_paths: dict[tuple[str, str], Path] = {}


def device_name(device: torch.device) -> str:
    """Human name of a device ("NVIDIA H100 80GB HBM3", the CPU model), cached."""
    key = str(device)
    if key not in _device_names:
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
        else:
            name = platform.processor() or platform.machine()
            with contextlib.suppress(OSError):
                for line in Path("/proc/cpuinfo").read_text().splitlines():
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        _device_names[key] = f"{device.type}:{name}"
    return _device_names[key]


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSEKERN_CACHE_DIR") or Path.home() / ".cache" / "sparsekern")


def cache_path(device: torch.device) -> Path:
    """The JSON file holding the winners for ``device`` with this sparsekern and torch."""
    key = (str(device), os.environ.get("SPARSEKERN_CACHE_DIR", ""))
    path = _paths.get(key)
    if path is None:
        import sparsekern

        slug = re.sub(r"[^A-Za-z0-9.]+", "-", device_name(device)).strip("-")
        path = _paths[key] = cache_dir() / f"dispatch-{slug}-sk{sparsekern.__version__}-torch{torch.__version__}.json"
    return path


def _read(path: Path) -> dict[str, dict]:
    """Entries of a cache file; a missing, partial or corrupt file counts as empty."""
    try:
        data = json.loads(path.read_text())
        entries = data["entries"]
        return {k: v for k, v in entries.items() if isinstance(v, dict) and isinstance(v.get("backend"), str)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("sparsekern: ignoring unreadable dispatch cache %s (%s); it will be rewritten", path, exc)
        return {}


def entries(path: Path) -> dict[str, dict]:
    """The choices for ``path`` as this process knows them (read from disk on first use)."""
    with lock:
        if path not in _memory:
            _memory[path] = _read(path)
        return _memory[path]


def write(path: Path, device: torch.device) -> None:
    """Merge with what other processes wrote meanwhile, then replace the file atomically."""
    with lock:
        merged = {**_read(path), **_memory.get(path, {})}
        _memory[path] = merged
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"device": device_name(device), "torch": torch.__version__, "entries": merged}, f, indent=1)
            os.replace(tmp, path)
        except OSError as exc:  # read-only home, full disk: keep the in-memory choice
            log.info("sparsekern: could not write dispatch cache %s: %s", path, exc)
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)


def forget(disk: bool = False) -> None:
    """Drop the in-memory choices (with ``disk`` also delete the cache files)."""
    with lock:
        paths = list(_memory)
        _memory.clear()
        if disk:
            for p in set(paths) | set(cache_dir().glob("dispatch-*.json")):
                with contextlib.suppress(OSError):
                    p.unlink()
