"""Generate suite: greedy ``model.generate`` of a causal LM, dense vs each sparsity pattern.

Per model (SmolLM2-135M real weights, TinyLlama-1.1B shapes with random weights, or a local
directory), dtype, pattern and batch size, through ``model.generate`` (engine ``sparsekern``) and,
at batch 1, through ``sk.generate``'s lean decode path too (engine ``sparsekern-lean``):

- decode time per step, prefill excluded: ``(t(1 + N new tokens) - t(1 new token)) / N``;
  tokens/s = batch / that;
- time to first token (prefill + one token) at 128 and 512 prompt tokens;
- bytes a decode step must read (every weight once, plus the KV cache), the GB/s that implies and
  its % of the measured read bandwidth (decode at small batch is memory bound: the roofline);
- peak RSS of the process while that variant ran (``/proc/self/clear_refs`` resets the peak);
- for real weights (SmolLM2), the variant's perplexity on the evaluation text, the same windows
  the llama.cpp peer scores its GGUF on.

Sparse variants are pruned by magnitude: speed does not depend on which weights survive.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from pathlib import Path

import torch

from sparsekern.bench.common import Case, Context

PATTERNS = ("dense", "2:4", "1:4", "2:8", "block32x32:0.9")
BATCHES = (1, 4, 8)
PROMPTS = (128, 512)
MODELS = ("smollm2", "tinyllama")


def load_model(name: str, dtype: torch.dtype):
    """``smollm2``, ``tinyllama`` (random weights) or a local Hugging Face directory, in eval mode."""
    from sparsekern.bench import smollm

    if name == "smollm2":
        return smollm.load(dtype)[0]
    if name == "tinyllama":
        return smollm.tinyllama(dtype)
    path = Path(name)
    if not path.is_dir():
        raise ValueError(f"model: expected 'smollm2', 'tinyllama' or a local model directory, got {name!r}")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True).eval()


def _rss_peak_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """The process's peak resident set size in bytes (VmHWM; 0 where /proc is missing)."""
    return _proc_status("VmHWM") or 0


def _proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def step_bytes(model, batch: int, context: int) -> tuple[int, int]:
    """``(weight bytes, KV-cache bytes)`` one decode step reads at ``context`` cached tokens.

    Every parameter and buffer once (shared tensors once), except an input embedding table that is
    not tied to the output head: a step gathers ``batch`` of its rows only.
    """
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    head = getattr(out, "_parameters", {}).get("weight")  # an int8 head (QuantLinear) has none
    tied = head is not None and head.data_ptr() == emb.data_ptr()
    seen, weights = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen or (not tied and t.data_ptr() == emb.data_ptr()):
            continue
        seen.add(t.data_ptr())
        weights += t.numel() * t.element_size()
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * heads * head_dim * context * batch * emb.element_size()
    return weights, kv


def _generate(model, ids: torch.Tensor, new: int, lean: bool = False) -> None:
    if lean:  # sk.generate: greedy, every token; eos none so all `new` tokens are made
        import sparsekern as sk

        sk.generate(model, ids, max_new_tokens=new, eos_token_id=None, pad_token_id=0)
        return
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )


def _timed(model, ids, new: int, reps: int, lean: bool = False) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        _generate(model, ids, new, lean)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def lean_decode_s(model, ids: torch.Tensor, new: int) -> float:
    """Seconds per decode step of one ``sk.generate`` call making ``1 + new`` tokens, timed from the
    first decode step's start to the last one's end (as the llama.cpp worker times its loop).

    NOTE: t(1 + new) - t(1) put two prefills into the difference: with int8 activations a 128-token
    prefill took 1.8-2.6 s against ~0.8 s for 32 TinyLlama decode steps, and on a noisy machine
    single runs came out at 30-160 tok/s for one model (2026-11-26, Zen 4)."""
    import sparsekern as sk
    from sparsekern.lean.generate import decoder_for

    dec = decoder_for(model)
    make, marks, prior = dec.stepper, [], vars(dec).get("stepper")

    def stepper(batch):
        step = make(batch)

        def timed(*args):
            t0 = time.perf_counter()
            out = step(*args)
            marks.append((t0, time.perf_counter()))
            return out

        return timed

    dec.stepper = stepper  # shadows the method for this call only
    try:
        sk.generate(model, ids, max_new_tokens=1 + new, eos_token_id=None, pad_token_id=0)
    finally:
        if prior is None:
            del dec.stepper
        else:
            dec.stepper = prior
    return (marks[-1][1] - marks[0][0]) / len(marks)


