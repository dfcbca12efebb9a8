"""Argument checks shared by the ops (``sparsekern/ops.py``): tensor type / device helpers and the
attention ops' checks. They raise ``ValueError`` / ``TypeError`` naming the argument, the expected
and the received value; the C++ ops check the same things in the same words (csrc/cpu/op_checks.h).
"""

from __future__ import annotations

import torch

from sparsekern.formats.nm import SUPPORTED_DTYPES


def check_tensor(name: str, t, dtypes=SUPPORTED_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_same(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (that of {ref_name}), got {t.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {t.dtype}")


def check_token_scores(q, k, cls_only) -> None:
    check_attention(q, k)
    if cls_only and q.shape[2] < 1:
        raise ValueError(f"q: cls_only scores the first query; expected at least one query, got shape {tuple(q.shape)}")


def check_attention(q, k, v=None, keep_idx=None) -> None:
    names = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in names:
        check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name}: expected [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if name != "q":
            check_same(name, t, q, "q")
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"k: expected [{b}, {h}, Sk, {d}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v is not None and tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected shape {tuple(k.shape)} (that of k), got {tuple(v.shape)}")
    if k.shape[2] < 1:
        raise ValueError("k: expected at least one key")
    if keep_idx is not None:
        check_tensor("keep_idx", keep_idx, (torch.int64,))
        if keep_idx.device != q.device:
            raise ValueError(f"keep_idx: expected device {q.device} (that of q), got {keep_idx.device}")
        if keep_idx.dim() != 3 or keep_idx.shape[0] != b or keep_idx.shape[1] != h:
            raise ValueError(f"keep_idx: expected [{b}, {h}, kept], got shape {tuple(keep_idx.shape)}")
        if keep_idx.shape[2] < 1:
            raise ValueError("keep_idx: the keep set is empty; expected at least one kept key")


def check_keep_idx_values(keep_idx: torch.Tensor, sk: int) -> None:
    """Value checks of keep_idx (they read the tensor, so they stay out of the fake impl).

    CPU tensors only: reading the values of a GPU tensor is a host sync per call (and rules out
    CUDA-graph capture); there :func:`keep_idx_on_device` checks them on the device instead.
    """
    if keep_idx.device.type != "cpu":
        return
    lo, hi = int(keep_idx.min()), int(keep_idx.max())
    if lo < 0 or hi >= sk:
        raise ValueError(f"keep_idx: expected key positions in 0..{sk - 1}, got values in {lo}..{hi}")
    srt = torch.sort(keep_idx, dim=-1).values
    if (srt[..., 1:] == srt[..., :-1]).any():
        raise ValueError("keep_idx: a key position is repeated within a (batch, head) row; expected distinct positions")


def keep_idx_on_device(keep_idx: torch.Tensor, sk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPU form of :func:`check_keep_idx_values`, without a host sync: ``keep_idx`` clamped to
    ``0..sk-1`` (no kernel, the reference's gather included, reads out of bounds) and a bool
    ``[B, H]`` of the rows that held an out-of-range or repeated position. Their outputs are set
    to NaN (:func:`_nan_rows`): an error that cannot be raised without a sync, never a silent
    wrong answer."""
    bad = ((keep_idx < 0) | (keep_idx >= sk)).any(-1)
    srt = torch.sort(keep_idx, dim=-1).values
    bad = bad | (srt[..., 1:] == srt[..., :-1]).any(-1)
    return keep_idx.clamp(0, sk - 1), bad


def nan_rows(t: torch.Tensor, bad: torch.Tensor | None) -> torch.Tensor:
    if bad is None:
        return t
    return t.masked_fill(bad.view(*bad.shape, *([1] * (t.dim() - bad.dim()))), float("nan"))
