"""N:M sparse weights: in every run of M consecutive weights of a row, at most N are non-zero.

Storage (docs/DESIGN.md, "Formats"):

- ``values`` ``[out, K*N/M]``: the kept weights of each row, group after group, in column order.
- ``meta`` ``int32 [out, words]``: each kept weight's index inside its group (0..M-1), packed
  ``log2(M)`` bits apiece (1 bit for M=2, 2 for M=4, 3 for M=8, 4 for M=16). A word holds
  ``32 // bits`` indices, least significant first, so no index straddles a word; unused bits
  are zero. Within a group the N indices are strictly increasing. A group with fewer than N
  non-zeros stores explicit zeros at its lowest free positions, so every group has N entries.

Quantized kept weights (int8, int4 two per byte) with per-group ``scales`` and optional
``zeros``: :mod:`sparsekern.formats.quant`. ``meta`` is the same either way.

Derived hardware layouts (the ``mma.sp`` order, CPU interleaving) are made from this once at
load time; they are not separate formats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsekern.formats import quant as q

SUPPORTED_M = (2, 4, 8, 16)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def meta_bits(m: int) -> int:
    """Bits per packed index for group size ``m``."""
    return int(math.log2(m))


def meta_per_word(m: int) -> int:
    """Indices held by one int32 meta word."""
    return 32 // meta_bits(m)


def meta_words(kept: int, m: int) -> int:
    """int32 words per row for ``kept`` indices."""
    return -(-kept // meta_per_word(m))


def check_nm(n: int, m: int) -> None:
    if not isinstance(n, int) or not isinstance(m, int) or isinstance(n, bool) or isinstance(m, bool):
        raise TypeError(f"n and m: expected int, got n={n!r} ({type(n).__name__}), m={m!r} ({type(m).__name__})")
    if m not in SUPPORTED_M:
        raise ValueError(f"m: expected one of {SUPPORTED_M}, got {m}")
    if not 0 < n < m:
        raise ValueError(f"n: expected 0 < n < m={m}, got {n}")


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")


def pack_meta(idx: torch.Tensor, m: int) -> torch.Tensor:
    """Pack in-group indices ``int [rows, kept]`` (values < m) into ``int32 [rows, words]``."""
    rows, kept = idx.shape
    bits, per = meta_bits(m), meta_per_word(m)
    words = meta_words(kept, m)
    padded = torch.zeros(rows, words * per, dtype=torch.int64, device=idx.device)
    padded[:, :kept] = idx.to(torch.int64)
    shifts = torch.arange(per, device=idx.device, dtype=torch.int64) * bits
    packed = (padded.view(rows, words, per) << shifts).sum(-1)
    # Wrap to int32 two's complement: bit 31 is an ordinary payload bit.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_meta(meta: torch.Tensor, m: int, kept: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_meta`: ``[rows, kept]`` in-group indices (``dtype``: int64 for
    indexing; ``torch.uint8`` keeps the temporaries at 4 bytes per index instead of 16)."""
    bits, per = meta_bits(m), meta_per_word(m)
    if dtype == torch.int64:
        words = meta.to(torch.int64) & 0xFFFFFFFF
        shifts = torch.arange(per, device=meta.device, dtype=torch.int64) * bits
        idx = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    else:  # int32 shifts: the sign bits an arithmetic shift brings in are masked off
        shifts = torch.arange(per, device=meta.device, dtype=torch.int32) * bits
        idx = ((meta.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).to(dtype)
    return idx.reshape(meta.shape[0], -1)[:, :kept]


def column_indices(meta: torch.Tensor, n: int, m: int, kept: int) -> torch.Tensor:
    """Absolute column (0..K-1) of every kept value: ``int64 [rows, kept]``."""
    idx = unpack_meta(meta, m, kept)
    group = torch.arange(kept, device=meta.device) // n
    return group * m + idx


def nm_to_dense(values: torch.Tensor, meta: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Scatter ``values`` back to a dense ``[out, K]`` tensor."""
    rows, kept = values.shape
    k = kept // n * m
    dense = torch.zeros(rows, k, dtype=values.dtype, device=values.device)
    return dense.scatter_(1, column_indices(meta, n, m, kept), values)


def _select(dense: torch.Tensor, n: int, m: int, prune: bool) -> torch.Tensor:
    """In-group indices ``[out, groups, n]`` (ascending) of the weights to keep."""
    rows, k = dense.shape
    groups = dense.reshape(rows, k // m, m)
    pos = torch.arange(m, device=dense.device)
    if prune:
        # Largest |w| first; ties go to the lower index (stable sort) so pruning is deterministic.
        order = torch.sort(groups.abs().float(), dim=-1, descending=True, stable=True).indices
    else:
        nonzero = groups != 0
        count = nonzero.sum(-1)
        bad = (count > n).nonzero()
        if bad.numel():
            r, g = (int(v) for v in bad[0])
            raise ValueError(
                f"dense: row {r}, group {g} (columns {g * m}..{g * m + m - 1}) has {int(count[r, g])} "
                f"non-zeros, more than n={n} of m={m}; {bad.shape[0]} group(s) break the {n}:{m} "
                f"pattern (pass prune=True to keep the top-{n} |w| per group)"
            )
        # Non-zeros first, then the lowest free positions as explicit zeros.
        key = nonzero.to(torch.int64) * (2 * m) + (m - pos)
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    return torch.sort(order[..., :n], dim=-1).values


@dataclass(frozen=True, eq=False)
class NMSparseWeight:
    """A ``[out_features, in_features]`` weight in N:M form (see the module docstring)."""

    values: torch.Tensor
    meta: torch.Tensor
    n: int
    m: int
    shape: tuple[int, int]
    # Quantized values only (int8 / packed int4 ``values``): see sparsekern/formats/quant.py.
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    group_size: int = 0
    # > 0: the op rounds x to int8 per block of this many columns (int8 activations, opt-in).
    act_block: int = 0

    def __post_init__(self) -> None:
        check_nm(self.n, self.m)
        out, k = self.shape
        if not isinstance(self.values, torch.Tensor) or not isinstance(self.meta, torch.Tensor):
            raise TypeError("values and meta: expected torch.Tensor")
        if k % self.m:
            raise ValueError(f"shape: in_features {k} is not divisible by m={self.m}")
        kept = k // self.m * self.n
        if q.quant_of(self.values) is not None:
            q.check_parts(self.values, self.scales, self.zeros, out, kept, q.groups_of(self.group_size, k, self.m))
            q.check_act_block(self.act_block, k)
        else:
            check_dtype("values", self.values)
            if self.scales is not None or self.zeros is not None or self.group_size or self.act_block:
                raise ValueError(
                    "scales/zeros/group_size/act_block: only quantized (int8 / uint8) values take them, "
                    f"got values of {self.values.dtype}"
                )
            if tuple(self.values.shape) != (out, kept):
                raise ValueError(
                    f"values: expected shape {(out, kept)} for {self.shape} at {self.n}:{self.m}, "
                    f"got {tuple(self.values.shape)}"
                )
        words = meta_words(kept, self.m)
        if self.meta.dtype != torch.int32:
            raise TypeError(f"meta: expected dtype torch.int32, got {self.meta.dtype}")
        if tuple(self.meta.shape) != (out, words):
            raise ValueError(f"meta: expected shape {(out, words)}, got {tuple(self.meta.shape)}")
        if self.meta.device != self.values.device:
            raise ValueError(f"meta: expected device {self.values.device} (that of values), got {self.meta.device}")

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_dense(
        cls,
        dense: torch.Tensor,
        n: int = 2,
        m: int = 4,
        prune: bool = False,
        quant: str | None = None,
        group_size: int = 0,
        symmetric: bool = True,
        act_block: int = 0,
    ) -> NMSparseWeight:
        """Compress a dense ``[out, K]`` weight. Without ``prune`` it must already be N:M.
        With ``quant`` (``"int8"``/``"int4"``) the kept weights are then quantized (:meth:`quantize`)."""
        weight = cls._from_dense(dense, n, m, prune)
        return weight if quant is None else weight.quantize(quant, group_size, symmetric, act_block)

    def quantize(
        self, quant: str, group_size: int = 0, symmetric: bool = True, act_block: int = 0, *, scale=None, zero=None
    ) -> NMSparseWeight:
        """This weight with its kept values rounded to ``quant`` (round to nearest), one scale per
        ``group_size`` dense columns of a row (0: per row), in the values' dtype. ``act_block``
        (e.g. 32): the op also rounds x to int8 per block of that many columns, so the products
        are integer dot products (faster where the CPU has VNNI; see docs/DESIGN.md).
        ``scale`` / ``zero`` (fp32 ``[out, groups]``): round onto this grid instead of each group's
        own range (values already on it, from a pruner that rounded as it went, come back exactly)."""
        q.check_quant(quant)
        if self.quant is not None:
            raise ValueError(f"quant: this weight is already {self.quant}")
        groups = q.groups_of(group_size, self.shape[1], self.m)
        if quant == "int4" and self.values.shape[1] % 2:
            raise ValueError(f"quant: int4 packs kept weights in pairs; {self.values.shape[1]} kept per row is odd")
        values, scales, zeros = q.quantize(self.values, quant, groups, symmetric, scale, zero)
        return NMSparseWeight(values, self.meta, self.n, self.m, self.shape, scales, zeros, group_size, act_block)

    @classmethod
    def _from_dense(cls, dense: torch.Tensor, n: int, m: int, prune: bool) -> NMSparseWeight:
        check_nm(n, m)
        if not isinstance(dense, torch.Tensor):
            raise TypeError(f"dense: expected torch.Tensor, got {type(dense).__name__}")
        check_dtype("dense", dense)
        if dense.dim() != 2:
            raise ValueError(
                f"dense: expected a 2-D [out_features, in_features] tensor, got shape {tuple(dense.shape)}"
            )
        out, k = dense.shape
        if k % m:
            raise ValueError(f"dense: in_features {k} (shape {tuple(dense.shape)}) is not divisible by m={m}")
        idx = _select(dense.detach(), n, m, prune)
        values = dense.detach().reshape(out, k // m, m).gather(-1, idx).reshape(out, -1).contiguous()
        return cls(values, pack_meta(idx.reshape(out, -1), m), n, m, (out, k))

    def validate(self) -> NMSparseWeight:
        """Check packed indices: strictly increasing in every group, padding bits zero.

        Indices unpack as uint8, row chunks at a time: a weight is validated where it loads
        (``load_state_dict``, ``from_pretrained``), and int64 temporaries for a whole layer
        (~16 bytes per kept weight) raised the peak memory of a load by a third of the
        checkpoint (TinyLlama-shaped test model, 4 blocks, 32 MiB at 2:4). NOTE: chunks of 64K
        indices; with 256K that load peaked 36.8-38.6 MiB against 35.5-36.6 (bound 38.7)."""
        kept, rows = self.kept, self.shape[0]
        bits, per = meta_bits(self.m), meta_per_word(self.m)
        # Bits outside the index fields: past the row's last index, and the 2 unused top bits of
        # each word of 3-bit fields.
        words = self.meta.shape[1]
        used = torch.full((words,), per * bits, dtype=torch.int64, device=self.meta.device)
        if words:
            used[-1] = (kept - (words - 1) * per) * bits
        outside = ~((1 << used) - 1)
        step = max(1, (1 << 16) // max(kept, 1))
        for r0 in range(0, rows, step):
            meta = self.meta[r0 : r0 + step]
            idx = unpack_meta(meta, self.m, kept, torch.uint8).view(-1, kept // self.n, self.n)
            bad = (idx[..., 1:] <= idx[..., :-1]).any(-1).nonzero()
            if bad.numel():
                r, g = (int(v) for v in bad[0])
                raise ValueError(
                    f"meta: row {r0 + r}, group {g} has indices {idx[r, g].tolist()}; expected {self.n} strictly "
                    f"increasing indices in 0..{self.m - 1} (index out of range or repeated)"
                )
            if ((meta.to(torch.int64) & 0xFFFFFFFF) & outside).any():
                raise ValueError("meta: bits set beyond the last index of a row (index out of range)")
        if self.scales is not None:
            q.check_values(self.values, self.scales, self.zeros)
        return self

    # -- conversion --------------------------------------------------------------------------

    def to_dense(self) -> torch.Tensor:
        """The dense ``[out, K]`` weight (dequantized, in :attr:`dtype`, when quantized)."""
        return nm_to_dense(self.float_values(), self.meta, self.n, self.m)

    def float_values(self) -> torch.Tensor:
        """The kept weights ``[out, kept]`` as floats (dequantized when quantized)."""
        return self.values if self.scales is None else q.dequantize(self.values, self.scales, self.zeros)

    def to(self, *args, **kwargs) -> NMSparseWeight:
        """Like ``Tensor.to``: moves every tensor; a dtype applies to the floating one (``values``,
        or ``scales`` when quantized)."""
        if self.scales is None:
            values = self.values.to(*args, **kwargs)
            check_dtype("dtype", values)
            return NMSparseWeight(values, self.meta.to(device=values.device), self.n, self.m, self.shape)
        scales = self.scales.to(*args, **kwargs)
        check_dtype("dtype", scales)
        dev = scales.device
        zeros = None if self.zeros is None else self.zeros.to(device=dev)
        return NMSparseWeight(
            self.values.to(device=dev), self.meta.to(device=dev), self.n, self.m, self.shape, scales, zeros,
            self.group_size, self.act_block,
        )  # fmt: skip

    @property
    def quant(self) -> str | None:
        """``"int8"``, ``"int4"`` or None (floating values)."""
        return q.quant_of(self.values)

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the weight: that of ``values``, or of ``scales`` when quantized."""
        return self.values.dtype if self.scales is None else self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def kept(self) -> int:
        """Kept weights per row (``K * n / m``), however they are stored."""
        return self.shape[1] // self.m * self.n

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    def quant_args(self) -> tuple:
        """The op's trailing arguments ``(scales, zeros, group_size, act_block)`` (None/0 when floating)."""
        return (self.scales, self.zeros, self.group_size, self.act_block)

    def nbytes(self) -> int:
        parts = (self.values, self.meta, self.scales, self.zeros)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def __repr__(self) -> str:
        qs = "" if self.scales is None else f", quant={self.quant}, group_size={self.group_size}"
        qs += f", act_block={self.act_block}" if self.act_block else ""
        return f"NMSparseWeight({self.pattern}, shape={self.shape}, dtype={self.dtype}{qs}, device={self.device})"


def stack_nm(
    weights: torch.Tensor | list[NMSparseWeight], n: int = 2, m: int = 4, prune: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [E, out, kept], meta int32 [E, out, words])`` for ``nm_grouped_linear``: E expert
    weights stacked, ``values[e]``/``meta[e]`` being expert e's :class:`NMSparseWeight` parts.

    ``weights`` is a dense ``[E, out, K]`` tensor (each expert compressed with ``n``, ``m``,
    ``prune`` as in :meth:`NMSparseWeight.from_dense`) or a list of float NMSparseWeight of one
    pattern, shape, dtype and device (their own pattern is used; ``n``, ``m``, ``prune`` are ignored).
    """
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 3:
            raise ValueError(f"weights: expected a 3-D [experts, out, in] tensor, got shape {tuple(weights.shape)}")
        weights = [NMSparseWeight.from_dense(w, n=n, m=m, prune=prune) for w in weights]
    if not isinstance(weights, (list, tuple)) or not weights:
        raise TypeError(f"weights: expected a 3-D tensor or a non-empty list of NMSparseWeight, got {weights!r:.80}")
    first = weights[0]
    for i, w in enumerate(weights):
        if not isinstance(w, NMSparseWeight):
            raise TypeError(f"weights[{i}]: expected NMSparseWeight, got {type(w).__name__}")
        if w.quant is not None:
            raise ValueError(
                f"weights[{i}]: expected float values, got {w.quant} (quantized experts: not supported yet)"
            )
        got, want = (w.pattern, w.shape, w.dtype, w.device), (first.pattern, first.shape, first.dtype, first.device)
        if got != want:
            raise ValueError(
                f"weights[{i}]: expected (pattern, shape, dtype, device) {want} like weights[0], got {got}"
            )
    return torch.stack([w.values for w in weights]), torch.stack([w.meta for w in weights])
