"""``DenseHead``: the dense LM head, with its decode rows on sparsekern's GEMV.

Pruning leaves the LM head dense (``sparsify``'s default ``skip``), and at decode it is the largest
single read of a step: TinyLlama-1.1B's head is 262 MB in fp32, where a 2:4 step reads ~2.1 GB.
torch's ``F.linear`` reads it at ~20 GB/s on a 1-row fp32 x here, a third of what the machine
gives; ``_lean_head_cpu`` (csrc/cpu/gemv.cpp, the lean decode path's head) reads it at 40-50.

:class:`DenseHead` is an ``nn.Linear`` (same parameters, same state dict, tied weights stay tied)
whose forward sends x to ``_lean_head_cpu`` when that kernel is faster and gives the same answer:
CPU, no bias, x and weight of one dtype the kernel takes on this CPU, at most :func:`most_rows`
rows, and no autograd to record. Anything else runs ``F.linear``.
:func:`use_dense_head` turns a model's head into one in place (``sparsify``'s ``head="auto"``,
the default, and ``from_pretrained`` of a sparsekern folder).

NOTE: ROWS, ``bench/bench_dense_head.py`` (median of 20-30 calls), 32000x2048:
- 2-core Zen 4 (AVX-512 BF16; bench/results/cpu-epyc-zen4-avx512-2core-2026-11-27-session10.md):
  fp32 1 row 6.4 ms against 11.7 for F.linear, 8 rows 11.6 against 31.6, 32 rows 24.6 against
  46.2; bf16 1 row 2.5 against 4.5, 8 rows 4.4 against 4.9, 16 rows 6.1 against 5.8 (the GEMV
  loses from there). The 49152x576 head (SmolLM2) the same way: fp32 2.3-5.1x at 1-32 rows, bf16
  1.3-1.7x at 1-8, 0.99x at 16.
- 2-core Zen 3 (AVX2, the AVX2 loops; bench/results/cpu-epyc-zen3-avx2-2core-2026-11-28-session22.md):
  fp32 1 row 9.7 ms against 14.7, 32 rows 80 against 111; bf16 1 row 6.0 against 7.8, 32 rows 78
  against 205 (torch's bf16 GEMM is slow on a CPU without AVX-512 BF16); 49152x576 1.4-4.8x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern import _extension

# dtype -> the torch.ops.sparsekern._cpu_isa() of its AVX-512 loops (csrc/cpu/isa.h: 1 AVX2,
# 2 AVX-512, 3 + BF16); from 1 up to that, the AVX2 loops.
_WIDE_ISA = {torch.float32: 2, torch.bfloat16: 3}
# dtype -> the most rows of x the GEMV takes (measured: NOTE above), AVX-512 loops and AVX2 loops
ROWS = {torch.float32: 32, torch.bfloat16: 8}
ROWS_AVX2 = {torch.float32: 32, torch.bfloat16: 32}


def most_rows(dtype: torch.dtype) -> int:
    """The most rows of x that ``DenseHead`` sends to ``_lean_head_cpu`` on this CPU (and under
    ``SPARSEKERN_CPU_ISA`` now); 0 where that kernel does not run ``dtype``."""
    wide = _WIDE_ISA.get(dtype)
    if wide is None or not _extension.HAS_C_EXT:
        return 0
    isa = int(torch.ops.sparsekern._cpu_isa())
    return ROWS[dtype] if isa >= wide else ROWS_AVX2[dtype] if isa >= 1 else 0


def gemv_isa(dtype: torch.dtype) -> bool:
    """Whether ``_lean_head_cpu`` runs ``dtype`` on this CPU (and under ``SPARSEKERN_CPU_ISA`` now)."""
    return most_rows(dtype) > 0


class DenseHead(nn.Linear):
    """``nn.Linear`` whose decode rows on the CPU run ``_lean_head_cpu`` (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            self.bias is None
            and x.device.type == "cpu"
            and w.device.type == "cpu"
            and x.dtype == w.dtype
            and x.dim() >= 1
            and x.shape[-1] == w.shape[1]
            and x.numel() > 0
            and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
            and w.is_contiguous()
            and x.numel() <= most_rows(w.dtype) * w.shape[1]
        ):
            y = torch.ops.sparsekern._lean_head_cpu.default(x.reshape(-1, w.shape[1]), w)
            return y.view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w, self.bias)


def head_module(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(qualified name, module)`` of ``model``'s LM head (``get_output_embeddings()``, else an
    attribute ``lm_head``), or None where it has none."""
    get = getattr(model, "get_output_embeddings", None)
    mod = get() if callable(get) else getattr(model, "lm_head", None)
    if mod is None:
        return None
    name = next((n for n, m in model.named_modules() if m is mod), None)
    return None if name is None else (name, mod)


def use_dense_head(model: nn.Module) -> str | None:
    """Make ``model``'s LM head a :class:`DenseHead` in place, where it is a plain bias-free
    ``nn.Linear`` on the CPU whose dtype the GEMV takes here; the same object (its class changes, so
    hooks, tying and references stay). Returns why not (None: done, or it already was one)."""
    found = head_module(model)
    if found is None:
        return "no LM head found"
    mod = found[1]
    if type(mod) is DenseHead:
        return None
    if type(mod) is not nn.Linear:
        return f"the LM head is a {type(mod).__name__}, not an nn.Linear"
    if mod.bias is not None:
        return "the LM head has a bias"
    if mod.weight.device.type != "cpu":
        return f"the LM head is on {mod.weight.device.type}"
    if not gemv_isa(mod.weight.dtype):
        return f"no GEMV kernel for {mod.weight.dtype} on this CPU"
    mod.__class__ = DenseHead
    return None