def eval_windows(ctx: Context, name: str, who: str = "generate suite"):
    """SmolLM2's evaluation windows (this suite's and the llama.cpp peer's); None for random
    weights, and None with a note from ``who`` when the model or the text is missing."""
    if name != "smollm2":
        return None
    from sparsekern.bench import smollm

    try:
        return smollm.eval_windows(1024 if ctx.quick else 4096)
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as exc:
        ctx.note(f"{who}: {name} perplexity skipped: {exc}")
        return None


def schedule(quick: bool) -> tuple[tuple[int, ...], int, int]:
    """``(prompt lengths, new tokens, repetitions)`` of a run; the llama.cpp peer uses the same."""
    return (PROMPTS[:1], 8, 1) if quick else (PROMPTS, 32, 3)


def prompt_ids(vocab: int, batch: int, prompts, seed: int = 0) -> dict[int, torch.Tensor]:
    """The seeded random prompts ``{length: [batch, length]}`` every engine is timed on."""
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randint(1, vocab, (batch, p), generator=g) for p in prompts}


def measure_variant(model, batch: int, prompts, new_tokens: int, reps: int, seed: int = 0, lean: bool = False) -> dict:
    """Decode and time-to-first-token timings of one model at one batch size (no roofline here);
    ``lean``: through ``sk.generate`` (the lean decode path) instead of ``model.generate``."""
    ids = prompt_ids(model.config.vocab_size, batch, prompts, seed)
    for p in prompts:  # warm-up at every prefill shape: kernel plans and first-call costs stay out
        _generate(model, ids[p], 2, lean)
    ttft = {p: _timed(model, ids[p], 1, reps, lean) for p in prompts}
    if lean:  # the decode steps themselves (lean_decode_s)
        step = statistics.median(lean_decode_s(model, ids[prompts[0]], new_tokens) for _ in range(reps))
    else:
        t_n = _timed(model, ids[prompts[0]], 1 + new_tokens, reps, lean)
        # Under heavy load t(1+N) can come out below t(1): say so (NaN) rather than report a made-up rate.
        step = (t_n - ttft[prompts[0]]) / new_tokens if t_n > ttft[prompts[0]] else float("nan")
    return {"step_s": step, "ttft_s": ttft, "tokens_per_s": batch / step}


def sparsify_pattern(model, pattern: str, method: str = "magnitude", **kw) -> None:
    """``sk.sparsify`` with a benchmark pattern, e.g. ``"2:4"`` or ``"2:4+int4g128a32"`` (quantized
    kept weights, see :func:`sparsekern.bench.layer.parse_quant`); a last ``"+h8"``: the LM head
    as int8 too (``head="int8"``, e.g. ``"2:4+int4g32a32+h8"``)."""
    import sparsekern as sk
    from sparsekern.bench.layer import parse_quant

    base, *specs = pattern.split("+")
    if specs and specs[-1] == "h8":
        kw["head"] = "int8"
        specs.pop()
    if len(specs) > 1:
        raise ValueError(f"pattern: expected BASE[+QUANT][+h8], got {pattern!r}")
    if specs:
        quant, group_size, symmetric, act_block = parse_quant(specs[0])
        kw.update(quant=quant, group_size=group_size, symmetric=symmetric, act_block=act_block)
    sk.sparsify(model, base, method, progress=False, **kw)


