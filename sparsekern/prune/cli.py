"""``sparsekern prune``: prune a local Hugging Face model and save it compressed.

    sparsekern prune --model DIR --pattern 2:4 --method wanda --calib FILE --out DIR
    sparsekern prune --model DIR --pattern 2:4 --method sparsegpt --calib FILE --quant int4 \
        --group-size 32 --act-block 32 --head int8 --out DIR

Offline only (``HF_HUB_OFFLINE=1`` is set): the model and tokenizer are read from ``--model``.
The output directory is the folder :func:`sparsekern.save` writes (HF config with
``quantization_config``, tokenizer files), so ``from_pretrained`` (after ``import sparsekern``),
:func:`load_pretrained` or ``sparsekern serve`` reads it.
"""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("prune", help="prune (and optionally quantize) an HF model and save it compressed")
    p.add_argument("--model", required=True, help="local HF model directory (config.json, weights, tokenizer)")
    p.add_argument("--pattern", default="2:4", help='"2:4", "4:8", "block32x32:0.9", "unstructured:0.5"')
    p.add_argument("--method", default="magnitude", choices=("magnitude", "wanda", "sparsegpt", "admm"))
    p.add_argument("--calib", help="calibration text, one sample per line (needed by wanda and sparsegpt)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--skip", action="append", default=None, help="layer name substring/glob to keep dense (repeatable)")
    p.add_argument("--max-calib", type=int, default=128, help="use at most N calibration lines (default 128)")
    p.add_argument("--seq-len", type=int, default=128, help="truncate calibration samples to L tokens (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (padding is excluded)")
    p.add_argument("--quant", choices=("int8", "int4"), help="also round the kept weights (N:M and block layers)")
    p.add_argument(
        "--group-size", type=int, default=0, help="--quant: one scale per G columns (0: per row, or per block row)"
    )
    p.add_argument("--act-block", type=int, default=0, help="--quant: x rounded to int8 per B columns (e.g. 32)")
    p.add_argument("--head", choices=("int8",), help="the LM head as int8 too (int8 x per --act-block or 32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def model_class(config):
    """The class named in ``config.architectures`` if transformers has it, else AutoModel(ForCausalLM)."""
    import transformers

    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if getattr(config, "is_decoder", False) or "CausalLM" in str(getattr(config, "architectures", "")):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def load_pretrained(path: str):
    """Rebuild a model written by ``sparsekern prune``: HF architecture from ``config.json``, then
    :func:`sparsekern.load` swaps in the compressed layers."""
    from transformers import AutoConfig

    from sparsekern.checkpoint import load

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = model_class(config)
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    return load(path, model.eval())


def read_calibration(path: str, limit: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    lines = [line for line in lines if line][: max(limit, 0)]
    if not lines:
        raise ValueError(f"--calib: {path} has no non-empty lines")
    return lines


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from sparsekern.checkpoint import save
    from sparsekern.nn.swap import sparsify

    if args.method != "magnitude" and not args.calib:
        print(f"sparsekern prune: --method {args.method} needs --calib FILE", file=sys.stderr)
        return 2
    if not os.path.isdir(args.model):
        print(f"sparsekern prune: --model {args.model} is not a directory", file=sys.stderr)
        return 2
    config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    model = model_class(config).from_pretrained(args.model, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    calibration = None
    if args.calib:
        texts = read_calibration(args.calib, args.max_calib)
        if tokenizer.pad_token is None:  # decoder tokenizers often lack one; padding is masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        calibration = [
            dict(
                tokenizer(
                    texts[i : i + args.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=args.seq_len,
                    return_tensors="pt",
                )
            )
            for i in range(0, len(texts), args.batch_size)
        ]
        calibration = [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask")} for b in calibration]
    skip = args.skip if args.skip is not None else ["lm_head"]
    with torch.no_grad():
        quant = dict(quant=args.quant, group_size=args.group_size, act_block=args.act_block) if args.quant else {}
        if args.head:
            quant.update(head=args.head, act_block=args.act_block)
        try:
            report = sparsify(
                model, args.pattern, args.method, calibration=calibration, skip=skip, progress=not args.no_progress,
                **quant,
            )  # fmt: skip
        except ValueError as exc:
            print(f"sparsekern prune: {exc}", file=sys.stderr)
            return 2
    print(report)
    save(model, args.out, tokenizer=tokenizer)  # an HF folder: config, generation config, tokenizer
    print(
        f"saved to {args.out}; reload with AutoModelForCausalLM.from_pretrained({args.out!r}) after import sparsekern"
    )
    return 0
