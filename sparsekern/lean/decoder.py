"""The decode step of an HF Llama-family causal LM as a flat loop over prepared layers.

:class:`LeanDecoder` reads the model once: per block the two RMSNorm weights, q/k/v as ONE linear
and gate/up as ONE linear (:func:`sparsekern.lean.fuse.fuse_linears`), o and down as they are;
rotary cos/sin come from the model's own rotary embedding (every rope type whose tables do not
depend on the sequence length, read for all positions at once). A step then runs, per block:
rms_norm, qkv, rotary on q and k together, k/v written in place into a static cache
``[B, Hkv, max_len, D]``, attention over the filled prefix, o, residual add in place, rms_norm,
gate_up, act(gate) * up, down, residual add in place. No Cache object, no mask, no module calls
other than the linears.

GQA at decode: the G query heads that share a KV head attend as G query rows of one KV head
(``q.view(B, Hkv, G, D)``). With one query position there is no causal mask, so this is exact.
NOTE: bf16, SmolLM2 shapes (9 / 3 heads, 100 keys): 25 us per call, against 99 us for
``enable_gqa=True`` with ``[B, 9, 1, D]`` (torch 2.13, one EPYC core).

NOTE: eager, not ``torch.compile``. On SmolLM2's depth and heads at 8 dims per head (weights
~0, so time per token = framework work), one thread of a shared 2-core EPYC: HF generate 14.2 ms
per token fp32 dense, this loop 8.0 ms (2:4 bf16: 20.0 vs 11.4; bench/bench_lean_decode.py). Per block, timed alone: rms_norm
9 us (x2), each SparseLinear 8-10 us (x4), rope 9, K/V write 7, SDPA 13, silu*up 6: ~90 us, ~2.7
ms for 30 blocks. ``torch.compile(step, dynamic=True)`` had not finished compiling (inductor,
30 unrolled blocks) after 14 CPU-minutes there, which rules it out for a call that should start
decoding at once. Instead the same step runs as one C++ call where the model allows
(:meth:`LeanDecoder.stepper`, sparsekern/lean/native.py); :meth:`LeanDecoder.step` stays the
fallback and the ground truth the C++ step is tested against.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.hugepages import rehome_module
from sparsekern.lean.fuse import fuse_linears
from sparsekern.lean.native import Native

# model_type -> what makes it differ from Llama in the decode step (only sliding windows here).
SUPPORTED = ("llama", "qwen2", "mistral")
# Rope types whose forward recomputes frequencies from the positions seen (not a fixed table).
_DYNAMIC_ROPE = ("dynamic", "longrope")


def _norm(module: nn.Module, where: str) -> tuple[torch.Tensor, float]:
    """``(weight, eps)`` of a Llama-style RMSNorm (``weight * x / rms(x)``)."""
    eps = getattr(module, "variance_epsilon", None)
    if not type(module).__name__.endswith("RMSNorm") or eps is None or getattr(module, "weight", None) is None:
        raise ValueError(f"model: expected a Llama-style RMSNorm at {where}, got {type(module).__name__}")
    return module.weight.detach(), float(eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm: x normalised in fp32, rounded to x's dtype, times the weight in it.

    NOTE: F.rms_norm with the weight rounds once (x * rstd * w in fp32); in bf16 that moves ~1 in 4
    outputs by an ulp, enough that SmolLM2-135M bf16 dense decode left HF's greedy tokens at token
    11 of 64 (rounding as HF: all 64 equal). fp32: one call, the same values."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * weight


def _out(module: nn.Module, where: str) -> int:
    out = getattr(module, "out_features", None)
    if not isinstance(out, int):
        raise ValueError(f"model: expected a linear layer at {where}, got {type(module).__name__}")
    return out


def _act(module: nn.Module):
    # F.silu directly: calling the activation module costs a few us per block (and the C++ step
    # runs only SiLU). transformers' "silu" is its own SiLUActivation, whose forward is F.silu.
    silu = isinstance(module, nn.SiLU) or (
        type(module).__name__ == "SiLUActivation" and type(module).__module__ == "transformers.activations"
    )
    return F.silu if silu else module


def check_model(model: nn.Module, total: int) -> None:
    """Refuse what the lean step does not compute exactly as the model would (``ValueError``)."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED or not hasattr(getattr(model, "model", None), "layers"):
        got = type(model).__name__ if kind is None else f"{type(model).__name__} (model_type {kind!r})"
        raise ValueError(f"model: expected an HF causal LM of model_type {SUPPORTED}, got {got}")
    rope = getattr(model.model, "rotary_emb", None)
    rope_type = getattr(rope, "rope_type", None)
    if rope is None or not isinstance(rope_type, str) or rope_type in _DYNAMIC_ROPE:
        raise ValueError(
            f"model: rope_type {rope_type!r} is not supported by the lean decode path (its frequencies change "
            f"with the sequence length); use model.generate"
        )
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or ()
    sliding = kind == "mistral" or "sliding_attention" in types
    if sliding and window is not None and total > window:
        raise ValueError(
            f"max_new_tokens: prompt + new tokens ({total}) exceed the model's sliding window ({window}); "
            "the lean decode path attends to the whole prefix; use model.generate"
        )


