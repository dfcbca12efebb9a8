"""Timing dispatch candidates so that a busy moment cannot fool the choice.

- :func:`time_impls`: rounds interleaved across candidates (load from other processes hits all
  of them alike), and the MINIMUM over rounds: a disturbed round only ever adds time, so the
  fastest round is the best estimate of what the kernel costs (the median kept a stall that hit
  half the rounds).
- :func:`implausible`: the roofline check below; what it flags is timed again before storing.

Roofline model (deliberately simple): a linear call must move ``bytes`` = the weight as the backend reads
it (stored form for sparse kernels: values + meta, or blocks + indices; the decompressed weight
for ``dense`` and ``reference``) + x + bias + out, and do ``flops`` = 2 * rows * the weights it
multiplies. It cannot beat ``max(bytes / bandwidth, flops / peak, CALL_FLOOR_S)``. A time more
than :data:`SLACK` times that prediction says the measurement was disturbed (a busy moment, a
helper thread that was not scheduled) more often than the kernel is that slow, so dispatch
measures again before storing it. The bandwidth is measured once per device (a large ``sum``,
best of a few); the peak is assumed generous, so compute-bound calls are rarely flagged.
Ops other than the linears are not checked (no prediction).
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger("sparsekern")

# Measurement budget per candidate (seconds, after the warm-up) and bounds on the rounds.
# NOTE: 0.05 s keeps a first call of a decode shape (4096x4096 fp32, ~5 ms dense here on 2
# cores) at ~10 rounds per candidate, ~0.2 s in all; 3 rounds minimum leave the minimum a choice.
MEASURE_BUDGET_S = 0.05
MIN_REPS, MAX_REPS = 3, 15
# True while candidates are being timed: a candidate that calls a public op must not re-measure.
measuring: contextvars.ContextVar[bool] = contextvars.ContextVar("sparsekern_measuring", default=False)

# A measured time above SLACK x the prediction is re-measured.
SLACK = 2.0
# Below this, per-call overhead (Python, dispatcher, thread hand-off) dominates any model.
# NOTE: the dense fallback's bare call costs ~10-20 us on the 2-core EPYC; 50 us keeps small
# layers out of the check.
CALL_FLOOR_S = 50e-6
# Assumed peak FLOP/s: per CPU thread (AVX2: 2 FMA ports x 8 fp32 lanes x 2 at ~3 GHz ~ 96 G;
# AVX-512 doubles it) and per GPU.
PEAK_FLOPS_PER_CPU_THREAD = 100e9
PEAK_FLOPS_GPU = 1000e12
BANDWIDTH_PROBE_BYTES = 128 << 20

_bandwidth: dict[str, float] = {}
# The ops whose arguments are (x [rows, K], weight..., bias...): modelled here, row-bucketed by
# dispatch's prefill rule, re-made from a recipe by `sparsekern dispatch retune`.
LINEAR_OPS = ("nm_linear", "bsr_linear")


def bandwidth(device: torch.device) -> float:
    """Read bandwidth (bytes/s) of ``device``: best of 3 sums over 128 MiB, measured once."""
    key = str(device)
    if key not in _bandwidth:
        t = torch.ones(BANDWIDTH_PROBE_BYTES // 4, device=device)
        best = float("inf")
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            t.sum()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        _bandwidth[key] = BANDWIDTH_PROBE_BYTES / best
    return _bandwidth[key]


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def work(op: str, backend: str, args: tuple) -> tuple[int, int] | None:
    """(bytes, flops) of one call of ``op`` by ``backend`` on ``args``; None when not modelled."""
    if op not in LINEAR_OPS:
        return None
    bias_at = 5 if op == "nm_linear" else 4  # (x, values, meta, n, m, bias) / (x, crow, col, blocks, bias)
    x, bias = args[0], args[bias_at] if len(args) > bias_at else None
    rows, k, es = x.shape[0], x.shape[-1], x.element_size()
    if op == "nm_linear":
        values, meta = args[1], args[2]
        out, stored, stored_bytes = values.shape[0], values.numel(), _nbytes(values) + _nbytes(meta)
    else:
        crow, col, blocks = args[1], args[2], args[3]
        scales, zeros = (args[5:7] + (None, None))[:2]
        out = (crow.numel() - 1) * blocks.shape[1]
        stored = blocks.numel() * (2 if blocks.dtype == torch.uint8 else 1)
        stored_bytes = _nbytes(blocks) + _nbytes(crow) + _nbytes(col) + _nbytes(scales) + _nbytes(zeros)
    if backend in ("dense", "reference"):
        stored, stored_bytes = out * k, out * k * es
    return stored_bytes + _nbytes(x) + _nbytes(bias) + rows * out * es, 2 * rows * stored


def predicted_s(op: str, backend: str, args: tuple) -> float | None:
    """The fastest time the roofline allows for this call (None when not modelled)."""
    w = work(op, backend, args)
    if w is None:
        return None
    device = next(a for a in args if isinstance(a, torch.Tensor)).device
    peak = PEAK_FLOPS_GPU if device.type == "cuda" else PEAK_FLOPS_PER_CPU_THREAD * torch.get_num_threads()
    return max(w[0] / bandwidth(device), w[1] / peak, CALL_FLOOR_S)


def implausible(op: str, args: tuple, times: dict[str, float]) -> list[str]:
    """Backends whose measured seconds exceed SLACK x their roofline prediction."""
    slow = []
    for backend, t in times.items():
        p = predicted_s(op, backend, args)
        if p is not None and t == t and t > SLACK * p:
            slow.append(backend)
    return slow


def timed(fn: Callable, args: tuple, device: torch.device) -> float:
    """Seconds of one call (synchronized on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def time_impls(impls: list, args: tuple) -> dict[str, float]:
    """Minimum seconds per call of each implementation on ``args`` over interleaved rounds
    (called directly, no dispatch). A candidate that raises is left out (and logged)."""
    device = next(a for a in args if isinstance(a, torch.Tensor)).device
    samples: dict[str, float] = {}
    token = measuring.set(True)
    try:
        with torch.no_grad():
            for impl in impls:
                try:
                    timed(impl.fn, args, device)  # warm-up: caches, lazy compilation, dense copy
                    samples[impl.backend] = timed(impl.fn, args, device)
                except Exception as exc:  # noqa: BLE001
                    log.warning("sparsekern: backend %s failed on %s, not a candidate: %s", impl.backend, impl.op, exc)
            slowest = max(samples.values(), default=0.0)
            reps = max(MIN_REPS, min(MAX_REPS, int(MEASURE_BUDGET_S / max(slowest, 1e-6))))
            by_name = {i.backend: i for i in impls}
            for _ in range(reps - 1):
                for name in samples:
                    samples[name] = min(samples[name], timed(by_name[name].fn, args, device))
    finally:
        measuring.reset(token)
    return samples
