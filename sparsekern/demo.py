"""`make demo`: prune a Llama-7B-sized weight to 2:4, compress it, and time it against dense."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import sparsekern as sk


def _median_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    torch.manual_seed(0)
    print(sk.info.render() if hasattr(sk, "info") else "")
    dense = torch.randn(4096, 4096)
    print(f"{'pattern':8} {'rows':>5} {'dense ms':>9} {'sparse ms':>10} {'speedup':>8} {'max err':>9}")
    for n, m in ((2, 4), (1, 4), (2, 8)):
        w = sk.NMSparseWeight.from_dense(dense, n=n, m=m, prune=True)
        wd = w.to_dense()
        for rows in (1, 64):
            x = torch.randn(rows, 4096)
            t_dense = _median_ms(lambda: F.linear(x, wd))
            t_sparse = _median_ms(lambda: sk.ops.nm_linear(x, w))
            err = (sk.ops.nm_linear(x, w) - F.linear(x, wd)).abs().max().item()
            print(f"{n}:{m:<6} {rows:>5} {t_dense:>9.3f} {t_sparse:>10.3f} {t_dense / t_sparse:>7.2f}x {err:>9.2e}")


if __name__ == "__main__":
    import sparsekern.info  # noqa: F401

    main()
