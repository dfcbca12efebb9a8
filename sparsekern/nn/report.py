"""What ``sparsify`` did, layer by layer: :class:`SparsifyReport` (``str(report)`` is a table)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    pattern: str | None  # None: skipped
    module: str  # "SparseLinear", "SparseExperts", "Linear (masked)", or "skipped"
    sparsity: float  # fraction of zero weights after pruning (0 for skipped layers)
    bytes_before: int
    bytes_after: int
    note: str = ""
    experts: int = 1  # > 1: a fused MoE expert stack [experts, out, in]

    @property
    def weights(self) -> int:
        return self.experts * self.out_features * self.in_features


@dataclass
class SparsifyReport:
    """What :func:`sparsify` did. ``str(report)`` is a summary table."""

    method: str
    pattern: str
    layers: list[LayerReport] = field(default_factory=list)
    calibration: object = None  # a SequentialInfo (time, memory) when calibrated block by block
    dense_fallback: bool = True

    @property
    def dense_copy_bytes(self) -> int:
        """Bytes of dense weight copies the dense fallback holds now (every model, not only this one)."""
        from sparsekern.plan import dense_copy_bytes

        return dense_copy_bytes()

    @property
    def swapped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.module in ("SparseLinear", "SparseExperts")]

    @property
    def experts(self) -> list[LayerReport]:
        """The expert stacks swapped to ``SparseExperts`` (two rows per MoE layer: up, down)."""
        return [r for r in self.layers if r.module == "SparseExperts"]

    @property
    def masked(self) -> list[LayerReport]:
        return [r for r in self.layers if r.module == "Linear (masked)"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.module == "skipped"]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers if r.module != "skipped")

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers if r.module != "skipped")

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights over every linear-like weight of the model: pruned layers,
        skipped layers and fused MoE expert stacks (so a MoE whose experts stay dense reports ~5%)."""
        return _weighted(self.layers)

    @property
    def pruned_sparsity(self) -> float:
        """Fraction of zero weights over the pruned layers only."""
        return _weighted([r for r in self.layers if r.module not in ("skipped", "QuantLinear")])

    def __str__(self) -> str:
        head = ("layer", "shape", "pattern", "module", "sparsity", "bytes before", "bytes after", "note")
        rows = [
            (
                r.name,
                "x".join(map(str, ([r.experts] if r.experts > 1 else []) + [r.out_features, r.in_features])),
                r.pattern or "-",
                r.module,
                f"{r.sparsity:.1%}",
                _fmt_bytes(r.bytes_before),
                _fmt_bytes(r.bytes_after),
                r.note,
            )
            for r in self.layers
        ]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
        line = "  ".join
        out = [line(h.ljust(w) for h, w in zip(head, widths)), line("-" * w for w in widths)]
        out += [line(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        out.append(
            f"sparsify: method={self.method} pattern={self.pattern}: {len(self.swapped)} layers swapped to "
            f"SparseLinear{' / SparseExperts' if self.experts else ''}, {len(self.masked)} masked dense, "
            f"{len(self.skipped)} skipped; sparsity "
            f"{self.sparsity:.1%} of all linear weights ({self.pruned_sparsity:.1%} of the pruned ones); "
            f"weights {_fmt_bytes(self.bytes_before)} -> {_fmt_bytes(self.bytes_after)} "
            f"(saved {_fmt_bytes(self.bytes_saved)}); dense copies held by the dense fallback now: "
            f"{_fmt_bytes(self.dense_copy_bytes)}" + ("" if self.dense_fallback else " (dense_fallback=False)")
        )
        return "\n".join(out)


def _weighted(rows: list[LayerReport]) -> float:
    total = sum(r.weights for r in rows)
    return sum(r.sparsity * r.weights for r in rows) / total if total else 0.0


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)
