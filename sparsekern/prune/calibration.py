"""Calibration statistics of linear layers' inputs, gathered by forward hooks.

Wanda needs ``||X_j||_2`` per input feature, SparseGPT the Hessian ``sum_t x_t x_t^T``, FLAP-style
structured pruning the per-feature mean and variance. All are running sums over tokens, so the
calibration set streams through once. Padding is excluded: when a calibration item is a dict
with an ``attention_mask`` ``[B, S]`` (a tokenizer's output), inputs shaped ``[B, S, in]``
count only the unmasked tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

NEEDS = ("norm", "hessian", "mean")


@dataclass
class ActivationStats:
    """Running statistics of one layer's input features (fp32 sums over ``n_tokens`` tokens)."""

    in_features: int
    n_tokens: int = 0
    sq_sum: torch.Tensor | None = None  # [in]: sum_t x_tj^2
    sum: torch.Tensor | None = None  # [in]: sum_t x_tj (need "mean")
    hessian: torch.Tensor | None = None  # [in, in]: sum_t x_t x_t^T (need "hessian")

    @property
    def act_norm(self) -> torch.Tensor:
        """``||X_j||_2`` over the calibration tokens: Wanda's ``act_norm``."""
        return self.sq_sum.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        if self.sum is None:
            raise ValueError("ActivationStats.mean: collect with need=(..., 'mean')")
        return self.sum / max(self.n_tokens, 1)

    @property
    def var(self) -> torch.Tensor:
        """Per-feature (biased) variance over tokens: FLAP's fluctuation of a feature."""
        mean = self.mean
        return (self.sq_sum / max(self.n_tokens, 1) - mean * mean).clamp_min(0.0)

    def update(self, x: torch.Tensor, need: tuple[str, ...]) -> None:
        x = x.detach().reshape(-1, self.in_features).float()
        if self.sq_sum is None:
            self.sq_sum = torch.zeros(self.in_features, device=x.device)
            if "mean" in need:
                self.sum = torch.zeros(self.in_features, device=x.device)
            if "hessian" in need:
                self.hessian = torch.zeros(self.in_features, self.in_features, device=x.device)
        self.n_tokens += x.shape[0]
        self.sq_sum += (x * x).sum(0)
        if self.sum is not None:
            self.sum += x.sum(0)
        if self.hessian is not None:
            self.hessian.addmm_(x.T, x)


def is_conv1d(module: nn.Module) -> bool:
    """HF GPT-2's ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if is_conv1d(module):
        return module.weight.shape[0]
    raise TypeError(f"layers: expected nn.Linear or transformers' Conv1D modules, got {type(module).__name__}")


def new_stats(module: nn.Module):
    """Empty statistics for ``module``: :class:`ActivationStats` for a linear layer, per-expert
    :class:`~sparsekern.prune.experts.ExpertStats` for a fused MoE experts module."""
    from sparsekern.nn.moe import find_experts

    if find_experts(module).get("") is module:
        from sparsekern.prune.experts import ExpertStats

        return ExpertStats(module)
    return ActivationStats(in_features(module))


def observe(stats, module: nn.Module, args: tuple, kwargs: dict, mask, need: tuple[str, ...]) -> None:
    """Add one call of ``module`` (a forward pre-hook's ``args`` / ``kwargs``) to ``stats``;
    ``mask`` is the batch's [B, S] padding mask or None."""
    if not isinstance(stats, ActivationStats):
        stats.observe(module, args, kwargs, mask, need)
        return
    x = args[0] if args else kwargs.get("input", kwargs.get("x"))
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask.to(x.device)]
    stats.update(x, need)


def call_model(model: nn.Module, batch, device):
    def move(t):
        return t.to(device) if isinstance(t, torch.Tensor) and device is not None else t

    if isinstance(batch, torch.Tensor):
        return model(move(batch))
    if isinstance(batch, (tuple, list)):
        return model(*(move(t) for t in batch))
    if isinstance(batch, dict) or hasattr(batch, "keys"):  # dict or a tokenizer's BatchEncoding
        return model(**{k: move(batch[k]) for k in batch.keys()})
    raise TypeError(f"calibration: expected items that are a tensor, a tuple or a dict, got {type(batch).__name__}")


def token_mask(batch) -> torch.Tensor | None:
    if (isinstance(batch, dict) or hasattr(batch, "keys")) and "attention_mask" in batch.keys():
        mask = batch["attention_mask"]
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask.bool()
    return None


def collect_stats(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calibration: Iterable,
    *,
    need: tuple[str, ...] = ("norm",),
    progress: bool = False,
) -> dict[str, ActivationStats]:
    """Run ``calibration`` through ``model`` and return each layer's input statistics.

    ``layers`` maps names to ``nn.Linear`` / ``Conv1D`` modules (or fused MoE experts modules,
    whose statistics are per expert: :class:`~sparsekern.prune.experts.ExpertStats`) inside ``model``. Each item of
    ``calibration`` is passed as the forward takes it: ``model(t)``, ``model(*t)`` or ``model(**d)``.
    Runs in eval mode under ``torch.no_grad()``; restores the mode and removes the hooks even if
    the forward raises. Memory: one ``[in, in]`` fp32 Hessian per layer when asked for, so for
    large models collect a few layers at a time.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected nn.Module, got {type(model).__name__}")
    if isinstance(need, str):
        need = (need,)
    bad = [n for n in need if n not in NEEDS]
    if bad:
        raise ValueError(f"need: expected a subset of {NEEDS}, got {tuple(need)!r}")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"layers: expected a non-empty dict of name -> module, got {type(layers).__name__}")
    inside = {id(m) for m in model.modules()}
    stats = {name: new_stats(mod) for name, mod in layers.items()}  # TypeError: not a linear / experts
    for name, mod in layers.items():
        if id(mod) not in inside:
            raise ValueError(f"layers[{name!r}]: this module is not part of model")
    if isinstance(calibration, (torch.Tensor, dict)):
        raise TypeError(
            "calibration: expected an iterable of model inputs (e.g. a list of batches), got a single "
            f"{type(calibration).__name__}; wrap it in a list"
        )

    current_mask: list[torch.Tensor | None] = [None]

    def make_hook(name: str):
        def hook(module, args, kwargs):
            observe(stats[name], module, args, kwargs, current_mask[0], tuple(need))

        return hook

    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    items = calibration
    if progress:
        from rich.progress import track

        items = track(
            calibration, description="calibration", total=len(calibration) if hasattr(calibration, "__len__") else None
        )
    was_training = model.training
    handles = [mod.register_forward_pre_hook(make_hook(name), with_kwargs=True) for name, mod in layers.items()]
    n_batches = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in items:
                current_mask[0] = token_mask(batch)
                call_model(model, batch, device)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("calibration: is empty; need at least one batch of inputs")
    for name, s in stats.items():
        if s.n_tokens == 0:
            raise ValueError(f"layers[{name!r}]: never ran during calibration (is it used by model.forward?)")
    return stats
