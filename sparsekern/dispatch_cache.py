"""The on-disk side of measured dispatch: one JSON file of winners per device and build.

``~/.cache/sparsekern/dispatch-<device>-sk<version>-torch<version>-<build>-<isa>-t<threads>.json``
(or under ``$SPARSEKERN_CACHE_DIR``) maps a bucket key (:func:`bucket_key`: op, dtype, shape
bucket) to ``{"backend": name, "times_ms": {...}, "args": recipe}``. The file name carries
everything a timing depends on besides the shape: the compiled extension (a hash of its file),
the CPU ISA in use and the thread count, so a rebuilt kernel or another thread count never
reuses old answers. Writes take an exclusive ``flock`` on ``<file>.lock``, re-read the file,
merge the entries this process changed and replace the file atomically (temp file, fsync,
rename): concurrent processes lose no entries. A missing, partial or corrupt file counts as
empty. Everything here is guarded by :data:`lock`, which :mod:`sparsekern.dispatch` also holds
while it measures.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import platform
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from sparsekern.formats.bsr import block_width
from sparsekern.formats.quant import quant_of

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


def _nm_bucket(x, values, meta, n, m, bias=None, scales=None, zeros=None, group_size=0, act_block=0) -> str:
    key = f"r{row_bucket(x.shape[0])}|w{values.shape[0]}x{x.shape[-1]}|{n}:{m}"
    if scales is not None:  # quantized values: int8 / int4, the scale group, int8 activations
        key += f"|{quant_of(values)}g{group_size}" + (f"a{act_block}" if act_block else "")
    return key


def _nm_grouped_bucket(x, values, meta, offsets, n, m) -> str:
    # Rows in all and the expert count: with E experts, T rows give about T / E rows per expert.
    return f"r{row_bucket(x.shape[0])}|e{values.shape[0]}|w{values.shape[1]}x{x.shape[-1]}|{n}:{m}"


def _bsr_grouped_bucket(x, crow, col, blocks, offsets) -> str:
    # As _nm_grouped_bucket, with the experts' mean block density as in _bsr_bucket.
    nnz, bm, bk = blocks.shape
    e, block_rows, block_cols = crow.shape[0], crow.shape[1] - 1, x.shape[-1] // bk
    density = round(20 * nnz / max(1, e * block_rows * block_cols)) / 20
    return f"r{row_bucket(x.shape[0])}|e{e}|w{block_rows * bm}x{x.shape[-1]}|b{bm}x{bk}|d{density:.2f}"


def _bsr_bucket(x, crow, col, blocks, bias=None, scales=None, zeros=None) -> str:
    nnz, bm = blocks.shape[:2]
    bk = block_width(blocks)
    block_rows, block_cols = crow.numel() - 1, x.shape[-1] // bk
    # Density in 5% steps: which backend wins depends on it, not on the exact block count.
    density = round(20 * nnz / max(1, block_rows * block_cols)) / 20
    key = f"r{row_bucket(x.shape[0])}|w{block_rows * bm}x{x.shape[-1]}|b{bm}x{bk}|d{density:.2f}"
    if scales is not None:  # quantized blocks: int8 / int4 and the scale group
        key += f"|{quant_of(blocks)}g{bk // scales.shape[2]}"
    return key


def _attention_bucket(q, k, *rest) -> str:
    b, h, sq, d = q.shape
    kept = rest[1].shape[-1] if len(rest) >= 2 and isinstance(rest[1], torch.Tensor) else k.shape[2]
    flags = "|".join(str(a) for a in rest if isinstance(a, bool))
    return f"bh{b * h}|q{row_bucket(sq)}|k{row_bucket(k.shape[2])}|kept{row_bucket(kept)}|d{d}|{flags}"


_BUCKETS: dict[str, Callable[..., str]] = {
    "nm_linear": _nm_bucket,
    "bsr_linear": _bsr_bucket,
    "nm_grouped_linear": _nm_grouped_bucket,
    "bsr_grouped_linear": _bsr_grouped_bucket,
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
_paths: dict[tuple, Path] = {}
_identities: dict[Path, dict] = {}
_dirty: dict[Path, set[str]] = {}  # keys this process changed since its last write


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


@functools.cache
def build_id() -> str:
    """Short hash of the compiled extension's file ("noext" without one): a rebuilt kernel is a
    new build, whatever the version string says."""
    from sparsekern import _extension

    if not _extension.HAS_C_EXT:
        return "noext"
    from sparsekern import _C

    h = hashlib.sha256()
    with contextlib.suppress(OSError), open(_C.__file__, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def cpu_isa() -> str:
    from sparsekern.info import cpu_isa as isa

    return isa().split(" ")[0]  # "avx2"; "none (...)" without the extension


_RAW_ENV = getattr(os.environ, "_data", None)
if not isinstance(_RAW_ENV, dict):
    _RAW_ENV = None


def _env_key() -> tuple:
    """What picks the file besides the device, read cheaply (this runs on every auto call)."""
    if _RAW_ENV is not None:
        return _RAW_ENV.get(b"SPARSEKERN_CACHE_DIR"), _RAW_ENV.get(b"SPARSEKERN_CPU_ISA")
    return os.environ.get("SPARSEKERN_CACHE_DIR"), os.environ.get("SPARSEKERN_CPU_ISA")


def identity(device: torch.device) -> dict[str, object]:
    """Everything a stored timing depends on besides the op and shape."""
    import sparsekern

    ident: dict[str, object] = {"device": device_name(device), "sparsekern": sparsekern.__version__}
    ident |= {"torch": torch.__version__, "build": build_id()}
    if device.type == "cpu":
        ident |= {"isa": cpu_isa(), "threads": torch.get_num_threads()}
    return ident


def cache_path(device: torch.device) -> Path:
    """The JSON file holding the winners for ``device`` with this build, ISA and thread count."""
    key = (str(device), torch.get_num_threads(), *_env_key())
    path = _paths.get(key)
    if path is None:
        ident = identity(device)
        parts = [ident["device"], f"sk{ident['sparsekern']}", f"torch{ident['torch']}", ident["build"]]
        if "isa" in ident:
            parts += [ident["isa"], f"t{ident['threads']}"]
        slug = re.sub(r"[^A-Za-z0-9.+]+", "-", "-".join(str(p) for p in parts)).strip("-")
        path = _paths[key] = cache_dir() / f"dispatch-{slug}.json"
        _identities[path] = ident
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


def put(path: Path, key: str, entry: dict) -> None:
    """Set one entry (in memory; :func:`write` stores it)."""
    with lock:
        entries(path)[key] = entry
        _dirty.setdefault(path, set()).add(key)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _replace(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write(path: Path, device: torch.device) -> None:
    """Under the file lock: re-read, merge the entries this process changed, replace atomically."""
    with lock:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(path):
                mine = entries(path)
                merged = _read(path) | {k: mine[k] for k in _dirty.get(path, ()) if k in mine}
                _replace(path, {**_identities.get(path, identity(device)), "entries": merged})
            _memory[path] = merged
            _dirty.pop(path, None)
        except OSError as exc:  # read-only home, full disk: keep the in-memory choice
            log.info("sparsekern: could not write dispatch cache %s: %s", path, exc)


def files() -> list[Path]:
    """Every dispatch cache file in :func:`cache_dir` (any device, build, ISA, thread count)."""
    return sorted(cache_dir().glob("dispatch-*.json"))


def read_file(path: Path) -> tuple[dict, dict[str, dict]]:
    """(identity fields, entries) of one cache file, for listing."""
    try:
        data = json.loads(path.read_text())
        head = {k: v for k, v in data.items() if k != "entries"} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        head = {}
    return head, _read(path)


def forget(disk: bool = False) -> None:
    """Drop the in-memory choices (with ``disk`` also delete the cache files and their locks)."""
    with lock:
        paths = list(_memory)
        _memory.clear()
        _dirty.clear()
        if disk:
            for p in set(paths) | set(files()):
                for q in (p, p.with_name(p.name + ".lock")):
                    with contextlib.suppress(OSError):
                        q.unlink()


# -- recipes: enough to rebuild synthetic arguments for `sparsekern dispatch retune` -----------


def recipe(op: str, args: tuple) -> dict | None:
    """The shape, pattern and dtype of a linear's arguments (None for other ops)."""
    x = args[0]
    base = {"rows": int(x.shape[0]), "k": int(x.shape[-1]), "dtype": str(x.dtype).removeprefix("torch.")}
    if op == "nm_linear":
        values, _, n, m = args[1:5]
        out = base | {"out": int(values.shape[0]), "n": int(n), "m": int(m)}
        if len(args) > 6 and args[6] is not None:
            out |= {"quant": quant_of(values), "group_size": int(args[8])}
            out |= {"act_block": int(args[9])} if len(args) > 9 and args[9] else {}
        return out
    if op == "bsr_linear":
        crow, col, blocks = args[1:4]
        nnz, bm, bk = *blocks.shape[:2], block_width(blocks)
        density = nnz / max(1, (crow.numel() - 1) * (x.shape[-1] // bk))
        out = base | {"out": int((crow.numel() - 1) * bm), "block": [int(bm), int(bk)], "density": density}
        if len(args) > 5 and args[5] is not None:
            out |= {"quant": quant_of(blocks), "group_size": bk // args[5].shape[2]}
        return out
    return None
