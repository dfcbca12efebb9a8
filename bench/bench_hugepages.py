"""Lean decode with the weights on 4 KiB pages against the same weights on huge pages, in one process.

Two copies of one TinyLlama-1.1B-shaped model (random weights, the generate suite's seed), one
built and run with ``SPARSEKERN_HUGEPAGES=0`` (weights where torch put them), the other with it on
(:mod:`sparsekern.hugepages`); every round times ``sk.generate`` on each in turn (decode steps
only, :func:`sparsekern.bench.generate.lean_decode_s`), so a slow moment of a shared machine
lands on both. Reported: median tokens/s of each and the median of the per-round ratios.

    .venv/bin/python bench/bench_hugepages.py [--pattern dense] [--dtype bfloat16] [--rounds 6] [--new 16]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics

import torch

from sparsekern import hugepages
from sparsekern.bench import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pattern", default="dense", help="a generate-suite pattern, e.g. dense, 2:4, 2:4+int4g32a32+h8")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--new", type=int, default=16)
    args = ap.parse_args()
    if not hugepages.enabled():
        raise SystemExit("huge pages are not available here (not Linux, or THP mode 'never')")
    ids = generate.prompt_ids(32000, 1, (128,))[128]
    os.environ["SPARSEKERN_HUGEPAGES"] = "0"
    small = generate.load_model("tinyllama", getattr(torch, args.dtype))
    if args.pattern != "dense":
        generate.sparsify_pattern(small, args.pattern)
    huge = copy.deepcopy(small)
    runs = {"4 KiB": (small, "0", []), "huge": (huge, "1", [])}
    for model, env, _ in runs.values():  # builds each lean decoder under its setting
        os.environ["SPARSEKERN_HUGEPAGES"] = env
        generate.lean_decode_s(model, ids, 2)
    for r in range(args.rounds):
        for model, env, times in runs.values():
            os.environ["SPARSEKERN_HUGEPAGES"] = env
            times.append(generate.lean_decode_s(model, ids, args.new))
        print(f"round {r + 1}: " + ", ".join(f"{k} {1 / v[2][-1]:.1f} tok/s" for k, v in runs.items()), flush=True)
    small_t, huge_t = runs["4 KiB"][2], runs["huge"][2]
    ratio = statistics.median(a / b for a, b in zip(small_t, huge_t))
    print(
        f"{args.pattern} {args.dtype}: 4 KiB pages {1 / statistics.median(small_t):.1f} tok/s, huge pages "
        f"{1 / statistics.median(huge_t):.1f} tok/s, median ratio {ratio:.3f}x"
    )


if __name__ == "__main__":
    main()
