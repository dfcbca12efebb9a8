"""``sparsekern bench``: argument parsing only; the work is in :mod:`sparsekern.bench.runner`."""

from __future__ import annotations

import argparse

import torch

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _csv(kind):
    def parse(text: str):
        try:
            return tuple(kind(v) for v in text.split(",") if v)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}: {exc}") from exc

    return parse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time sparse kernels vs dense per layer shape, rows and pattern; tune dispatch",
        description="Layer / attention / model benchmarks with roofline, JSON and PNG output.",
    )
    p.add_argument("--quick", action="store_true", help="a small subset that runs in about a minute")
    p.add_argument("--suite", choices=("layer", "attention", "model", "serve", "generate", "all"), action="append",
                   help="suite to run (repeatable; default: layer and attention; serve: see --clients; "
                        "generate: greedy decode of SmolLM2 / TinyLlama, see --model, --batch)")  # fmt: skip
    p.add_argument("--tune", action="store_true", help="re-measure dispatch choices for every benchmarked shape")
    p.add_argument(
        "--out",
        default="sparsekern_results",
        help="results directory (default: %(default)s; commit curated runs to bench/results/)",
    )
    p.add_argument("--no-out", action="store_true", help="write no files")
    p.add_argument("--compare", metavar="OLD.json", help="print new/old time ratios for rows found in an earlier run; "
                   "with --suite serve: a second model folder (e.g. the dense one) served the same way")  # fmt: skip
    p.add_argument(
        "--clients", type=_csv(int), default=(1, 4, 8), help="serve suite: concurrent clients (default 1,4,8)"
    )
    p.add_argument("--duration", type=float, default=30.0, help="serve suite: seconds of load per client count")
    p.add_argument("--max-tokens", type=int, default=64, help="serve suite: tokens generated per request")
    p.add_argument("--server", choices=("sparsekern", "vllm"), default="sparsekern",
                   help="serve suite: serve with sparsekern serve (default) or vllm serve (needs vLLM)")  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES),
                   help="default: bf16 on cuda, fp32 on cpu; serve suite: the servers' --dtype (default: auto)")  # fmt: skip
    p.add_argument("--shapes", type=_csv(str), help="layer shapes by name, e.g. llama7b.attn,vit-b.fc1")
    p.add_argument("--rows", type=_csv(int), help="rows of x, e.g. 1,8,512")
    p.add_argument("--patterns", type=_csv(str), help="e.g. dense,2:4,block32x32:0.9")
    p.add_argument("--backends", type=_csv(str), help="backends to time (default: all registered)")
    p.add_argument(
        "--model",
        help="model suite: a local Hugging Face model directory (default: random small Llama); generate suite: "
        "smollm2, tinyllama (TinyLlama-1.1B shapes, random weights) or a directory (default: both; --quick: smollm2)",
    )
    p.add_argument("--batch", type=_csv(int), help="generate suite: batch sizes (default: 1,4,8; --quick: 1)")
    p.add_argument("--peer", choices=("llama.cpp",),
                   help="generate suite: also run the same models through llama.cpp (batch 1; needs the venv "
                        "that bash bench/llamacpp_env.sh builds)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.suite and "serve" in args.suite:  # a server under load, not kernel timings: its own runner
        from sparsekern.bench import serve

        if not args.model:
            raise SystemExit("sparsekern bench --suite serve: --model DIR is required")
        out = None if args.no_out else ("bench/results" if args.out == "sparsekern_results" else args.out)
        dtype = str(_DTYPES[args.dtype]).removeprefix("torch.") if args.dtype else "auto"  # the servers' names
        res = serve.run(args.model, compare=args.compare, clients=args.clients, duration=args.duration,
                        max_tokens=args.max_tokens, device=args.device or "cpu", dtype=dtype, out=out,
                        server=args.server)  # fmt: skip
        return 0 if all(r["requests"] and not r["failed"] for m in res["models"] for r in m["rows"]) else 1
    if args.peer:  # refuse before the roofline and the sparsekern runs, not after them
        if not args.suite or "generate" not in args.suite:
            raise SystemExit(f"sparsekern bench --peer {args.peer}: needs --suite generate")
        from sparsekern.bench.llamacpp import LlamaCppMissing, find_python

        try:
            find_python()
        except LlamaCppMissing as exc:
            raise SystemExit(str(exc)) from None
    from sparsekern.bench.runner import run

    res = run(
        suites=args.suite or ("layer", "attention"),
        quick=args.quick,
        device=args.device,
        dtype=_DTYPES[args.dtype] if args.dtype else None,
        out=None if args.no_out else args.out,
        tune=args.tune,
        compare=args.compare,
        model_path=args.model,
        shapes=args.shapes,
        rows=args.rows,
        patterns=args.patterns,
        backends=args.backends,
        batches=args.batch,
        peer=args.peer,
        progress=not args.no_progress,
    )
    return 0 if res["rows"] or res["notes"] else 1
