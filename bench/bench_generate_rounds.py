"""HF ``model.generate`` decode, dense against sparse variants, in interleaved rounds.

The generate suite runs each variant's timings back to back; on a shared 2-core machine a slow
minute then lands on one variant only. Here every round times each variant once, in a random
order, at one batch size: decode seconds per step = ``(t(1 + N new tokens) - t(1 new token)) / N``
(prefill cancels), tokens/s = batch / that; and t(1 new token), the time to first token.
Reported per variant: the median and best tokens/s, the median of the per-round ratios to the
first pattern, the median time to first token and its ratio (first pattern's / this one's).

``--teams auto,pool`` times each pattern once per team of the CPU kernels' parallel runtime
(``torch.ops.sparsekern._cpu_parallel_team``, set before each timing), in the same rounds: the
A/B of csrc/cpu/parallel.h in one process. Ratios are to the first pattern under the same team.
``--heads as-is,torch,gemv`` likewise times each pattern with its LM head as loading / sparsify left
it, as torch's ``nn.Linear``, and as a :class:`~sparsekern.nn.dense_head.DenseHead` (the class is
switched before each timing; the weight is the same).

    .venv/bin/python bench/bench_generate_rounds.py --batch 8 --patterns dense,2:4 --dtype fp32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import torch

from sparsekern.bench import generate
from sparsekern.nn.dense_head import DenseHead

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tinyllama", help="tinyllama, smollm2 or a local directory")
    ap.add_argument("--patterns", default="dense,2:4", help="the first is the baseline of the ratios")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--teams", default="", help="e.g. auto,pool: every pattern under each team")
    ap.add_argument("--heads", default="", help="e.g. as-is,torch,gemv: every pattern with each LM head")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    patterns = args.patterns.split(",")
    teams = args.teams.split(",") if args.teams else [""]
    heads = args.heads.split(",") if args.heads else [""]
    team_op = torch.ops.sparsekern._cpu_parallel_team
    dense = generate.load_model(args.model, DTYPES[args.dtype])
    models = {p: generate._variant(dense, p) for p in patterns}
    ids = generate.prompt_ids(dense.config.vocab_size, args.batch, (args.prompt,))[args.prompt]
    del dense  # the variants hold it (as "dense") or their own copies
    for p in patterns:  # warm-up: plans, dispatch timings, first-call costs
        generate._generate(models[p], ids, 2, False)

    as_is = {p: type(models[p].lm_head) for p in patterns}
    head_class = {"torch": torch.nn.Linear, "gemv": DenseHead}
    variants = [(p, t, h) for t in teams for h in heads for p in patterns]
    name = {(p, t, h): p + (f"@{t}" if t else "") + (f" head={h}" if h else "") for p, t, h in variants}
    per: dict[str, list[float]] = {name[v]: [] for v in variants}
    ttft: dict[str, list[float]] = {name[v]: [] for v in variants}
    for r in range(args.rounds):
        for p, t, h in random.sample(variants, len(variants)):
            if t:
                team_op(t)
            models[p].lm_head.__class__ = head_class.get(h, as_is[p])
            v = name[(p, t, h)]
            t1, tn = generate._timed(models[p], ids, 1, 1), generate._timed(models[p], ids, 1 + args.new, 1)
            per[v].append(args.batch * args.new / (tn - t1) if tn > t1 else float("nan"))
            ttft[v].append(t1)
            print(f"round {r} {v}: {per[v][-1]:.2f} tok/s (t(1) {t1:.2f} s)", flush=True)
    if teams != [""]:
        team_op("auto")
    print(
        f"\n{args.model} {args.dtype}, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, {args.rounds} rounds"
    )
    base = patterns[0]
    print(f"| pattern | tok/s median | best | x {base} (median of rounds) | TTFT ms | TTFT x {base} |")
    print("|---|---|---|---|---|---|")
    out = []
    for p, t, h in variants:
        v, base = name[(p, t, h)], name[(patterns[0], t, h)]
        ratios = [a / b for a, b in zip(per[v], per[base], strict=True)]
        first = [b / a for a, b in zip(ttft[v], ttft[base], strict=True)]
        row = {"pattern": p, "team": t or "default", "head": h or "as-is", "tokens_per_s": per[v], "ttft_s": ttft[v]}
        row.update(ratio_median=statistics.median(ratios), ttft_ratio_median=statistics.median(first))
        out.append(row)
        print(
            f"| {v} | {statistics.median(per[v]):.2f} | {max(per[v]):.2f} | {row['ratio_median']:.2f} "
            f"| {statistics.median(ttft[v]) * 1e3:.0f} | {row['ttft_ratio_median']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
