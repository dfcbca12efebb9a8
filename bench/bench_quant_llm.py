"""Quantized + sparse quality: SmolLM2-135M (real weights) at 2:4, kept weights in bf16, int8, int4.

Each method prunes every decoder linear to 2:4 once (sequential calibration, as
bench/bench_prune_llm.py); the pruned model is then evaluated in fp32 and bf16, and quantized
with :func:`sparsekern.quantize` (round to nearest) to int8 (one scale per row and per group) and
int4 (per group, symmetric and with zero points), run in bf16. Perplexity on consecutive
windows of the second half of the Britannica text; the ratio column compares with the bf16 2:4
model (the issue's yardstick). Weight bytes are those of the decoder linears as stored.

    .venv/bin/python bench/bench_quant_llm.py [--methods wanda,sparsegpt] [--group-size 64] [--seed 0]

SmolLM2's in_features are 576 and 1536: group 64 divides both, 128 does not divide 576.
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


def _linear_bytes(model) -> int:
    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, sk.SparseLinear):
            total += mod.sparse_weight.nbytes()
        elif isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0, help="the calibration windows' draw")
    args = ap.parse_args()

    dense, tok = smollm.load()
    ids = text.token_ids(tok)
    cal = text.calibration_batches(ids, args.nsamples, args.seqlen, seed=args.seed)
    windows = text.eval_windows(ids, 256, args.eval_tokens)
    print(f"SmolLM2-135M, torch {torch.__version__}, {torch.get_num_threads()} threads, group {args.group_size}")
    rows = [("dense", "fp32", text.perplexity(dense, windows).ppl, None, _linear_bytes(dense), 0.0)]
    rows.append(("dense", "bf16", text.perplexity(copy.deepcopy(dense).bfloat16(), windows).ppl, None,
                 _linear_bytes(dense) // 2, 0.0))  # fmt: skip
    g = args.group_size
    for method in args.methods.split(","):
        pruned = copy.deepcopy(dense)
        t = time.perf_counter()
        sk.sparsify(pruned, args.pattern, method, calibration=None if method == "magnitude" else cal, progress=False)
        prune_s = time.perf_counter() - t
        base16 = None
        variants = [("fp32", None), ("bf16", None), ("int8 per row", ("int8", 0, True)),
                    (f"int8 g{g}", ("int8", g, True)), (f"int4 g{g}", ("int4", g, True)),
                    (f"int4 g{g} zero points", ("int4", g, False))]  # fmt: skip
        for label, q in variants:
            model = copy.deepcopy(pruned)
            if label != "fp32":
                model = model.bfloat16()
            if q is not None:
                sk.quantize(model, q[0], q[1], q[2])
            t = time.perf_counter()
            ppl = text.perplexity(model, windows).ppl
            if label == "bf16":
                base16 = ppl
            ratio = None if base16 is None else ppl / base16
            rows.append((f"{method} {args.pattern}", label, ppl, ratio, _linear_bytes(model), prune_s))
            print(f"{method} {label}: ppl {ppl:.2f} ({time.perf_counter() - t:.0f} s eval)", flush=True)
            del model
        if method != "sparsegpt":
            continue
        # Joint: rounding inside SparseGPT's sweep (sparsify(..., quant=)), pruned afresh.
        for label, quant, symmetric in ((f"int4 g{g} joint", "int4", True), (f"int4 g{g} zero points joint", "int4", False),
                                        (f"int8 g{g} joint", "int8", True)):  # fmt: skip
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            sk.sparsify(model, args.pattern, method, calibration=cal, progress=False, quant=quant, group_size=g,
                        symmetric=symmetric)  # fmt: skip
            prune_s = time.perf_counter() - t
            model = model.bfloat16()  # scales to bf16, as the RTN rows (integers unchanged)
            ppl = text.perplexity(model, windows).ppl
            rows.append((f"{method} {args.pattern}", label, ppl, ppl / base16, _linear_bytes(model), prune_s))
            print(f"{method} {label}: ppl {ppl:.2f} (prune {prune_s:.0f} s)", flush=True)
            del model
    print(f"\nperplexity on {args.eval_tokens} tokens (windows of 256), second half of the text\n")
    print("| model | weights | perplexity | x bf16 2:4 | decoder linear bytes (MB) |")
    print("|---|---|---|---|---|")
    for name, label, ppl, ratio, nbytes, _ in rows:
        r = "-" if ratio is None else f"{ratio:.3f}"
        print(f"| {name} | {label} | {ppl:.2f} | {r} | {nbytes / 1e6:.1f} |")


if __name__ == "__main__":
    main()
