"""Sequential calibration: prune a transformer block by block, as the SparseGPT and Wanda papers do.

The calibration inputs are captured where they enter block 0 (a forward pre-hook that stops the
forward with a private exception, so the rest of the model never runs), together with block 0's
call arguments (attention mask, rotary ``(cos, sin)``, position ids; caches dropped). Then for
each block i: run the captured inputs through block i with hooks on its linears (Wanda's norms
or the Hessian ``X^T X``, for block i's layers only), prune those layers, and run block i again
with the pruned weights: its outputs, computed with the PRUNED weights, are block i+1's inputs.
So each layer is fitted to the inputs the pruned model really feeds it, and the extra memory is
one block's statistics plus two copies of the calibration activations, never the whole model's
statistics (~28 GB of fp32 Hessians for a 7B model in one pass).

Supported: one list of identical blocks under ``*.layers`` / ``*.h`` / ``*.layer`` / ``*.blocks``
(Llama, Qwen, Mistral: ``model.layers``; GPT-2: ``transformer.h``; OPT: ``model.decoder.layers``;
BERT: ``encoder.layer``) that all take the same call arguments. Linears outside the blocks (a
BERT pooler) are pruned last, from one pass over the already-pruned model.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsekern.prune.calibration import (
    ActivationStats,
    call_model,
    collect_stats,
    is_conv1d,
    new_stats,
    observe,
    token_mask,
)

BLOCK_NAMES = ("layers", "h", "layer", "blocks")
LOOKED_FOR = "one nn.ModuleList of identical blocks named *.layers, *.h, *.layer or *.blocks"
_POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_sequence_length")


class _Stop(Exception):
    """Raised by the pre-hook on block 0 once its inputs are captured: the rest need not run."""


@dataclass
class SequentialInfo:
    """What the sequential pass did and what it held (bytes are exact tensor sizes, RSS from /proc)."""

    blocks_path: str
    n_blocks: int
    n_batches: int
    n_tokens: int
    seconds: float = 0.0
    activation_bytes: int = 0  # captured block inputs + outputs, both held at once
    peak_stats_bytes: int = 0  # the largest one block's statistics (norms, Hessians)
    rss_start: int = 0
    rss_peak: int = 0  # sampled when a block's statistics are full and after each layer is pruned
    outside: list[str] = field(default_factory=list)  # pruned after the blocks, one pass

    @property
    def peak_extra_bytes(self) -> int:
        return self.activation_bytes + self.peak_stats_bytes

    def __str__(self) -> str:
        gib = 1024**3
        return (
            f"sequential: {self.n_blocks} blocks of {self.blocks_path}, {self.n_batches} batches / "
            f"{self.n_tokens} tokens, {self.seconds:.1f} s; held {self.peak_extra_bytes / gib:.3f} GiB "
            f"(activations {self.activation_bytes / gib:.3f} + one block's stats {self.peak_stats_bytes / gib:.3f}); "
            f"RSS {self.rss_start / gib:.2f} -> peak {self.rss_peak / gib:.2f} GiB"
        )


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | str:
    """``(path, blocks)`` of the model's block list, or a string saying why there is none."""
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and name.rpartition(".")[2] in BLOCK_NAMES
    ]
    if not found:
        return f"found no block list; looked for {LOOKED_FOR}"
    if len(found) > 1:
        return f"found several block lists {[n for n, _ in found]}; expected {LOOKED_FOR}"
    path, blocks = found[0]
    kinds = {type(b).__name__ for b in blocks}
    if len(kinds) > 1:
        return f"{path} holds different block types {sorted(kinds)}; expected identical blocks"
    # Models that alternate sliding-window and full attention give each block its own mask.
    if len({getattr(b, "attention_type", None) for b in blocks}) > 1:
        return f"{path}: blocks have different attention types, so they take different masks"
    return path, blocks