class _Block:
    """What one decoder block needs at decode, nothing else."""

    __slots__ = ("ln1", "eps1", "qkv", "o", "ln2", "eps2", "gate_up", "down", "act", "heads", "kv_heads", "inter")

    def __init__(self, layer: nn.Module, where: str, head_dim: int) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        # Per block: structured pruning (sparsekern.prune.structured) may leave blocks uneven.
        self.heads = _out(attn.q_proj, f"{where}.self_attn.q_proj") // head_dim
        self.kv_heads = _out(attn.k_proj, f"{where}.self_attn.k_proj") // head_dim
        self.inter = _out(mlp.gate_proj, f"{where}.mlp.gate_proj")
        if not self.kv_heads or self.heads % self.kv_heads:
            raise ValueError(f"model: {where} has {self.heads} query heads for {self.kv_heads} KV heads")
        self.ln1, self.eps1 = _norm(layer.input_layernorm, f"{where}.input_layernorm")
        self.ln2, self.eps2 = _norm(layer.post_attention_layernorm, f"{where}.post_attention_layernorm")
        self.qkv = rehome_module(fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj]))
        self.gate_up = rehome_module(fuse_linears([mlp.gate_proj, mlp.up_proj]))
        self.o, self.down, self.act = attn.o_proj, mlp.down_proj, _act(mlp.act_fn)


