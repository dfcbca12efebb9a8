"""Checkpoint folders on disk: written atomically, read only inside the folder the user named.

- :func:`write_folder` builds the new folder next to the target, fsyncs every file, renames it
  into place once and fsyncs the parent: a crash leaves the old folder or the new one, never a
  mix or a half-written file.
- :func:`resolve_inside` turns a file name read from a checkpoint (a JSON entry) into a path,
  refusing absolute paths, ``..`` and symlinks that lead out of the folder.
- :func:`read_json` reads a JSON object and names the file when it is not one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping

MARKER = "sparsekern.json"  # a folder holding this is a sparsekern checkpoint, safe to replace


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_folder(
    path: str | os.PathLike,
    writers: Mapping[str, Callable[[str], None]],
    replaceable: Iterable[str] = (".safetensors", ".safetensors.index.json"),
) -> str:
    """Write folder ``path`` atomically; ``writers[name](file)`` writes file ``name``. Returns the path.

    An existing ``path`` is replaced only after the new folder is complete, and only if it is
    empty or a sparsekern checkpoint (it holds ``sparsekern.json``): a folder of other files is
    refused, never deleted. Files of the old checkpoint that the new one does not write
    (``config.json``, tokenizer files) are carried over, except weight files (names ending in
    ``replaceable``), which would otherwise mix with the new weights.
    """
    target = os.path.realpath(os.fspath(path))  # a symlinked folder stays a symlink
    parent, name = os.path.split(target)
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise ValueError(f"path: expected a folder (new or a sparsekern checkpoint), got the file {target}")
        if os.listdir(target) and not os.path.exists(os.path.join(target, MARKER)):
            raise ValueError(
                f"path: {target} is a folder that is not a sparsekern checkpoint (no {MARKER}); "
                "refusing to replace its files: pass a new or empty folder"
            )
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        for fname, write in writers.items():
            write(os.path.join(tmp, fname))
        if os.path.isdir(target):
            _carry_over(target, tmp, set(writers), tuple(replaceable))
        for root, _, files in os.walk(tmp):
            for f in files:
                _fsync_file(os.path.join(root, f))
            _fsync_dir(root)
        old = None
        if os.path.isdir(target):
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _carry_over(old: str, new: str, written: set[str], replaceable: tuple[str, ...]) -> None:
    for entry in os.listdir(old):
        if entry in written or entry.endswith(replaceable):
            continue
        src, dst = os.path.join(old, entry), os.path.join(new, entry)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True)
        elif os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            try:
                os.link(src, dst)  # no copy; the old folder stays whole until the swap
            except OSError:
                shutil.copy2(src, dst)


def resolve_inside(folder: str | os.PathLike, name, where: str, key: str) -> str:
    """Path of file ``name`` (read from ``where``, entry ``key``) inside ``folder``, or ValueError.

    Relative names only; the resolved path (symlinks followed) must lie inside the resolved folder.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: {key}: expected a file name inside the folder, got {name!r}")
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"{where}: {key}: expected a file name inside the folder, got {name!r}")
    root = os.path.realpath(os.fspath(folder))
    full = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, full]) != root or full == root:
        raise ValueError(f"{where}: {key}: {name!r} resolves to {full}, outside the folder {root}")
    return full


def read_json(file: str) -> dict:
    """The JSON object in ``file``; ValueError naming the file if it is not valid JSON or not an object."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data
