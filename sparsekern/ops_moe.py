"""``torch.ops.sparsekern.nm_grouped_linear`` / ``bsr_grouped_linear``: one N:M or block-sparse
linear per expert, for mixture-of-experts layers.

The schemas are in :mod:`sparsekern.ops` (with every other); here are their argument checks, fake
implementations, public implementations and typed wrappers. Backends register the op names
with :mod:`sparsekern.dispatch` (``cpu``, ``triton``, ``dense``, ``reference``); each op asks
:func:`dispatch.select` per call: a plan (:mod:`sparsekern.plan`) is made per weight and row bucket,
which does not fit an op whose rows are split over experts by a per-call ``offsets``.

Contract: ``x [T, K]`` with rows already sorted by expert; ``values [E, out, K*n/m]`` and ``meta``
int32 ``[E, out, words]`` are E float N:M weights stacked (:func:`sparsekern.formats.nm.stack_nm`);
``offsets`` int64 ``[E+1]`` on the CPU: rows ``offsets[e]:offsets[e+1]`` belong to expert e,
``offsets[0] == 0``, non-decreasing, ``offsets[E] == T``. ``out [T, out]`` in x's dtype, no bias.
``bsr_grouped_linear`` takes ``crow int32 [E, out/bm + 1]``, ``col int32 [nnz]`` and float
``blocks [nnz, bm, bk]`` instead (:func:`sparsekern.formats.bsr.stack_bsr`, layout in that module).
"""

from __future__ import annotations

import torch

from sparsekern import dispatch
from sparsekern.checks import check_same, check_tensor
from sparsekern.formats.nm import SUPPORTED_DTYPES, check_nm, meta_words
from sparsekern.ops import check_bsr_index_values, check_bsr_tensors, lib  # ops.py imports this module at its end

OP = "nm_grouped_linear"
BSR_OP = "bsr_grouped_linear"


def check_nm_grouped_linear(x, values, meta, offsets, n, m) -> None:
    """Every check that reads no tensor data (the fake implementation runs these too)."""
    check_nm(n, m)
    if isinstance(values, torch.Tensor) and values.dtype in (torch.int8, torch.uint8):
        raise ValueError(
            f"values: nm_grouped_linear takes float values only (quantized experts are not supported yet), "
            f"got {values.dtype}"
        )
    check_tensor("values", values)
    check_tensor("meta", meta, (torch.int32,))
    if values.dim() != 3 or values.shape[2] % n:
        raise ValueError(f"values: expected [experts, out, K*{n}/{m}], got shape {tuple(values.shape)}")
    e, out, kept = values.shape
    words = meta_words(kept, m)
    if tuple(meta.shape) != (e, out, words):
        raise ValueError(f"meta: expected shape {(e, out, words)}, got {tuple(meta.shape)}")
    if meta.device != values.device:
        raise ValueError(f"meta: expected device {values.device} (that of values), got {meta.device}")
    _check_x(x, "values", values)
    k = kept // n * m
    if x.shape[1] != k:
        raise ValueError(f"x: expected last dimension {k} (in_features), got shape {tuple(x.shape)}")
    check_offsets(offsets, e)


