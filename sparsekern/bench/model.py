"""Model suite: a Hugging Face causal LM, dense vs sparsified, end to end.

The model is built from a small Llama config with random weights (no download), or loaded from a
local directory (``--model PATH``). Rows: prefill latency, decode tokens/s (greedy, KV cache) and
memory (weight bytes; peak allocated on CUDA). The sparsified variant goes through
``sparsekern.sparsify``; where that or ``transformers`` is missing the suite is skipped with a
note saying why.
"""

from __future__ import annotations

import copy
import importlib.util
import time

import torch

from sparsekern.bench.common import PROMISE, Case, Context
from sparsekern.bench.timing import Budget, measure

PATTERNS = ("2:4",)


def _config(ctx: Context):
    from transformers import LlamaConfig

    # NOTE: ~1/4 of Llama-7B per layer on CPU (hidden 1024) keeps a prefill of 128 tokens under
    # ~0.3 s on 2 cores; on a GPU a 7B-wide layer stack shows the real decode regime.
    wide = ctx.device.type == "cuda"
    return LlamaConfig(
        hidden_size=4096 if wide else 1024,
        intermediate_size=11008 if wide else 2816,
        num_hidden_layers=4,
        num_attention_heads=32 if wide else 8,
        num_key_value_heads=32 if wide else 8,
        vocab_size=32000,
        max_position_embeddings=4096,
    )


def _load(ctx: Context, path: str | None):
    from transformers import AutoModelForCausalLM

    if path:
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=ctx.dtype)
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(ctx), torch_dtype=ctx.dtype)
    return model.to(ctx.device).eval()


def _weight_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _decode_tps(model, ids: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return new_tokens / (time.perf_counter() - t0)


def _measure_variant(ctx: Context, model, label: str, base: dict, dense: dict | None) -> dict:
    seq, new_tokens = (128, 8) if ctx.quick else (512, 32)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), device=ctx.device)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    budget = ctx.budget if ctx.quick else Budget(seconds=1.0, min_reps=3, max_reps=10)
    prefill = measure(lambda i: model(input_ids=i, use_cache=False), [(ids,)], ctx.device, budget)
    tps = _decode_tps(model, ids[:, :16], new_tokens, ctx.device)
    row = {
        **base,
        "pattern": label,
        "backend": "auto",
        "kind": "model",
        **prefill.as_dict(),
        "prefill_tokens": seq,
        "decode_tokens_per_s": tps,
        "weights_mb": _weight_bytes(model) / 2**20,
        "peak_mb": torch.cuda.max_memory_allocated(ctx.device) / 2**20 if ctx.device.type == "cuda" else None,
        "speedup": dense["median_ms"] / prefill.median_ms if dense else 1.0,
    }
    if dense:
        row["decode_speedup"] = tps / dense["decode_tokens_per_s"]
        row["promise_ok"] = row["speedup"] >= PROMISE and row["decode_speedup"] >= PROMISE
    return row


def _run(ctx: Context, path: str | None, patterns) -> list[dict]:
    if importlib.util.find_spec("transformers") is None:
        ctx.note("model suite skipped: transformers is not installed (pip install 'sparsekern[hf]')")
        return []
    if importlib.util.find_spec("sparsekern.nn.swap") is None:
        ctx.note("model suite skipped: sparsekern.sparsify (sparsekern/nn/swap.py) is not available in this build")
        return []
    import sparsekern as sk

    dense_model = _load(ctx, path)
    base = {
        "suite": "model",
        "case": path or "llama-random-4l",
        "rows": 1,
        "dtype": str(ctx.dtype).removeprefix("torch."),
    }
    dense = _measure_variant(ctx, dense_model, "dense", base, None)
    rows = [dense]
    for pattern in patterns:
        model = copy.deepcopy(dense_model)
        try:
            sk.sparsify(model, pattern=pattern, method="magnitude", skip=["lm_head"], progress=False)
        except Exception as exc:  # noqa: BLE001
            ctx.note(f"model suite: sparsify({pattern}) failed: {type(exc).__name__}: {exc}")
            continue
        rows.append(_measure_variant(ctx, model, pattern, base, dense))
        del model
    return rows


def cases(ctx: Context, path: str | None = None, patterns=None) -> list[Case]:
    return [Case("model", f"model {path or 'llama-random'}", lambda c: _run(c, path, patterns or PATTERNS))]