def _variant(dense, pattern: str):
    if pattern == "dense":
        return dense
    model = copy.deepcopy(dense)
    sparsify_pattern(model, pattern)
    return model


def _run(ctx: Context, name: str, patterns, batches, dtype: torch.dtype) -> list[dict]:
    prompts, new_tokens, reps = schedule(ctx.quick)
    try:
        dense = load_model(name, dtype)
    except (ModuleNotFoundError, ValueError, OSError) as exc:
        ctx.note(f"generate suite: {name} skipped: {exc}")
        return []
    rows, base_tps = [], {}
    windows = eval_windows(ctx, name)
    for pattern in patterns:
        _rss_peak_reset()
        try:
            model = _variant(dense, pattern)
        except Exception as exc:  # noqa: BLE001
            ctx.note(f"generate suite: sparsify({pattern}) on {name} failed: {type(exc).__name__}: {exc}")
            continue
        first = len(rows)
        # The lean path (sk.generate) at batch 1 beside model.generate: the llama.cpp peer's batch.
        runs = [(b, False) for b in batches] + ([(1, True)] if 1 in batches and _lean_ok(model) else [])
        for batch, lean in runs:
            m = measure_variant(model, batch, prompts, new_tokens, reps, lean=lean)
            if m["step_s"] != m["step_s"]:
                ctx.note(
                    f"generate suite: {name} {pattern} batch {batch}: t(1+{new_tokens}) <= t(1), decode not measurable"
                )
            weights, kv = step_bytes(model, batch, prompts[0] + new_tokens // 2)
            nbytes = weights + kv
            gbs = nbytes / m["step_s"] / 1e9
            if pattern == "dense" and not lean:
                base_tps[batch] = m["tokens_per_s"]
            dense_tps = base_tps.get(batch)
            rows.append(
                {
                    "suite": "generate",
                    "engine": "sparsekern-lean" if lean else "sparsekern",
                    "case": name,
                    "rows": batch,
                    "pattern": pattern,
                    "dtype": str(dtype).removeprefix("torch."),
                    "backend": "auto",
                    "kind": "generate",
                    "median_ms": m["step_s"] * 1e3,
                    "decode_ms_per_step": m["step_s"] * 1e3,
                    "tokens_per_s": m["tokens_per_s"],
                    **{f"ttft_ms_{p}": t * 1e3 for p, t in m["ttft_s"].items()},
                    "new_tokens": new_tokens,
                    "weight_mb": weights / 2**20,
                    "kv_mb": kv / 2**20,
                    "bytes_per_step": nbytes,
                    "gbs": gbs,
                    "roof_pct": 100.0 * gbs / ctx.roof.bandwidth_gbs,
                    "peak_rss_mb": peak_rss() / 2**20,
                    "speedup": m["tokens_per_s"] / dense_tps if dense_tps else None,
                }
            )
        if windows is not None:  # after the timings: its logits would raise their peak RSS
            from sparsekern.bench import text

            score = text.perplexity(model, windows)
            for row in rows[first:]:
                row.update(ppl=score.ppl, ppl_tokens=score.tokens)
        if model is not dense:
            del model
            gc.collect()
    del dense
    gc.collect()
    return rows


def _lean_ok(model) -> bool:
    from sparsekern.lean.decoder import check_model

    try:
        check_model(model, 0)
    except ValueError:
        return False
    return True


def cases(
    ctx: Context,
    models=None,
    patterns=None,
    batches=None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    peer: str | None = None,
) -> list[Case]:
    """The suite's cases; ``peer="llama.cpp"`` adds the same models run by llama.cpp
    (:mod:`sparsekern.bench.llamacpp`; ``LlamaCppMissing`` at once when its venv is absent)."""
    models = tuple(models or (MODELS[:1] if ctx.quick else MODELS))
    patterns = tuple(patterns or (("dense", "2:4") if ctx.quick else PATTERNS))
    if "dense" not in patterns:
        patterns = ("dense", *patterns)  # the speedups need it
    batches = tuple(batches or ((1,) if ctx.quick else BATCHES))
    dtypes = dtypes or ((ctx.dtype,) if ctx.quick else (torch.float32, torch.bfloat16))
    if peer not in (None, "llama.cpp"):
        raise ValueError(f"peer: expected None or 'llama.cpp', got {peer!r}")
    peers = []
    if peer:
        from sparsekern.bench import llamacpp

        peers = llamacpp.cases(ctx, models)
    return [
        Case(
            "generate",
            f"generate {m} {str(d).removeprefix('torch.')}",
            lambda c, m=m, d=d: _run(c, m, patterns, batches, d),
        )
        for m in models
        for d in dtypes
    ] + peers


def print_rows(res: dict, console) -> None:
    from rich.table import Table

    rows = [r for r in res["rows"] if r.get("suite") == "generate"]
    if not rows:
        return
    bw = res["roofline"]["bandwidth_gbs"]
    t = Table(title=f"generate suite: greedy decode (read bandwidth measured {bw:.1f} GB/s)", header_style="bold")
    ttfts = sorted({k for r in rows for k in r if k.startswith("ttft_ms_")}, key=lambda k: int(k.rsplit("_", 1)[1]))
    ppl = ("ppl",) if any("ppl" in r for r in rows) else ()  # measured where weights are real (SmolLM2)
    heads = ("model", "engine", "dtype", "pattern", "B", "ms/step", "tok/s", "x dense")
    cols = (*heads, *[f"TTFT{k[8:]} ms" for k in ttfts])
    for c in (*cols, "MB/step", "GB/s", "%roof", "RSS MB", *ppl):
        t.add_column(c, justify="left" if c in ("model", "engine", "dtype", "pattern") else "right")
    for r in rows:
        t.add_row(
            r["case"], r.get("engine", "sparsekern"), r["dtype"].replace("bfloat", "bf").replace("float", "fp"), r["pattern"], str(r["rows"]),
            f"{r['decode_ms_per_step']:.1f}", f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}x" if r.get("speedup") else "-",
            *[f"{r[k]:.0f}" if k in r else "-" for k in ttfts],
            f"{r['bytes_per_step'] / 2**20:.0f}", f"{r['gbs']:.1f}", f"{r['roof_pct']:.0f}%", f"{r['peak_rss_mb']:.0f}",
            *([f"{r['ppl']:.2f}" if "ppl" in r else "-"] if ppl else []),
        )  # fmt: skip
    console.print(t)