def _position_limit(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in _POSITION_LIMITS:
        limit = getattr(cfg, key, None)
        if isinstance(limit, int) and limit > 0:
            return limit
    return None


def _ids_of(batch) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if (isinstance(batch, dict) or hasattr(batch, "keys")) and "input_ids" in batch.keys():
        return batch["input_ids"]
    return None


def check_calibration(model: nn.Module, calibration) -> list:
    """The calibration items as a list; refuses empty, wrongly typed or over-long calibration."""
    if calibration is None or isinstance(calibration, (torch.Tensor, dict, str, bytes)) or hasattr(calibration, "keys"):
        got = type(calibration).__name__
        raise TypeError(
            f"calibration: expected an iterable of model inputs (tensors, tuples or dicts such as a "
            f"tokenizer's output), got a single {got}; wrap one batch in a list"
        )
    try:
        items = list(calibration)
    except TypeError:
        raise TypeError(
            f"calibration: expected an iterable of model inputs, got {type(calibration).__name__}"
        ) from None
    if not items:
        raise ValueError("calibration: is empty; need at least one batch of inputs")
    limit = _position_limit(model)
    for i, batch in enumerate(items):
        if not isinstance(batch, (torch.Tensor, tuple, list, dict)) and not hasattr(batch, "keys"):
            raise TypeError(
                f"calibration[{i}]: expected a tensor, a tuple or a dict of tensors (tokenized text), "
                f"got {type(batch).__name__}"
            )
        ids = _ids_of(batch)
        if limit is not None and isinstance(ids, torch.Tensor) and ids.dim() >= 1 and ids.shape[-1] > limit:
            raise ValueError(
                f"calibration[{i}]: {ids.shape[-1]} tokens is longer than the model's context of {limit} tokens"
            )
    return items


def _no_cache(value):
    # A KV cache in block 0's arguments would grow across batches and blocks: drop it.
    if any(c.__name__ == "Cache" for c in type(value).__mro__):
        return None
    return value


def capture_inputs(model: nn.Module, first_block: nn.Module, items: list) -> list[tuple[tuple, dict, object]]:
    """``[(args, kwargs, token_mask)]`` of block 0 for every calibration item (rest of the model skipped)."""
    captured: list = []

    def hook(module, args, kwargs):
        kwargs = {k: _no_cache(v) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append((tuple(_no_cache(a) for a in args), kwargs))
        raise _Stop

    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    out = []
    try:
        for i, batch in enumerate(items):
            try:
                call_model(model, batch, device)
            except _Stop:
                args, kwargs = captured.pop()
                out.append((args, kwargs, token_mask(batch)))
            else:
                raise ValueError(f"calibration[{i}]: the model's forward never reached its first block")
    finally:
        handle.remove()
    return out


@contextlib.contextmanager
def inference(model: nn.Module):
    """Eval mode and no autograd for the calibration passes; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def block_inputs(model: nn.Module, first_block: nn.Module, items: list) -> tuple[list, list[torch.Tensor]]:
    """``(captured, hidden)``: block 0's calls for every calibration item and their hidden states."""
    captured = capture_inputs(model, first_block, items)
    return captured, [_hidden(a, k) for a, k, _ in captured]


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _run_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        out = block(hidden, *args[1:], **kwargs)
    else:
        out = block(**{**kwargs, "hidden_states": hidden})
    return out[0] if isinstance(out, (tuple, list)) else out


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _stats_bytes(stats: dict[str, ActivationStats]) -> int:
    seen, total = set(), 0
    flat = [a for s in stats.values() for a in ([s] if isinstance(s, ActivationStats) else s.up + s.down)]
    for s in flat:
        for t in (s.sq_sum, s.sum, s.hessian):
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _block_stats(block, layers, hidden, captured, need) -> dict[str, ActivationStats]:
    """Statistics of ``layers`` (names -> modules inside ``block``) over every calibration batch.

    Layers fed the very same tensor (q/k/v, gate/up) share one statistics object, so a Llama
    block holds 4 Hessians, not 7.
    """
    stats = {name: new_stats(mod) for name, mod in layers.items()}
    owner: dict[str, str] = {}  # layer -> the layer whose statistics it shares
    mask: list = [None]
    seen: dict[int, tuple[torch.Tensor, str]] = {}

    def make_hook(name):
        def hook(module, args, kwargs):
            if isinstance(stats[name], ActivationStats):  # experts' statistics are their own
                x = args[0] if args else kwargs.get("input", kwargs.get("x"))
                # The entry holds x, so its id cannot be reused by another tensor within this call.
                first = seen.setdefault(id(x), (x, name))[1]
                if first != name:
                    owner.setdefault(name, first)
                if owner.get(name, name) != name:
                    return
            observe(stats[name], module, args, kwargs, mask[0], need)

        return hook

    handles = [mod.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, mod in layers.items()]
    try:
        for h, (args, kwargs, m) in zip(hidden, captured):
            mask[0] = m
            seen.clear()
            _run_block(block, h, args, kwargs)
        seen.clear()
    finally:
        for h in handles:
            h.remove()
    for name, first in owner.items():
        stats[name] = stats[first]
    for name, s in stats.items():
        if s.n_tokens == 0:
            raise ValueError(f"layers[{name!r}]: never ran during calibration (is it used by its block's forward?)")
    return stats


def prune_sequential(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calibration: Iterable,
    build: Callable[[str, nn.Module, ActivationStats], nn.Module],
    *,
    need: tuple[str, ...] = ("norm",),
    progress: bool = True,
) -> tuple[dict[str, nn.Module], SequentialInfo]:
    """Prune ``layers`` block by block; returns ``({name: new module}, info)``.

    ``build(name, module, stats)`` returns the pruned replacement of one layer (a module whose
    ``.weight`` is the dense ``[out, in]`` pruned weight, or a Linear / Conv1D). Blocks run with
    the pruned weights copied into the original layers and restored after, so ``model`` ends as
    it began; only when layers outside the blocks need statistics are the pruned block layers
    swapped in first (and swapped back if anything raises). The caller swaps the result in.
    ``ValueError`` when the model has no block list this understands (see :func:`find_blocks`).
    """
    t0 = time.perf_counter()
    found = find_blocks(model)
    if isinstance(found, str):
        raise ValueError(f"model: sequential pruning needs the model's blocks; {found}")
    path, blocks = found
    items = check_calibration(model, calibration)
    prefix = path + "."
    per_block: list[dict[str, nn.Module]] = [{} for _ in blocks]
    outside = {}
    for name, mod in layers.items():
        idx, _, _ = name[len(prefix) :].partition(".") if name.startswith(prefix) else ("", "", "")
        if idx.isdigit() and int(idx) < len(blocks):
            per_block[int(idx)][name] = mod
        else:
            outside[name] = mod

    new: dict[str, nn.Module] = {}
    swapped: list[str] = []
    rss0 = _rss()
    try:
        with inference(model):
            captured, hidden = block_inputs(model, blocks[0], items)
            n_tokens = sum(h.shape[:-1].numel() for h in hidden)
            info = SequentialInfo(path, len(blocks), len(items), n_tokens, rss_start=rss0, rss_peak=rss0)
            info.outside = list(outside)
            act = sum(h.numel() * h.element_size() for h in hidden)
            info.activation_bytes = 2 * act
            for i in _bar(range(len(blocks)), progress, path):
                block = blocks[i]
                if per_block[i]:
                    stats = _block_stats(block, per_block[i], hidden, captured, tuple(need))
                    info.peak_stats_bytes = max(info.peak_stats_bytes, _stats_bytes(stats))
                    info.rss_peak = max(info.rss_peak, _rss())
                    for name, mod in per_block[i].items():
                        new[name] = build(name, mod, stats[name])
                        info.rss_peak = max(info.rss_peak, _rss())
                    del stats
                with _pruned_weights(per_block[i], new):
                    hidden = [_run_block(block, h, a, k) for h, (a, k, _) in zip(hidden, captured)]
            del hidden
            if outside:
                # Their inputs come from the whole pruned model: swap the pruned blocks in first.
                for name in _names(per_block):
                    _swap(model, name, new[name])
                    swapped.append(name)
                stats = collect_stats(model, outside, items, need=tuple(need))
                for name, mod in outside.items():
                    new[name] = build(name, mod, stats[name])
    except BaseException:
        for name in swapped:
            _swap(model, name, layers[name])
        raise
    info.seconds = time.perf_counter() - t0
    return new, info


def _names(per_block: list[dict[str, nn.Module]]) -> list[str]:
    return [name for layers in per_block for name in layers]


@contextlib.contextmanager
def _pruned_weights(layers: dict[str, nn.Module], new: dict[str, nn.Module]):
    """Run with the pruned weights copied into the original layers; put the originals back after.

    The block then computes exactly what the pruned dense model would, and the compressed modules
    never run here (their first call plans and may time kernels: seconds per new shape).
    """
    saved = []
    try:
        for name, mod in layers.items():
            if new[name] is mod:
                continue
            for w, pruned in _dense_pairs(mod, new[name]):
                saved.append((w, w.detach().clone()))
                w.copy_(pruned)
        yield
    finally:
        for w, old in saved:
            w.copy_(old)


def _dense_pairs(mod: nn.Module, rep: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(weight of mod, its pruned value from rep)`` for each dense weight of a layer."""
    from sparsekern.nn.linear import dense_weight
    from sparsekern.nn.moe import SparseExperts, up_name

    if isinstance(rep, SparseExperts):
        return [(getattr(mod, up_name(mod)), rep.dense("up")), (mod.down_proj, rep.dense("down"))]
    return [(dense_weight(mod), dense_weight(rep) if isinstance(rep, nn.Linear) or is_conv1d(rep) else rep.weight)]


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _bar(items, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # a progress bar is never worth a crash
        return items
    return tqdm(items, desc=f"prune {desc}", unit="block")
