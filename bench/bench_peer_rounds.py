"""sparsekern's lean decode against llama.cpp in interleaved rounds: each pair (a sparsekern pattern,
a llama.cpp GGUF type) is timed in turn, round after round, so a slow moment of a shared machine
lands on both engines of a round instead of on whichever ran then.

The suite's ``--peer llama.cpp`` runs every sparsekern variant, then every GGUF: on a busy or
noisy machine that order alone moved a ratio by 20-30% (2026-11-26). Here each round runs, per
pair, ``sk.generate`` (batch 1, the suite's first prompt, ``--new`` tokens, its decode steps timed by
:func:`sparsekern.bench.generate.lean_decode_s`) and then the llama.cpp worker on the same prompt (its own decode timing,
the model loaded once per round outside the timing). Reported: per pair the median and best
tokens/s of each engine and the median of the per-round ratios.

TinyLlama-1.1B shapes (random weights, the suite's seed) run as GGUFs written from the same
weights (F16, then llama.cpp's Q8_0 / Q4_0); SmolLM2 runs the shipped Q4_1 file. Needs the peer's
venv (``bash bench/llamacpp_env.sh``).

    .venv/bin/python bench/bench_peer_rounds.py [--model tinyllama] [--rounds 5] [--new 32]
        [--pairs "2:4+int4g32a32+h8=Q4_0,2:4+int8a32+h8=Q8_0,2:4=F16"] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import tempfile
from pathlib import Path

import torch

from sparsekern.bench import generate, llamacpp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tinyllama", help="tinyllama or smollm2")
    ap.add_argument("--pairs", default="2:4+int4g32a32+h8=Q4_0,2:4+int8a32+h8=Q8_0,2:4=F16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    pairs = [tuple(p.split("=")) for p in args.pairs.split(",")]
    py, _ = llamacpp.find_python()
    prompt = generate.schedule(False)[0][:1]

    with tempfile.TemporaryDirectory(prefix="sparsekern-gguf-") as d:
        paths = {llamacpp.gguf_info(p)["type"]: p for p in llamacpp._ggufs(py, args.model, Path(d))}
        missing = sorted({g for _, g in pairs} - set(paths))
        if missing:
            raise SystemExit(f"--pairs: no GGUF of type {missing} for {args.model} (have {sorted(paths)})")
        dense = generate.load_model(args.model, torch.bfloat16)
        models = {}
        for pattern, _ in pairs:
            if pattern not in models:
                models[pattern] = dense if pattern == "dense" else copy.deepcopy(dense)
                if pattern != "dense":
                    generate.sparsify_pattern(models[pattern], pattern)
        vocab = dense.config.vocab_size
        del dense  # the variants hold their own copies (or it, as "dense")
        gc.collect()
        ids = generate.prompt_ids(vocab, 1, prompt)
        gguf_ids = {g: generate.prompt_ids(llamacpp.gguf_info(paths[g])["vocab"], 1, prompt) for _, g in pairs}
        for m in models.values():  # warm-up: plans, the lean decoder, first-call costs
            generate.lean_decode_s(m, ids[prompt[0]], 2)
        res = {f"{p}={g}": {"sparsekern": [], "llama.cpp": []} for p, g in pairs}
        for r in range(args.rounds):
            for p, g in pairs:
                sk_tps = 1 / generate.lean_decode_s(models[p], ids[prompt[0]], args.new)
                m = llamacpp.run_gguf(py, paths[g], gguf_ids[g], args.new, 1)
                res[f"{p}={g}"]["sparsekern"].append(sk_tps)
                res[f"{p}={g}"]["llama.cpp"].append(1 / m["step_s"])
                print(f"round {r + 1}: {p} {sk_tps:.1f} tok/s, llama.cpp {g} {1 / m['step_s']:.1f}", flush=True)

    print("\n| sparsekern (lean) | tok/s median / best | llama.cpp | tok/s median / best | ratio (median of rounds) |")
    print("|---|---|---|---|---|")
    out = []
    for p, g in pairs:
        a, b = res[f"{p}={g}"]["sparsekern"], res[f"{p}={g}"]["llama.cpp"]
        ratio = statistics.median(x / y for x, y in zip(a, b))
        print(
            f"| {p} | {statistics.median(a):.1f} / {max(a):.1f} | {g} | {statistics.median(b):.1f} / {max(b):.1f} | "
            f"{ratio:.2f}x |"
        )
        out.append(dict(pattern=p, gguf=g, sparsekern_tps=a, llamacpp_tps=b, ratio_median=ratio))
    if args.json:
        meta = dict(
            model=args.model, rounds=args.rounds, new_tokens=args.new, prompt=prompt[0], threads=llamacpp.threads()
        )
        Path(args.json).write_text(json.dumps({"meta": meta, "pairs": out}, indent=1))


if __name__ == "__main__":
    main()
