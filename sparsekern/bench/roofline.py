"""The device's measured roofline: memory bandwidth and peak matmul throughput.

"Roofline" (docs/DESIGN.md) is the larger of bytes that must move / measured bandwidth and useful
FLOPs / measured peak. Both ceilings are measured at the start of a run on this device, in the
run's dtype, rather than taken from a data sheet: on a shared 2-core CPU the data sheet is far
from what any kernel can reach.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sparsekern.bench.timing import Budget, measure


@dataclass(frozen=True)
class Roofline:
    bandwidth_gbs: float  # best of a copy (read + write bytes) and a read-only sum, bytes/s / 1e9
    peak_tflops: float  # dense square matmul in the run's dtype
    dtype: str
    matmul_n: int
    copy_mib: int

    def as_dict(self) -> dict:
        return asdict(self)

    def bound_s(self, flops: float, nbytes: float) -> float:
        """Shortest possible time for ``flops`` useful FLOPs that move ``nbytes`` bytes."""
        return max(nbytes / (self.bandwidth_gbs * 1e9), flops / (self.peak_tflops * 1e12))

    def percent(self, flops: float, nbytes: float, seconds: float) -> float:
        return 100.0 * self.bound_s(flops, nbytes) / seconds


def measure_roofline(
    device: torch.device, dtype: torch.dtype, quick: bool = False, copy_mib: int | None = None, n: int | None = None
) -> Roofline:
    """Streaming bandwidth over a buffer far larger than the caches, and a big GEMM's rate."""
    gpu = device.type == "cuda"
    # NOTE: 256 MiB (GPU: 1 GiB) is >4x the largest L3/L2 we target, so the copy streams from
    # DRAM/HBM; the GEMM side 2048 reaches ~90% of the 4096 rate on this 2-core AVX2 CPU at 1/8
    # the time (~0.2 s per call instead of ~1.6 s).
    copy_mib = copy_mib or (1024 if gpu else 256) // (2 if quick else 1)
    n = n or (8192 if gpu else 2048)
    budget = Budget(seconds=0.3 if quick else 1.0, min_reps=3, max_reps=50)
    src = torch.empty((copy_mib << 20) // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t_copy = measure(lambda a, b: b.copy_(a), [(src, dst)], device, budget)
    # A read-only stream (a sum) is what a decode GEMV does; on CPUs it beats copy's read+write.
    t_read = measure(torch.sum, [(src,)], device, budget)
    del src, dst
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = measure(torch.mm, [(a, b)], device, budget)
    # The 20% quantile, not the median: the ceiling is what the hardware reaches when not disturbed.
    best_copy_s, best_mm_s = t_copy.p20_ms / 1e3, t_mm.p20_ms / 1e3
    return Roofline(
        bandwidth_gbs=max(2 * (copy_mib << 20) / best_copy_s, (copy_mib << 20) / (t_read.p20_ms / 1e3)) / 1e9,
        peak_tflops=2 * n**3 / best_mm_s / 1e12,
        dtype=str(dtype).removeprefix("torch."),
        matmul_n=n,
        copy_mib=copy_mib,
    )
