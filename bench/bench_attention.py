"""CPU token-pruned attention (``pruned_attention``) and ``token_scores`` vs torch, one process.

pytest-benchmark: ``pytest bench/bench_attention.py`` (CI: ``--benchmark-disable``).
Table: ``python bench/bench_attention.py [--reps N]`` prints, per case, the median ms (20/80
quantiles) of full SDPA over every key, ``torch.gather`` of the kept K/V + SDPA, and the
sparsekern CPU kernel, with the speedups, achieved GFLOP/s (kept keys only) and GB/s of K/V rows
read (all keys for full SDPA, kept keys otherwise). Also ``token_scores`` against eager ``softmax(Q K^T)`` (the [Sq, Sk] matrix route).
Cases (issue 6): prefill B=1 H=8 Sq=1024 Sk=4096 D=64 and decode B=8 H=32 Sq=1 Sk=8192 D=128,
25% of the keys kept (a different random set per head, ascending as a pruner emits it), fp32.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk

CASES = {  # name: (B, H, Sq, Sk, D)
    "prefill": (1, 8, 1024, 4096, 64),
    "decode": (8, 32, 1, 8192, 128),
}
KEEP = 0.25


def make_inputs(b, h, sq, sk_len, d, keep=KEEP, dtype=torch.float32):
    q, k, v = (torch.randn(b, h, s, d, dtype=dtype) for s in (sq, sk_len, sk_len))
    kept = max(1, round(keep * sk_len))
    keep_idx = torch.stack([torch.randperm(sk_len)[:kept].sort().values for _ in range(b * h)]).view(b, h, kept)
    return q, k, v, keep_idx


def full_sdpa(q, k, v, keep_idx):
    return F.scaled_dot_product_attention(q, k, v)


def gather_sdpa(q, k, v, keep_idx):
    idx = keep_idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
    return F.scaled_dot_product_attention(q, torch.gather(k, 2, idx), torch.gather(v, 2, idx))


def ours(q, k, v, keep_idx):
    with sk.use_backend("cpu"):
        return sk.ops.pruned_attention(q, k, v, keep_idx)


def eager_scores(q, k):
    return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, -1).mean(-2)


def ours_scores(q, k):
    with sk.use_backend("cpu"):
        return sk.ops.token_scores(q, k)


def _times(fn, args, reps: int) -> list[float]:
    fn(*args)  # warm-up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args)
        out.append(time.perf_counter() - t0)
    return out


def _q(ts: list[float]) -> tuple[float, float, float]:
    s = sorted(t * 1e3 for t in ts)
    pick = lambda f: s[min(len(s) - 1, int(f * (len(s) - 1) + 0.5))]  # noqa: E731
    return pick(0.5), pick(0.2), pick(0.8)


def measure(name: str, reps: int) -> list[dict]:
    b, h, sq, sk_len, d = CASES[name]
    args = make_inputs(b, h, sq, sk_len, d)
    kept = args[3].shape[-1]
    torch.testing.assert_close(ours(*args), gather_sdpa(*args), atol=1e-4, rtol=1e-4)  # same answer first
    # Interleave the three so machine noise hits them alike.
    times = {"sdpa(all keys)": [], "gather+sdpa": [], "sparsekern cpu": []}
    fns = {"sdpa(all keys)": full_sdpa, "gather+sdpa": gather_sdpa, "sparsekern cpu": ours}
    for fn in fns.values():
        fn(*args)
    for _ in range(reps):
        for label, fn in fns.items():
            times[label] += _times(fn, args, 1)
    base = _q(times["sdpa(all keys)"])[0]
    rows = []
    for label, ts in times.items():
        med, p20, p80 = _q(ts)
        keys = sk_len if label == "sdpa(all keys)" else kept  # the keys this route attends to
        flops, kv_bytes = 4 * b * h * sq * keys * d, 2 * b * h * keys * d * 4
        rows.append(dict(case=name, impl=label, ms=med, p20=p20, p80=p80, vs_sdpa=base / med,
                         gflops=flops / med / 1e6, gbs=kv_bytes / med / 1e6))  # fmt: skip
    gat = next(r["ms"] for r in rows if r["impl"] == "gather+sdpa")
    rows[-1]["vs_gather"] = gat / rows[-1]["ms"]
    return rows


def measure_scores(reps: int) -> list[dict]:
    b, h, sq, sk_len, d = CASES["prefill"]
    q, k, _, _ = make_inputs(b, h, sq, sk_len, d)
    torch.testing.assert_close(ours_scores(q, k), eager_scores(q, k), atol=1e-5, rtol=1e-3)
    e, o = [], []
    for _ in range(reps):
        e += _times(eager_scores, (q, k), 1)
        o += _times(ours_scores, (q, k), 1)
    em, om = _q(e), _q(o)
    return [dict(case="token_scores prefill", impl="eager softmax(QK^T)", ms=em[0], p20=em[1], p80=em[2], vs_sdpa=1.0),
            dict(case="token_scores prefill", impl="sparsekern cpu", ms=om[0], p20=om[1], p80=om[2],
                 vs_sdpa=em[0] / om[0])]  # fmt: skip


def _sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__},"
          f" git {_sha()}, ISA {torch.ops.sparsekern._cpu_isa()} (1 = AVX2), fp32, keep {KEEP:.0%}")  # fmt: skip
    print(
        f"{'case':22} {'impl':20} {'ms':>8} {'p20':>8} {'p80':>8} {'x sdpa':>7} {'x gather':>8} {'GFLOP/s':>8} {'GB/s':>6}"
    )
    rows = measure("prefill", a.reps) + measure("decode", a.reps) + measure_scores(a.reps)
    for r in rows:
        vg = f"{r['vs_gather']:8.2f}" if "vs_gather" in r else " " * 8
        gf = f"{r['gflops']:8.1f}" if "gflops" in r else " " * 8
        gb = f"{r['gbs']:6.1f}" if "gbs" in r else " " * 6
        print(
            f"{r['case']:22} {r['impl']:20} {r['ms']:8.1f} {r['p20']:8.1f} {r['p80']:8.1f} {r['vs_sdpa']:7.2f} {vg} {gf} {gb}"
        )
    print("(x sdpa for token_scores rows: speedup over the eager softmax(QK^T) route)")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", [full_sdpa, gather_sdpa, ours], ids=["sdpa", "gather_sdpa", "sparsekern"])
def test_bench_attention(benchmark, case, impl):
    args = make_inputs(*CASES[case])
    benchmark.group = f"pruned_attention {case}"
    benchmark(impl, *args)


@pytest.mark.parametrize("impl", [eager_scores, ours_scores], ids=["eager", "sparsekern"])
def test_bench_token_scores(benchmark, impl):
    q, k, _, _ = make_inputs(*CASES["prefill"])
    benchmark.group = "token_scores prefill"
    benchmark(impl, q, k)


if __name__ == "__main__":
    main()