class LeanDecoder:
    """The decode step of ``model`` (see the module docstring). Holds no reference to ``model``
    itself: only its tensors and linear modules, plus the stacked copies of q/k/v and gate/up."""

    def __init__(self, model: nn.Module) -> None:
        check_model(model, 0)
        cfg, body = model.config, model.model
        first = body.layers[0].self_attn
        self.dim = int(cfg.hidden_size)
        self.head_dim = int(first.head_dim)
        self.scale = float(first.scaling)
        self.blocks = [_Block(layer, f"model.layers.{i}", self.head_dim) for i, layer in enumerate(body.layers)]
        self.embed = body.embed_tokens.weight.detach()
        self.norm, self.norm_eps = _norm(body.norm, "model.norm")
        self.lm_head = model.lm_head
        self.rotary = body.rotary_emb
        self.cos = self.sin = None  # tables for positions [0, len), grown on demand
        # The same step as one C++ call (sparsekern/lean/native.py), or why the model has none.
        self.native, self.why_python = Native.build(self)

    # -- per generate() call -----------------------------------------------------------------

    def rope_tables(self, total: int) -> None:
        """cos and a signed sin for positions ``[0, total)``, from the model's rotary embedding.

        ``q * cos + rotate_half(q) * sin`` equals ``q * cos + swap_halves(q) * sin_signed`` with the
        first half of ``sin_signed`` negated (negation is exact), and swapping halves is one copy.
        """
        if self.cos is not None and self.cos.shape[0] >= total:
            return
        dtype, device = self.embed.dtype, self.embed.device
        pos = torch.arange(total, device=device)[None]
        cos, sin = self.rotary(torch.empty(0, dtype=dtype, device=device), pos)
        half = self.head_dim // 2
        self.cos = cos[0].contiguous()
        self.sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1).contiguous()

    def start(self, cache, batch: int, length: int, total: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Static K/V buffers ``[batch, Hkv, total, D]`` per block, the first ``length`` positions
        copied from the HF cache that prefill filled."""
        self.rope_tables(total)
        dtype, device = self.embed.dtype, self.embed.device
        kv = []
        for i, blk in enumerate(self.blocks):
            k, v = cache.layers[i].keys, cache.layers[i].values
            shape = (batch, blk.kv_heads, total, self.head_dim)
            if tuple(k.shape) != (batch, blk.kv_heads, length, self.head_dim) or k.shape != v.shape:
                raise RuntimeError(f"prefill cache layer {i}: K/V {tuple(k.shape)}, expected {shape[:2]}+({length}, D)")
            kc = torch.empty(shape, dtype=dtype, device=device)
            vc = torch.empty(shape, dtype=dtype, device=device)
            kc[:, :, :length] = k
            vc[:, :, :length] = v
            kv.append((kc, vc))
        return kv

    def stepper(self, batch: int):
        """The step to run for ``batch`` rows: the C++ step where it computes what :meth:`step`
        does (see sparsekern/lean/native.py), else :meth:`step`; :attr:`why_python` says why.
        ``SPARSEKERN_LEAN_STEP=python`` keeps the Python step (to compare the two)."""
        if os.environ.get("SPARSEKERN_LEAN_STEP") == "python":
            self.why_python = "SPARSEKERN_LEAN_STEP=python"
            return self.step
        if self.native is not None:
            step, self.why_python = self.native.step_for(batch)
            if step is not None:
                return step
        return self.step

    # -- the step ------------------------------------------------------------------------------

    def step(self, tokens: torch.Tensor, pos: int, kv: list) -> torch.Tensor:
        """Logits ``[B, vocab]`` for ``tokens [B]`` at position ``pos`` (all rows at the same one);
        K/V of ``pos`` are written into ``kv`` (from :meth:`start`)."""
        b, d = tokens.shape[0], self.head_dim
        cos, sin = self.cos[pos], self.sin[pos]
        n = pos + 1
        h = F.embedding(tokens, self.embed)
        for blk, (kc, vc) in zip(self.blocks, kv):
            hq, hkv, inter = blk.heads, blk.kv_heads, blk.inter
            qk_heads, width = hq + hkv, (hq + hkv) * d
            qkv = blk.qkv(rms_norm(h, blk.ln1, blk.eps1))
            qk = qkv[:, :width].view(b, qk_heads, d)
            swapped = qk.view(b, qk_heads, 2, d // 2).flip(2).view(b, qk_heads, d)
            qk = torch.addcmul(qk * cos, swapped, sin)
            kc[:, :, pos] = qk[:, hq:]
            vc[:, :, pos] = qkv[:, width:].view(b, hkv, d)
            q = qk[:, :hq].view(b, hkv, hq // hkv, d)
            a = F.scaled_dot_product_attention(q, kc[:, :, :n], vc[:, :, :n], scale=self.scale)
            h += blk.o(a.reshape(b, hq * d))
            gu = blk.gate_up(rms_norm(h, blk.ln2, blk.eps2))
            h += blk.down(blk.act(gu[:, :inter]) * gu[:, inter:])
        return self.lm_head(rms_norm(h, self.norm, self.norm_eps))
