"""all-MiniLM-L6-v2 with sparsekern token pruning: embedding quality and end-to-end latency.

    .venv/bin/python bench/bench_token_pruning.py [--keep 0.5] [--layers 2] [--batch 8] [--seq 256]

Quality: mean cosine similarity of the mean-pooled, L2-normalised sentence embeddings (the
sentence-transformers recipe for this model) to the unpruned model, over the fixed sentences
in tests/data/sentences_eval.txt. Latency: dense vs pruned forward of the same model, side by
side in one process (interleaved repetitions, median), at ``seq`` tokens: "long" inputs are
real text truncated to ``seq`` tokens (no padding), "padded" inputs are the eval sentences
padded to ``seq``. Loads only local files (HF_HUB_OFFLINE=1); never downloads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.bench import minilm  # noqa: E402
from sparsekern.nn.attention import mean_pool  # noqa: E402

SENTENCES = Path(__file__).resolve().parent.parent / "tests" / "data" / "sentences_eval.txt"


def load_sentences() -> list[str]:
    return [s.strip() for s in SENTENCES.read_text().splitlines() if s.strip()]


@torch.inference_mode()
def embed(model, enc, pruning: sparsekern.nn.attention.TokenPruningHandle | None = None) -> torch.Tensor:
    """Mean-pooled, normalised embeddings; with pruning, pooled over the kept tokens."""
    out = model(**enc)
    mask = enc["attention_mask"] if pruning is None else out.kept_attention_mask
    return torch.nn.functional.normalize(mean_pool(out.last_hidden_state, mask), dim=-1)


def cosine_vs_dense(model, tok, sentences, keep: float, layers, batch: int = 16, score: str = "mean"):
    """Per-sentence cosine similarity of pruned vs dense embeddings (fp32 tensor)."""
    sims = []
    for i in range(0, len(sentences), batch):
        enc = tok(sentences[i : i + batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
        dense = embed(model, enc)
        with sparsekern.prune_tokens(model, keep=keep, layers=layers, score=score) as h:
            pruned = embed(model, enc, h)
        sims.append((dense * pruned).sum(-1))
    return torch.cat(sims)


def long_inputs(tok, sentences, batch: int, seq: int):
    """``batch`` rows of ``seq`` real tokens each (sentences concatenated, then truncated)."""
    texts = []
    for b in range(batch):
        rot = sentences[b % len(sentences) :] + sentences[: b % len(sentences)]
        texts.append(" ".join(rot))
    return tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")


@torch.inference_mode()
def latency_ratio(model, enc, keep: float, layers, reps: int = 10, warmup: int = 2) -> dict:
    """Median dense and pruned forward times (ms) on ``enc``, interleaved in one process."""
    handle = sparsekern.prune_tokens(model, keep=keep, layers=layers)
    handle.remove()  # validate arguments before timing
    times = {"dense": [], "pruned": []}
    for r in range(warmup + reps):
        for name in ("dense", "pruned"):
            h = sparsekern.prune_tokens(model, keep=keep, layers=layers) if name == "pruned" else None
            t0 = time.perf_counter()
            model(**enc)
            dt = (time.perf_counter() - t0) * 1e3
            if h is not None:
                h.remove()
            if r >= warmup:
                times[name].append(dt)
    res = {k: statistics.median(v) for k, v in times.items()}
    q = {k: statistics.quantiles(v, n=5) if len(v) >= 2 else [v[0]] * 4 for k, v in times.items()}
    res["q20_80"] = {k: (v[0], v[-1]) for k, v in q.items()}
    res["speedup"] = res["dense"] / res["pruned"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--layers", type=int, nargs="+", default=[2])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--score", choices=("mean", "cls"), default="mean")
    args = ap.parse_args()

    model, tok = minilm.load()
    sentences = load_sentences()
    sims = cosine_vs_dense(model, tok, sentences, args.keep, tuple(args.layers), score=args.score)
    print(f"device cpu, torch {torch.__version__}, threads {torch.get_num_threads()}, model all-MiniLM-L6-v2")
    print(f"pruning: keep={args.keep} after layers {args.layers}, score={args.score}")
    print(f"\n{'sentences':>10} {'mean cos':>9} {'min cos':>9} {'p10 cos':>9}")
    p10 = torch.quantile(sims, 0.1).item()
    print(f"{len(sentences):>10} {sims.mean().item():>9.4f} {sims.min().item():>9.4f} {p10:>9.4f}")

    padded = tok(sentences[: args.batch], padding="max_length", max_length=args.seq, return_tensors="pt")
    cases = {"long": long_inputs(tok, sentences, args.batch, args.seq), "padded": padded}
    print(f"\n{'inputs':>8} {'B x S':>9} {'dense ms':>9} {'pruned ms':>10} {'speedup':>8}  (median; 20/80% in ms)")
    for name, enc in cases.items():
        r = latency_ratio(model, enc, args.keep, tuple(args.layers), reps=args.reps)
        shape = f"{args.batch}x{enc['input_ids'].shape[1]}"
        d, p = r["q20_80"]["dense"], r["q20_80"]["pruned"]
        print(
            f"{name:>8} {shape:>9} {r['dense']:>9.1f} {r['pruned']:>10.1f} {r['speedup']:>7.2f}x"
            f"  dense {d[0]:.1f}/{d[1]:.1f}, pruned {p[0]:.1f}/{p[1]:.1f}"
        )


if __name__ == "__main__":
    main()
