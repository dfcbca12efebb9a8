"""Peak RSS of a fresh process that loads a saved model and runs ``generate`` on a long prompt.

The issue-14 memory target: with a 512-token prompt, the 2:4 fp32 model's peak RSS is at most
0.65x the dense model's. Each measurement is its own process, so nothing the parent built (the
dense model it pruned, a warm allocator) counts: the child loads the folder with transformers'
``from_pretrained`` (sparsekern's quantizer keeps the compressed form), greedy-generates
``--new`` tokens from a random ``--prompt``-token prompt and prints ``VmHWM`` (the kernel's
peak resident set), the RSS before loading, after loading, and the dense copies the dispatch holds.

``--cache cold`` gives each child an empty dispatch cache (its first calls time the candidates,
the transient dense weight of that timing included: a user's first run); ``warm`` shares one
cache that a first, unreported child fills.

    .venv/bin/python bench/bench_peak_rss.py --dir /tmp/sk-rss --patterns dense,2:4 --rounds 3

The folders (TinyLlama-1.1B shapes, random weights, fp32; magnitude pruning, ``lm_head`` kept
dense) are written under ``--dir`` when missing: ~4.4 GB dense, ~2.6 GB at 2:4.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch, sparsekern
from transformers import AutoModelForCausalLM
from sparsekern.bench.generate import _proc_status, peak_rss
from sparsekern.plan import dense_copy_bytes
path, prompt, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = _proc_status("VmRSS")
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
load_s, loaded = time.perf_counter() - t, _proc_status("VmRSS")
ids = torch.randint(3, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    gen_s = time.perf_counter() - t
assert out.shape[1] == prompt + new, out.shape
print(json.dumps({"base": base, "loaded": loaded, "peak": peak_rss(), "dense_copies": dense_copy_bytes(),
                  "load_s": load_s, "generate_s": gen_s}))
"""


def make_folder(root: Path, pattern: str) -> Path:
    folder = root / ("tinyllama-dense" if pattern == "dense" else f"tinyllama-{pattern.replace(':', 'of')}")
    if (folder / "model.safetensors").exists():
        return folder
    import sparsekern as sk
    from sparsekern.bench import smollm

    model = smollm.tinyllama(dtype=None, seed=0)
    if pattern != "dense":
        sk.sparsify(model, pattern=pattern, method="magnitude", skip=["lm_head"])
    sk.save(model, folder)
    return folder


def measure(folder: Path, prompt: int, new: int, cache: str) -> dict:
    env = dict(os.environ, SPARSEKERN_CACHE_DIR=cache)
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(prompt), str(new)],
        capture_output=True, text=True, env=env, timeout=1800,
    )  # fmt: skip
    if run.returncode != 0:
        raise RuntimeError(f"child failed on {folder}:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="where the model folders are (written when missing)")
    ap.add_argument("--patterns", default="dense,2:4")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", choices=("cold", "warm"), default="cold")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    patterns = args.patterns.split(",")
    folders = {p: make_folder(args.dir, p) for p in patterns}
    rows: dict[str, list[dict]] = {p: [] for p in patterns}
    with tempfile.TemporaryDirectory() as warm:
        if args.cache == "warm":
            for p in patterns:
                measure(folders[p], args.prompt, args.new, warm)
        for r in range(args.rounds):
            order = random.sample(patterns, len(patterns))
            for p in order:
                with tempfile.TemporaryDirectory() as cold:
                    row = measure(folders[p], args.prompt, args.new, cold if args.cache == "cold" else warm)
                rows[p].append(row)
                print(f"round {r} {p}: peak {row['peak'] / 2**20:.0f} MiB", flush=True)
    mib = 2**20
    dense_peak = statistics.median(x["peak"] for x in rows["dense"]) if "dense" in rows else None
    print(
        f"\nprompt {args.prompt}, {args.new} new tokens, fp32, cache {args.cache}, {args.rounds} fresh processes each"
    )
    print(
        "| pattern | checkpoint MiB | RSS before load MiB | after load MiB | peak MiB (median, min-max) | x dense | dense copies MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for p in patterns:
        peaks = [x["peak"] / mib for x in rows[p]]
        med = statistics.median(x["peak"] for x in rows[p])
        size = (folders[p] / "model.safetensors").stat().st_size / mib
        ratio = f"{med / dense_peak:.3f}" if dense_peak else "-"
        print(
            f"| {p} | {size:.0f} | {statistics.median(x['base'] for x in rows[p]) / mib:.0f} "
            f"| {statistics.median(x['loaded'] for x in rows[p]) / mib:.0f} | {med / mib:.0f} ({min(peaks):.0f}-{max(peaks):.0f}) "
            f"| {ratio} | {max(x['dense_copies'] for x in rows[p]) / mib:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
