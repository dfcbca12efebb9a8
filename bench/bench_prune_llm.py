"""LLM pruning quality: SmolLM2-135M (real weights) pruned by magnitude, Wanda, SparseGPT and ADMM.

Every decoder linear is pruned (lm_head, tied to the embeddings, stays dense) with sequential
(block-by-block) calibration on ``--nsamples`` x ``--seqlen`` tokens from the first half of the
Britannica text (:mod:`sparsekern.bench.text`); perplexity on consecutive windows of its second
half. Prints a markdown table: method x pattern -> perplexity, ratio to dense, pruning time, memory.

    .venv/bin/python bench/bench_prune_llm.py [--methods wanda,sparsegpt,admm] [--patterns 2:4,4:8]
    .venv/bin/python bench/bench_prune_llm.py --model tinyllama --methods sparsegpt --patterns 2:4

``--model tinyllama``: TinyLlama-1.1B shapes with random weights (no download): time and memory
only (perplexity of random weights means nothing).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import sparsekern as sk  # noqa: E402
from sparsekern.bench import smollm, text  # noqa: E402

GIB = 1024**3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("smollm2", "tinyllama"), default="smollm2")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt,admm")
    ap.add_argument("--patterns", default="2:4,4:8")
    ap.add_argument("--nsamples", type=int, default=16, help="calibration windows (default: %(default)s)")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window (default: %(default)s)")
    ap.add_argument("--window", type=int, default=256, help="perplexity window (default: %(default)s)")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="tokens scored (default: %(default)s)")
    ap.add_argument("--layers", type=int, help="tinyllama: number of blocks (default: 22)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    if args.model == "smollm2":
        dense, tok = smollm.load()
        ids = text.token_ids(tok)
        cal = text.calibration_batches(ids, args.nsamples, args.seqlen)
        windows = text.eval_windows(ids, args.window, args.eval_tokens)
    else:
        over = {"num_hidden_layers": args.layers} if args.layers else {}
        dense = smollm.tinyllama(**over)
        g = torch.Generator().manual_seed(0)
        cal = [torch.randint(0, dense.config.vocab_size, (1, args.seqlen), generator=g) for _ in range(args.nsamples)]
        windows = None

    print(
        f"model {args.model} ({type(dense).__name__}, {sum(p.numel() for p in dense.parameters()) / 1e6:.0f} M params), "
        f"calibration {args.nsamples} x {args.seqlen} tokens, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    rows = []
    if windows is not None:
        t = time.perf_counter()
        base = text.perplexity(dense, windows)
        rows.append(("dense", "-", base.ppl, 1.0, None, None, time.perf_counter() - t))
        print(f"dense perplexity {base}", flush=True)
    for pattern in args.patterns.split(","):
        for method in args.methods.split(","):
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            report = sk.sparsify(
                model,
                pattern,
                method,
                calibration=None if method == "magnitude" else cal,
                progress=not args.no_progress,
            )
            seconds = time.perf_counter() - t
            info = report.calibration
            if info is not None:
                print(f"{method} {pattern}: {info}", flush=True)
            ppl = ratio = None
            t_eval = 0.0
            if windows is not None:
                t = time.perf_counter()
                ppl = text.perplexity(model, windows).ppl
                ratio = ppl / base.ppl
                t_eval = time.perf_counter() - t
            rows.append((method, pattern, ppl, ratio, seconds, info, t_eval))
            print(f"{method} {pattern}: ppl {ppl} prune {seconds:.1f} s", flush=True)
            del model

    if windows is not None:
        print(
            f"\nperplexity on {base.tokens} tokens ({base.windows} windows of {base.window}), second half of the text\n"
        )
    print(
        "| method | pattern | perplexity | x dense | prune time (s) | held: activations + 1 block stats (GiB) | RSS start -> peak (GiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for method, pattern, ppl, ratio, seconds, info, _ in rows:
        held = f"{info.activation_bytes / GIB:.3f} + {info.peak_stats_bytes / GIB:.3f}" if info else "-"
        rss = f"{info.rss_start / GIB:.2f} -> {info.rss_peak / GIB:.2f}" if info else "-"
        p = f"{ppl:.2f}" if ppl is not None else "-"
        r = f"{ratio:.2f}" if ratio is not None else "-"
        s = f"{seconds:.1f}" if seconds is not None else "-"
        print(f"| {method} | {pattern} | {p} | {r} | {s} | {held} | {rss} |")


if __name__ == "__main__":
    main()