def _bar(r: dict) -> str:
    """A plot bar's label: the pattern, and the engine where it is not model.generate."""
    engine = r.get("engine", "sparsekern")
    return r["pattern"] + ("" if engine == "sparsekern" else " lean" if engine == "sparsekern-lean" else f" {engine}")


def plot(res: dict, stem: Path) -> dict:
    """``<stem>-generate.png``: decode tokens/s per pattern, one panel per model and dtype."""
    rows = [r for r in res["rows"] if r.get("suite") == "generate"]
    if not rows:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["case"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (case, dtype) in zip(axes[0], panels):
        sub = [r for r in rows if r["case"] == case and r["dtype"] == dtype]
        patterns = list(dict.fromkeys(_bar(r) for r in sub))
        batches = sorted({r["rows"] for r in sub})
        width = 0.8 / len(batches)
        for j, b in enumerate(batches):
            tps = {_bar(r): r["tokens_per_s"] for r in sub if r["rows"] == b}
            xs = [i + j * width for i in range(len(patterns))]
            ax.bar(xs, [tps.get(p, 0.0) for p in patterns], width, label=f"batch {b}")
        ax.set_xticks([i + width * (len(batches) - 1) / 2 for i in range(len(patterns))], patterns, fontsize=8)
        ax.set_title(f"{case} {dtype}: decode tokens/s", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{res['meta']['device_name']} - torch {res['meta']['torch']} - {res['meta']['git_sha'][:12]}", fontsize=8
    )
    fig.tight_layout()
    path = f"{stem}-generate.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"generate_png": path}
