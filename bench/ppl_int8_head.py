"""SmolLM2-135M perplexity on the evaluation text (4096 tokens), dense and with the LM head as int8
(``QuantLinear.from_linear``, what ``sparsify(..., head="int8")`` puts there): the head's share
of the quality cost, fp32 and bf16.

    .venv/bin/python bench/ppl_int8_head.py
"""

from __future__ import annotations

import torch

from sparsekern.bench import smollm, text
from sparsekern.nn.quant_linear import QuantLinear


def main() -> None:
    windows = smollm.eval_windows(4096)
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = smollm.load(dtype)
        base = text.perplexity(model, windows).ppl
        model.lm_head = QuantLinear.from_linear(model.lm_head, 32)  # unties the head from the embedding
        model.config.tie_word_embeddings = False
        h8 = text.perplexity(model, windows).ppl
        print(f"SmolLM2-135M {dtype}: dense ppl {base:.3f}, int8 head {h8:.3f} ({h8 / base:.4f}x)", flush=True)


if __name__ == "__main__":
    main()
