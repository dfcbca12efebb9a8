"""The on-disk side of measured dispatch: one JSON file of winners per device and version.

``~/.cache/sparsekern/dispatch-<device>-sk<version>-torch<version>.json`` (or under
``$SPARSEKERN_CACHE_DIR``) maps a bucket key (:func:`bucket_key`: op, dtype, shape bucket) to
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
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("sparsekern")

# Rows above this share one bucket: past ~512 rows every backend is in its GEMM regime.
ROW_BUCKET_CAP = 512

# -- shape buckets: the keys choices are stored under ------------------------------------------


def row_bucket(rows: int) -> str:
    """1, 2-4, 5-8, 9-16, ... up to ``ROW_BUCKET_CAP``, then one bucket for everything larger."""
    if rows <= 1:
        return "1"
    if rows <= 4:
        return "4"
    if rows > ROW_BUCKET_CAP:
        return f"{ROW_BUCKET_CAP + 1}+"
    return str(1 << (rows - 1).bit_length())


def _nm_bucket(x, values, meta, n, m, bias=None) -> str:
    return f"r{row_bucket(x.shape[0])}|w{values.shape[0]}x{values.shape[1] // n * m}|{n}:{m}"


def _bsr_bucket(x, crow, col, blocks, bias=None) -> str:
    nnz, bm, bk = blocks.shape
    block_rows, block_cols = crow.numel() - 1, x.shape[-1] // bk
    # Density in 5% steps: which backend wins depends on it, not on the exact block count.
    density = round(20 * nnz / max(1, block_rows * block_cols)) / 20
    return f"r{row_bucket(x.shape[0])}|w{block_rows * bm}x{x.shape[-1]}|b{bm}x{bk}|d{density:.2f}"


def _attention_bucket(q, k, *rest) -> str:
    b, h, sq, d = q.shape
    kept = rest[1].shape[-1] if len(rest) >= 2 and isinstance(rest[1], torch.Tensor) else k.shape[2]
    flags = "|".join(str(a) for a in rest if isinstance(a, bool))
    return f"bh{b * h}|q{row_bucket(sq)}|k{row_bucket(k.shape[2])}|kept{row_bucket(kept)}|d{d}|{flags}"


_BUCKETS: dict[str, Callable[..., str]] = {
    "nm_linear": _nm_bucket,
    "bsr_linear": _bsr_bucket,
    "token_scores": _attention_bucket,
    "pruned_attention": _attention_bucket,
}


def _generic_bucket(*args) -> str:
    return "|".join("x".join(row_bucket(s) for s in a.shape) for a in args if isinstance(a, torch.Tensor))


def bucket_key(op: str, *args) -> str:
    """Cache key of ``args`` for ``op``: op, dtype and shape bucket (the device picks the file)."""
    first = next(a for a in args if isinstance(a, torch.Tensor))
    return f"{op}|{str(first.dtype).removeprefix('torch.')}|{_BUCKETS.get(op, _generic_bucket)(*args)}"


# -- the files -----------------------------------------------------------------------------------

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
