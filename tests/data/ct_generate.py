"""Make the tiny compressed-tensors 2:4 + W4A16 / W8A16 checkpoints under tests/data/ct_*/.

Not part of the test suite: it needs the ``compressed-tensors`` package, which sparsekern does
not depend on. The committed folders were made with two throwaway environments (never the
project's .venv):

    python3 -m venv /tmp/ct14env
    /tmp/ct14env/bin/pip install torch==2.13.0 compressed-tensors==0.14.0.1 transformers==4.57.6 psutil==7.2.2
    /tmp/ct14env/bin/python tests/data/ct_generate.py 0.14

    python3 -m venv /tmp/ctenv
    /tmp/ctenv/bin/pip install torch==2.13.0 compressed-tensors==0.20.0 transformers==5.24.0
    /tmp/ctenv/bin/python tests/data/ct_generate.py 0.20

(0.14.0.1 imports psutil without declaring it.) 0.14.0.1 is the newest release that writes a
``sparsity_config`` next to the quantization (``"format": "dense", "sparsity_structure":
"2:4"``, as llm-compressor 0.10 does for weight-only schemes) and the ``marlin-24`` format that
llm-compressor picks by default for 2:4 + W4A16/W8A16 channel or group quantization; from 0.15
on the sparsity config is written empty and 2:4 + W4A16 is plain ``pack-quantized``.

The weights are pruned 2:4 (top-2 |w| of every 4), scales come from compressed-tensors'
``calculate_qparams`` on each group's min/max (rounded to fp16 so that marlin-24's fp16 copy is
the same number), and the weights are then snapped onto the quantization grid with
compressed-tensors' own ``fake_quantize``: every later rounding (the compressor's own
``quantize``, in fp32 or in marlin-24's fp16) then gives the same integers. The logits of that
dense, dequantized model on fixed tokens are saved as ``reference.safetensors`` beside the
checkpoint: what a loader must reproduce. Each folder is then written the way llm-compressor
writes it: ``ModelCompressor.from_pretrained_model`` + ``compress_model`` +
``save_pretrained`` + ``update_config``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENS = torch.tensor([[1, 17, 42, 59, 5, 63, 34, 3, 48, 23, 7, 60]])

# name: (compressed-tensors line, num_bits, symmetric, strategy, group_size, format, model size)
SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 1,
}
# marlin-24 needs out_features % 64 == 0 (so no narrower k/v heads) ...
MARLIN8 = {**SMALL, "num_key_value_heads": 4}
# ... and group_size 128 <= K; its grouped scale layout is used only where group_size < K/2 (down_proj).
MARLIN4 = {**MARLIN8, "hidden_size": 128, "intermediate_size": 384}
CASES = {
    "ct_w4a16_g32_sym": ("0.14", 4, True, "group", 32, "pack-quantized", {**SMALL, "num_hidden_layers": 2}),
    "ct_w4a16_g32_asym": ("0.14", 4, False, "group", 32, "pack-quantized", SMALL),
    "ct_w8a16_channel": ("0.14", 8, True, "channel", None, "pack-quantized", SMALL),
    "ct_marlin24_w4a16_g128": ("0.14", 4, True, "group", 128, None, MARLIN4),  # None: the default format
    "ct_marlin24_w8a16_channel": ("0.14", 8, True, "channel", None, None, MARLIN8),
    "ct_v020_w4a16_g32_asym": ("0.20", 4, False, "group", 32, None, SMALL),
}


def prune_24(w: torch.Tensor) -> torch.Tensor:
    groups = w.reshape(w.shape[0], -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(w.shape)


def qparams(w: torch.Tensor, args: QuantizationArgs):
    rows = w.shape[0]
    g = w.reshape(rows, -1, args.group_size) if args.strategy == "group" else w.reshape(rows, 1, -1)
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
    return scale.half().float(), zp  # fp16-exact scales: marlin-24 stores them in fp16


def make(name: str, line: str, bits: int, symmetric: bool, strategy: str, group_size, fmt, size) -> None:
    torch.manual_seed(sum(map(ord, name)))
    config = LlamaConfig(vocab_size=64, tie_word_embeddings=True, **size)
    model = LlamaForCausalLM(config).eval()
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group_size)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    params = {}
    with torch.no_grad():
        for n, mod in linears.items():
            w = prune_24(mod.weight * 8)  # init std 0.02 gives near-constant logits; widen it
            scale, zp = qparams(w, args)
            mod.weight.copy_(fake_quantize(w, scale, zp, args))  # onto the grid: every rounding agrees
            params[n] = (scale, zp)
        logits = model(TOKENS).logits

    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for n, mod in linears.items():
            scale, zp = params[n]
            mod.weight_scale.data = scale.reshape(mod.weight_scale.shape).to(mod.weight_scale.dtype)
            if hasattr(mod, "weight_zero_point"):
                mod.weight_zero_point.data = zp.reshape(mod.weight_zero_point.shape).to(mod.weight_zero_point.dtype)

    out = os.path.join(HERE, name)
    shutil.rmtree(out, ignore_errors=True)
    if line == "0.14":
        from compressed_tensors.config import SparsityCompressionConfig

        # What llm-compressor 0.10 infers for a weight-only 2:4 model (SparsityConfigMetadata).
        sparsity = SparsityCompressionConfig.load_from_registry(
            "dense", sparsity_structure="2:4", targets=["Linear"], ignore=["lm_head"], global_sparsity=0.5
        )
        compressor = ModelCompressor.from_pretrained_model(model, sparsity, quantization_format=fmt)
    else:
        compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    save_file(
        {"input_ids": TOKENS.contiguous(), "logits": logits.contiguous()}, os.path.join(out, "reference.safetensors")
    )
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)["quantization_config"]
    print(name, written["format"], written.get("sparsity_config"), sorted(os.listdir(out)))


if __name__ == "__main__":
    import compressed_tensors

    line = sys.argv[1] if len(sys.argv) > 1 else "0.14"
    print("compressed-tensors", compressed_tensors.__version__)
    for case, spec in CASES.items():
        if spec[0] == line:
            make(case, *spec)
