"""Mixtral-shaped MoE, batch-1 greedy decode: dense vs N:M-sparse experts (issue 17's target).

Random weights (speed does not depend on which weights survive; pruned by magnitude), the
shape the issue names: hidden 1024, 8 experts, top-2, 4 layers, intermediate 3584 (Mixtral's
3.5x), 16 / 8 heads, vocab 32000. Variants, each timed in this one process:

- ``dense``: transformers' own experts forward (its default experts implementation);
- ``experts 2:4``: only the fused experts swapped to ``SparseExperts``;
- ``2:4``: experts and attention (``sparsify``'s default; lm_head stays dense);
- ``2:4 + lm_head``: everything, the 32000 x 1024 head too (at this size it is a quarter of
  the bytes a token reads).

Decode time per token = (t(1 + N new) - t(1 new)) / N, medians of ``--reps`` runs. Run it alone:

    .venv/bin/python bench/bench_moe_decode.py [--dtype float32] [--new 32] [--reps 3] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch


def mixtral(dtype: torch.dtype, quick: bool):
    from transformers import MixtralConfig, MixtralForCausalLM

    shape = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, vocab_size=32000)
    if quick:
        shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=1000)
    cfg = MixtralConfig(
        **shape, num_attention_heads=16, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).to(dtype).eval()


def weight_bytes_per_token(model) -> int:
    """Bytes of the weights one decode token reads: every non-expert weight, top-k of each expert stack."""
    from sparsekern.nn.moe import SparseExperts, find_experts

    total = 0
    stacks = {id(m): m for m in find_experts(model).values()}
    stacks.update({id(m): m for m in model.modules() if isinstance(m, SparseExperts)})
    inside = {id(p) for m in stacks.values() for p in list(m.parameters()) + list(m.buffers())}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in inside and t is not model.get_input_embeddings().weight:
            total += t.numel() * t.element_size()
    k = model.config.num_experts_per_tok
    for m in stacks.values():
        e = m.num_experts
        total += sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())) * k // e
    return total


def main(argv=None) -> int:
    import sparsekern as sk
    from sparsekern.bench.generate import measure_variant

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    dense = mixtral(dtype, args.quick)
    variants = {"dense": dense}
    for label, skip in (
        (f"experts {args.pattern}", ("lm_head", "self_attn")),
        (args.pattern, ("lm_head",)),
        (f"{args.pattern} + lm_head", ()),
    ):
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        sk.sparsify(model, args.pattern, skip=skip, progress=False)
        print(f"sparsify {label}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
        variants[label] = model
    impl = getattr(dense.config, "_experts_implementation", None)
    print(f"Mixtral-shaped MoE, {args.dtype}, batch 1, prompt {args.prompt}, {args.new} new tokens; "
          f"transformers experts implementation: {impl}; torch threads {torch.get_num_threads()}")  # fmt: skip
    rows, base = [], None
    for label, model in variants.items():
        res = measure_variant(model, 1, (args.prompt,), args.new, args.reps)
        tps = res["tokens_per_s"]
        base = base or tps
        nbytes = weight_bytes_per_token(model)
        rows.append({"variant": label, "tokens_per_s": tps, "vs_dense": tps / base, "weight_bytes_per_token": nbytes})
        print(f"{label:>20}: {tps:7.1f} tok/s  {tps / base:5.2f}x dense  weights/token {nbytes / 2**20:7.1f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "impl": impl, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
