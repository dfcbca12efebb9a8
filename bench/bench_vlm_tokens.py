"""LLaVA-shaped decoder with visual-token pruning (``sparsekern.prune_tokens``): TTFT and decode.

    .venv/bin/python bench/bench_vlm_tokens.py [--device cpu|cuda] [--dtype float32|bfloat16]
        [--hidden 2048] [--layers 16] [--image-tokens 576] [--text-tokens 64] [--keep 0.25]
        [--prune-layer 2] [--new 32] [--reps 5] [--quick]

Random weights built from configs (nothing is downloaded): a small CLIP vision tower (one layer;
its patch grid gives ``--image-tokens``) and a Llama text model big enough that its linears
dominate. One prompt: half the text, the image tokens, the other half of the text.

- TTFT: the prefill forward (vision tower + language model, logits of the last position only,
  KV cache filled), dense vs pruned, interleaved rep by rep on the same model (the handle is
  applied and removed between calls, outside the timed span). Median and 20/80% quantiles.
- decode: ``--new`` greedy steps on the cache the prefill left (dense: all tokens; pruned: the
  kept ones), timed as one loop per rep; tokens/s = new / median loop time.
- quality: cosine of the next-token logits (after the prefill) pruned vs dense, and the first
  greedy step where the pruned tokens leave the dense ones (random weights: only a sanity check).

``--quick`` runs a tiny shape in seconds (a smoke test of this script, not a measurement).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import sparsekern
from sparsekern import dispatch
from sparsekern.bench.runner import _resolve_device, git_sha
from sparsekern.bench.timing import Timing, summarize

IMAGE_TOKEN = 32000  # llava-1.5's image token id, inside the vocabulary below
VOCAB = 32064
PATCH = 14


def build(args, device: torch.device, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    side = math.isqrt(args.image_tokens)
    if side * side != args.image_tokens:
        raise ValueError(f"--image-tokens: expected a square number (a patch grid), got {args.image_tokens}")
    vision = CLIPVisionConfig(
        image_size=side * PATCH,
        patch_size=PATCH,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    text = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        vocab_size=VOCAB,
    )
    # vision_feature_layer=-1: the one layer's output ("default" strategy drops CLS: side^2 tokens).
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-1)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg)
    return model.to(dtype).eval()


def inputs(args, model, device: torch.device, dtype: torch.dtype):
    half = args.text_tokens // 2
    text = torch.randint(1, IMAGE_TOKEN, (1, args.text_tokens), device=device)
    image = torch.full((1, args.image_tokens), IMAGE_TOKEN, device=device)
    ids = torch.cat([text[:, :half], image, text[:, half:]], dim=1)
    size = model.config.vision_config.image_size
    return ids, torch.randn(1, 3, size, size, device=device, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model, ids, px):
    return model(input_ids=ids, pixel_values=px, use_cache=True, logits_to_keep=1)


def decode(model, out, prompt_len: int, n_new: int) -> list[int]:
    """Greedy steps on ``out.cache``; each token at the position it has in the dense sequence."""
    cache, tok, tokens = out.cache, out.logits[:, -1].argmax(-1, keepdim=True), []
    for t in range(n_new):
        tokens.append(int(tok))
        pos = torch.tensor([[prompt_len + t]], device=tok.device)
        step = model(input_ids=tok, cache=cache, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, tok = step.cache, step.logits[:, -1].argmax(-1, keepdim=True)
    return tokens


@torch.inference_mode()
def run(args) -> dict:
    device = _resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = build(args, device, dtype)
    ids, px = inputs(args, model, device, dtype)
    prune = {"keep": args.keep, "layers": (args.prune_layer,), "modality": "image"}
    sparsekern.prune_tokens(model, **prune).remove()  # arguments checked before any timing

    ttft: dict[str, list[float]] = {"dense": [], "pruned": []}
    loop: dict[str, list[float]] = {"dense": [], "pruned": []}
    first: dict[str, torch.Tensor] = {}
    tokens: dict[str, list[int]] = {}
    for rep in range(args.warmup + args.reps):
        for name in ("dense", "pruned"):
            handle = sparsekern.prune_tokens(model, **prune) if name == "pruned" else None
            _sync(device)
            t0 = time.perf_counter()
            out = prefill(model, ids, px)
            _sync(device)
            t1 = time.perf_counter()
            toks = decode(model, out, ids.shape[1], args.new)
            _sync(device)
            t2 = time.perf_counter()
            if handle is not None:
                kept = handle.kept_indices.shape[1]
                handle.remove()
            if rep >= args.warmup:
                ttft[name].append(t1 - t0)
                loop[name].append(t2 - t1)
            first[name], tokens[name] = out.logits[0, -1].float(), toks
    t = {name: summarize(v) for name, v in ttft.items()}
    d = {name: summarize(v) for name, v in loop.items()}
    cos = torch.nn.functional.cosine_similarity(first["dense"], first["pruned"], dim=0).item()
    diverge = next((i for i, (a, b) in enumerate(zip(tokens["dense"], tokens["pruned"])) if a != b), None)
    return {"device": device, "dtype": dtype, "ttft": t, "decode": d, "cos": cos, "diverge": diverge, "kept": kept}


def report(args, res: dict) -> None:
    t: dict[str, Timing] = res["ttft"]
    d: dict[str, Timing] = res["decode"]
    dev = res["device"]
    print(
        f"{dispatch.device_name(dev)}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"git {git_sha()[:12]}, {str(res['dtype']).removeprefix('torch.')}"
    )
    print(
        f"Llama text model: hidden {args.hidden}, intermediate {args.intermediate or 3 * args.hidden}, "
        f"{args.layers} layers, {args.heads} heads; prompt {args.text_tokens} text + {args.image_tokens} image tokens; "
        f"keep {args.keep} of the image tokens after layer {args.prune_layer} -> {res['kept']} tokens"
    )
    print(f"\n{'':>8} {'TTFT ms':>9} {'20/80%':>15} {'decode tok/s':>13} {'loop ms 20/80%':>17}")
    for name in ("dense", "pruned"):
        tps = args.new / (d[name].median_ms / 1e3)
        print(
            f"{name:>8} {t[name].median_ms:>9.1f} {t[name].p20_ms:>7.1f}/{t[name].p80_ms:<7.1f} {tps:>13.1f}"
            f" {d[name].p20_ms:>8.1f}/{d[name].p80_ms:<8.1f}"
        )
    print(
        f"{'speedup':>8} {t['dense'].median_ms / t['pruned'].median_ms:>8.2f}x {'':>15}"
        f" {d['dense'].median_ms / d['pruned'].median_ms:>12.2f}x"
    )
    diverge = "never" if res["diverge"] is None else f"step {res['diverge']}"
    print(
        f"\nnext-token logit cosine vs dense: {res['cos']:.5f}; greedy tokens leave dense at: {diverge} (of {args.new})"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=None, help="default 3 x hidden")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None, help="default = heads")
    ap.add_argument("--image-tokens", type=int, default=576)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--prune-layer", type=int, default=2)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny shape, 2 reps: checks that the script runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.heads, args.image_tokens, args.text_tokens = 128, 4, 4, 64, 16
        args.new, args.reps, args.warmup = 4, 2, 1
    report(args, run(args))


if __name__ == "__main__":
    main()
