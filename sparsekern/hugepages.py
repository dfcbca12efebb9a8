"""Weights on 2 MiB pages: decode streams every weight once per token, and with 4 KiB pages that
stream also walks the page tables (one TLB miss per 4 KiB).

Linux backs memory with transparent huge pages only where a mapping asks for them when the
system's mode is ``madvise`` (the default of most distributions, and of this project's machines);
torch's allocator does not ask unless ``THP_MEM_ALLOC_ENABLE=1`` was set before its first
allocation. :func:`rehome` copies a CPU tensor into an anonymous mapping advised
``MADV_HUGEPAGE``; :func:`rehome_module` does that, in place, for every large parameter and
buffer of a module (the values are unchanged; only their storage moves).

``sk.sparsify`` and the lean decode path (``sk.generate``) call :func:`rehome_module`;
``SPARSEKERN_HUGEPAGES=0`` turns it off.

NOTE: 2-core Zen 4 EPYC, THP mode ``madvise``, 2026-11-26, ``bench/bench_hugepages.py`` (both
page sizes in one process, interleaved rounds, median of per-round ratios): TinyLlama-1.1B shapes
bf16 lean decode, dense 1.057x (13.7 against 13.0 tok/s), 2:4 int4 + int8 head 1.025x, 2:4 bf16
0.98-0.99x (its kernel prefetches across 4 KiB page boundaries itself). Kept on for every
pattern: no run measured a loss beyond the noise.
"""

from __future__ import annotations

import functools
import mmap
import os
import sys
import weakref

import torch
from torch import nn

HUGE_PAGE = 2 << 20
MIN_BYTES = HUGE_PAGE  # a smaller tensor cannot fill one
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
_ARENAS: set[int] = set()  # storage data pointers of the live mappings made here


@functools.cache
def _system_allows() -> bool:
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(_THP_MODE) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def enabled() -> bool:
    """True where :func:`rehome` moves tensors: Linux with transparent huge pages not ``never``,
    and ``SPARSEKERN_HUGEPAGES`` not ``0``."""
    return os.environ.get("SPARSEKERN_HUGEPAGES", "1") != "0" and _system_allows()


def is_huge(t: torch.Tensor) -> bool:
    """True when ``t``'s storage is a mapping made by :func:`rehome`."""
    return t.untyped_storage().data_ptr() in _ARENAS


def _eligible(t: torch.Tensor) -> bool:
    """A whole CPU tensor of at least :data:`MIN_BYTES`, owning its storage (a view into a larger
    storage is left where it is: moving it would split what it shares), not already moved."""
    if type(t) not in (torch.Tensor, nn.Parameter) or t.device.type != "cpu" or t.layout != torch.strided:
        return False
    nbytes = t.numel() * t.element_size()
    if nbytes < MIN_BYTES or not t.is_contiguous() or t.storage_offset() != 0 or t.is_quantized:
        return False
    return t.untyped_storage().nbytes() == nbytes and not is_huge(t)


def rehome(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied into memory advised ``MADV_HUGEPAGE`` (same dtype, shape and values), or ``t``
    itself where :func:`enabled` is false or ``t`` is not eligible (off the CPU, under 2 MiB, a
    view, already moved)."""
    return _huge_copy(t) if enabled() and _eligible(t) else t


def _huge_copy(t: torch.Tensor) -> torch.Tensor:
    """:func:`rehome` past its checks."""
    nbytes = t.numel() * t.element_size()
    try:
        # 2 MiB of slack, so the tensor can start on a huge-page boundary; only its whole huge
        # pages are advised (a partial last one would fault in a full 2 MiB page), the untouched
        # slack costs address space only.
        buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        pad = -torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE
        buf.madvise(mmap.MADV_HUGEPAGE, pad, nbytes - nbytes % HUGE_PAGE)
    except OSError:  # no address space or a kernel that refuses the advice: t stays as it is
        return t
    out = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=pad)  # holds buf alive
    out = out.view(t.dtype).view(t.shape)
    ptr = out.untyped_storage().data_ptr()
    _ARENAS.add(ptr)
    weakref.finalize(buf, _ARENAS.discard, ptr)
    with torch.no_grad():
        out.copy_(t)
    return out


def rehome_module(module: nn.Module) -> nn.Module:
    """:func:`rehome` every parameter and buffer of ``module`` in place (a parameter keeps its
    object, so tied weights stay tied, and two tensors of one storage get one copy); returns
    ``module``."""
    if not enabled():
        return module
    moved: dict[tuple, torch.Tensor] = {}  # (storage pointer, dtype, shape) -> its copy

    def copy_of(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if key not in moved:
            moved[key] = _huge_copy(t)  # eligible: checked by the caller
        return moved[key]

    for mod in module.modules():
        for p in mod._parameters.values():
            if p is not None and _eligible(p):
                p.data = copy_of(p.data)
        for name, b in mod._buffers.items():
            if b is not None and _eligible(b):
                mod._buffers[name] = copy_of(b)
    return module