def _check_x(x, weight_name: str, weight) -> None:
    """x of a grouped op: a float 2-D ``[tokens, in_features]`` tensor beside the weight."""
    check_tensor("x", x, SUPPORTED_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [tokens, in_features] tensor, got shape {tuple(x.shape)}")
    check_same(weight_name, weight, x, "x")


def check_offsets(offsets, experts: int) -> None:
    check_tensor("offsets", offsets, (torch.int64,))
    if offsets.device.type != "cpu":
        raise ValueError(f"offsets: expected device cpu (the host splits rows by expert), got {offsets.device}")
    if tuple(offsets.shape) != (experts + 1,):
        raise ValueError(f"offsets: expected shape {(experts + 1,)} (experts + 1), got {tuple(offsets.shape)}")


def check_bsr_grouped_linear(x, crow, col, blocks, offsets) -> None:
    """Every check of ``bsr_grouped_linear`` that reads no tensor data (the fake runs these too)."""
    nnz, bm, bk = check_bsr_tensors(crow, col, blocks)
    if crow.dim() != 2 or crow.shape[0] < 1 or crow.shape[1] < 1:
        raise ValueError(f"crow: expected [experts >= 1, out/bm + 1], got shape {tuple(crow.shape)}")
    if tuple(col.shape) != (nnz,):
        raise ValueError(f"col: expected shape {(nnz,)} (one entry per block), got {tuple(col.shape)}")
    for name, t in (("crow", crow), ("col", col)):
        if t.device != blocks.device:
            raise ValueError(f"{name}: expected device {blocks.device} (that of blocks), got {t.device}")
    _check_x(x, "blocks", blocks)
    if x.shape[1] % bk:
        raise ValueError(f"x: last dimension {x.shape[1]} is not divisible by the block width {bk}")
    check_offsets(offsets, crow.shape[0])


def check_offsets_values(offsets: torch.Tensor, tokens: int) -> list[int]:
    """The expert boundaries as a list: 0 first, never decreasing, ``tokens`` last."""
    bounds = offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != tokens:
        raise ValueError(
            f"offsets: expected to start at 0 and end at the rows of x ({tokens}), got {bounds[0]}..{bounds[-1]}"
        )
    for e in range(len(bounds) - 1):
        if bounds[e + 1] < bounds[e]:
            raise ValueError(f"offsets: expected non-decreasing, got {bounds[e]} then {bounds[e + 1]} at expert {e}")
    return bounds


@torch.library.register_fake("sparsekern::nm_grouped_linear")
def _nm_grouped_linear_fake(x, values, meta, offsets, n, m):
    check_nm_grouped_linear(x, values, meta, offsets, n, m)
    return x.new_empty((x.shape[0], values.shape[1]))


torch.library.register_fake("sparsekern::_nm_grouped_linear_cpu")(_nm_grouped_linear_fake)


def _nm_grouped_linear_impl(x, values, meta, offsets, n, m):
    check_nm_grouped_linear(x, values, meta, offsets, n, m)
    check_offsets_values(offsets, x.shape[0])
    return dispatch.select(OP, x, values, meta, offsets, n, m).fn(x, values, meta, offsets, n, m)


lib.impl(OP, _nm_grouped_linear_impl, "CompositeExplicitAutograd")


def _tensors_only(**named) -> None:
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):  # the op's own parser would only say "Cast error"
            raise TypeError(f"{name}: expected torch.Tensor, got {type(t).__name__}")


def nm_grouped_linear(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, offsets: torch.Tensor, n: int, m: int
) -> torch.Tensor:
    """``out[r] = x[r] @ W_e.T`` for every row r of expert e's range ``offsets[e]:offsets[e+1]``
    (see the module docstring); ``values``/``meta`` from :func:`sparsekern.formats.nm.stack_nm`."""
    _tensors_only(x=x, values=values, meta=meta, offsets=offsets)
    return torch.ops.sparsekern.nm_grouped_linear(x, values, meta, offsets, n, m)


@torch.library.register_fake("sparsekern::bsr_grouped_linear")
def _bsr_grouped_linear_fake(x, crow, col, blocks, offsets):
    check_bsr_grouped_linear(x, crow, col, blocks, offsets)
    return x.new_empty((x.shape[0], (crow.shape[1] - 1) * blocks.shape[1]))


torch.library.register_fake("sparsekern::_bsr_grouped_linear_cpu")(_bsr_grouped_linear_fake)


def _bsr_grouped_linear_impl(x, crow, col, blocks, offsets):
    check_bsr_grouped_linear(x, crow, col, blocks, offsets)
    check_offsets_values(offsets, x.shape[0])
    check_bsr_index_values(crow, col, blocks, x.shape[1], grouped=True)
    return dispatch.select(BSR_OP, x, crow, col, blocks, offsets).fn(x, crow, col, blocks, offsets)


lib.impl(BSR_OP, _bsr_grouped_linear_impl, "CompositeExplicitAutograd")


def bsr_grouped_linear(
    x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """``out[r] = x[r] @ W_e.T`` for every row r of expert e's range ``offsets[e]:offsets[e+1]``,
    ``W_e`` block-sparse; ``crow``/``col``/``blocks`` from :func:`sparsekern.formats.bsr.stack_bsr`."""
    _tensors_only(x=x, crow=crow, col=col, blocks=blocks, offsets=offsets)
    return torch.ops.sparsekern.bsr_grouped_linear(x, crow, col, blocks, offsets)
