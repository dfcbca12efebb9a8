"""pytest-benchmark suites for the core ops, each next to its dense yardstick.

    .venv/bin/pytest bench/bench_ops.py                        # time (group by op and shape)
    .venv/bin/pytest bench/bench_ops.py --benchmark-disable    # CI: run each once, check results

Every case first checks the op against its dense equivalent, so a CI run with timing disabled
still proves the benchmarked path computes the right thing. The full sweep with roofline and
plots is ``sparsekern bench``; this file is the quick per-op view.
"""

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk

pytest.importorskip("pytest_benchmark")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
# Llama-7B attention projection; decode (1 row) and a small prefill tile (64 rows).
OUT, K = 4096, 4096
LINEAR_PATTERNS = ["2:4", "1:4", "2:8", "block32x32:0.9"]


def _weight(pattern: str, dense: torch.Tensor):
    if pattern.startswith("block"):
        dims, _, s = pattern[len("block") :].partition(":")
        b = int(dims.split("x")[0])
        return sk.BlockSparseWeight.from_dense(dense, block=(b, b), sparsity=float(s))
    n, m = (int(v) for v in pattern.split(":"))
    return sk.NMSparseWeight.from_dense(dense, n=n, m=m, prune=True)


@pytest.fixture(scope="module")
def dense_weight():
    torch.manual_seed(0)
    return (torch.randn(OUT, K, device=DEVICE) * 0.02).to(DTYPE)


@pytest.mark.parametrize("rows", [1, 64])
def test_dense_linear(benchmark, dense_weight, rows):
    benchmark.group = f"linear {OUT}x{K} rows={rows}"
    x = torch.randn(rows, K, device=DEVICE, dtype=DTYPE)
    benchmark(F.linear, x, dense_weight)


@pytest.mark.parametrize("rows", [1, 64])
@pytest.mark.parametrize("pattern", LINEAR_PATTERNS)
def test_sparse_linear(benchmark, dense_weight, pattern, rows):
    benchmark.group = f"linear {OUT}x{K} rows={rows}"
    w = _weight(pattern, dense_weight)
    op = sk.ops.bsr_linear if pattern.startswith("block") else sk.ops.nm_linear
    x = torch.randn(rows, K, device=DEVICE, dtype=DTYPE)
    expected = F.linear(x.float(), w.to_dense().float())
    torch.testing.assert_close(op(x, w).float(), expected, rtol=2e-2, atol=2e-2)
    benchmark(op, x, w)


@pytest.mark.parametrize("keep", [0.25, 1.0])
def test_pruned_attention_decode(benchmark, keep):
    heads, sk_len, d = 32, 4096, 128
    benchmark.group = f"attention decode h{heads} k{sk_len}"
    q = torch.randn(1, heads, 1, d, device=DEVICE, dtype=DTYPE)
    k = torch.randn(1, heads, sk_len, d, device=DEVICE, dtype=DTYPE)
    v = torch.randn(1, heads, sk_len, d, device=DEVICE, dtype=DTYPE)
    kept = int(keep * sk_len)
    idx = torch.rand(1, heads, sk_len, device=DEVICE).topk(kept, dim=-1).indices.sort(-1).values
    gi = idx.unsqueeze(-1).expand(-1, -1, -1, d)
    expected = F.scaled_dot_product_attention(q.float(), k.gather(2, gi).float(), v.gather(2, gi).float())
    torch.testing.assert_close(sk.ops.pruned_attention(q, k, v, idx).float(), expected, rtol=2e-2, atol=2e-2)
    benchmark(sk.ops.pruned_attention, q, k, v, idx)


def test_sdpa_decode(benchmark):
    heads, sk_len, d = 32, 4096, 128
    benchmark.group = f"attention decode h{heads} k{sk_len}"
    q = torch.randn(1, heads, 1, d, device=DEVICE, dtype=DTYPE)
    k = torch.randn(1, heads, sk_len, d, device=DEVICE, dtype=DTYPE)
    v = torch.randn(1, heads, sk_len, d, device=DEVICE, dtype=DTYPE)
    benchmark(F.scaled_dot_product_attention, q, k, v)
