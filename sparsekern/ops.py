"""``torch.ops.sparsekern.*``: every schema, fake implementation and typed wrapper.

Public ops (``nm_linear``, ``bsr_linear``, ``token_scores``, ``pruned_attention``) run, on any
device, a Python body that checks the arguments and calls the backend that
:func:`sparsekern.dispatch.select` picks; the linears do it through a plan made once per weight
and row bucket (:mod:`sparsekern.plan`), which their typed wrappers and ``SparseLinear`` call
directly in eager mode. Ops whose names start with ``_`` are one backend's kernels; compiled
code registers their implementations (``TORCH_LIBRARY_IMPL(sparsekern, CPU, m)``) and nothing else.
"""

from __future__ import annotations

import os
import weakref

import torch

from sparsekern import dispatch, plan, reference
from sparsekern.backends.dense import weight_stamp
from sparsekern.checks import check_attention, check_keep_idx_values, check_token_scores, keep_idx_on_device
from sparsekern.checks import check_same as _check_same
from sparsekern.checks import check_tensor as _check_tensor
from sparsekern.checks import nan_rows as _nan_rows
from sparsekern.formats import quant
from sparsekern.formats.bsr import (
    BlockSparseWeight,
    block_width,
    check_bsr_grouped_indices,
    check_bsr_indices,
    check_quant_blocks,
)
from sparsekern.formats.nm import SUPPORTED_DTYPES, NMSparseWeight, check_nm, meta_words, nm_to_dense
from sparsekern.plan import all_finite  # noqa: F401  (re-exported: older callers import it from here)

lib = torch.library.Library("sparsekern", "FRAGMENT")

# x @ W.T + bias for an N:M weight W given as values [out, K*n/m] and packed meta int32 [out, words].
# Quantized W (sparsekern/formats/quant.py): values int8 [out, kept] or uint8 [out, kept/2] (int4),
# scales [out, groups] in x's dtype, zeros int8 [out, groups] or None, group_size dense columns (0: per row);
# act_block > 0: x rounded to int8 per block of act_block columns first (reference.quantize_x).
NM_SCHEMA = (
    "(Tensor x, Tensor values, Tensor meta, int n, int m, Tensor? bias=None, Tensor? scales=None,"
    " Tensor? zeros=None, int group_size=0, int act_block=0) -> Tensor"
)
lib.define("nm_linear" + NM_SCHEMA)
# Mixture of experts: x [T, K] (rows sorted by expert) @ W_e.T for the rows offsets[e]:offsets[e+1]
# of each expert e; values [E, out, K*n/m] and meta int32 [E, out, words] stack E float N:M weights,
# offsets int64 [E+1] on the CPU (0 .. T, non-decreasing). No bias. Python side: sparsekern/ops_moe.py.
NM_GROUPED_SCHEMA = "(Tensor x, Tensor values, Tensor meta, Tensor offsets, int n, int m) -> Tensor"
lib.define("nm_grouped_linear" + NM_GROUPED_SCHEMA)
# The same for E BSR experts (sparsekern/formats/bsr.py stack_bsr): crow int32 [E, out/bm+1] of global
# indices into the shared col int32 [nnz_total] and blocks [nnz_total, bm, bk]; x and offsets as above.
BSR_GROUPED_SCHEMA = "(Tensor x, Tensor crow, Tensor col, Tensor blocks, Tensor offsets) -> Tensor"
lib.define("bsr_grouped_linear" + BSR_GROUPED_SCHEMA)
# x @ W.T + bias for a BSR weight W (crow int32 [out/bm+1], col int32 [nnz], blocks [nnz, bm, bk]).
# Quantized W (sparsekern/formats/bsr.py): blocks int8 [nnz, bm, bk] or uint8 [nnz, bm, bk/2] (int4),
# scales [nnz, bm, bk/group_size] in x's dtype, zeros int8 of that shape or None.
BSR_SCHEMA = (
    "(Tensor x, Tensor crow, Tensor col, Tensor blocks, Tensor? bias=None, Tensor? scales=None,"
    " Tensor? zeros=None) -> Tensor"
)
lib.define("bsr_linear" + BSR_SCHEMA)
# fp32 [B, H, Sk]: attention mass each key receives, averaged over queries (or CLS only).
lib.define("token_scores(Tensor q, Tensor k, bool causal=False, float? scale=None, bool cls_only=False) -> Tensor")
# Attention of every query over only the keys/values at keep_idx [B, H, kept].
lib.define(
    "pruned_attention(Tensor q, Tensor k, Tensor v, Tensor keep_idx, bool causal=False, float? scale=None) -> Tensor"
)
# CPU kernels (csrc/cpu): same contract as nm_linear / bsr_linear; they check their arguments
# themselves (csrc/cpu/op_checks.h, same words as the checks below): anyone can call them.
lib.define("_nm_linear_cpu" + NM_SCHEMA)
lib.define("_bsr_linear_cpu" + BSR_SCHEMA)
lib.define("_nm_grouped_linear_cpu" + NM_GROUPED_SCHEMA)
lib.define("_bsr_grouped_linear_cpu" + BSR_GROUPED_SCHEMA)
# pruned_attention plus the kept keys' attention mass (fp32 [B, H, kept], averaged over queries).
lib.define(
    "pruned_attention_with_scores(Tensor q, Tensor k, Tensor v, Tensor keep_idx, bool causal=False, float? scale=None)"
    " -> (Tensor, Tensor)"
)
# CPU attention kernels (csrc/cpu/attention*.cpp): same contracts, arguments checked in C++ too.
lib.define(
    "_pruned_attention_cpu(Tensor q, Tensor k, Tensor v, Tensor keep_idx, bool causal=False, float? scale=None)"
    " -> Tensor"
)
lib.define(
    "_pruned_attention_scores_cpu(Tensor q, Tensor k, Tensor v, Tensor keep_idx, bool causal=False,"
    " float? scale=None) -> (Tensor, Tensor)"
)
lib.define("_token_scores_cpu(Tensor q, Tensor k, bool causal=False, float? scale=None, bool cls_only=False) -> Tensor")
# Active CPU instruction set of the compiled kernels: 0 portable, 1 AVX2+FMA, 2 AVX-512, 3 AVX-512+bf16.
lib.define("_cpu_isa() -> int")
# The team the CPU kernels share a call with (csrc/cpu/parallel.h): "" reads it, "auto" / "pool" /
# "openmp" sets it for the process (as SPARSEKERN_PARALLEL does at start).
lib.define("_cpu_parallel_team(str team='') -> str")
# One decode step of a Llama-family LM, every block (csrc/cpu/lean_step_op.cpp; arguments packed by
# sparsekern/lean/native.py): the final-normed hidden state [B, hidden]; K/V of pos written in place.
lib.define(
    "_lean_step_cpu(Tensor tokens, int pos, Tensor embed, Tensor cos, Tensor sin, Tensor[] norms, float[] eps,"
    " Tensor?[] weights, int[] specs, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor final_norm,"
    " float final_eps, float scale) -> Tensor"
)
# Its LM head: x [rows, k] @ weight.T, no bias, both bf16 (AVX-512 BF16) or both fp32 (AVX-512)
# (csrc/cpu/lean_head_op.cpp).
lib.define("_lean_head_cpu(Tensor x, Tensor weight) -> Tensor")

# -- CUDA kernels (csrc/cuda): arguments checked by the backend, weight in its hardware layout --
# 2:4 mma.sp GEMM: x [M, K] @ W.T + bias, W given by sparsekern.formats.sm80.hw_layout (padded).
lib.define("_nm24_mma(Tensor x, Tensor values_hw, Tensor meta_hw, int out_features, Tensor? bias=None) -> Tensor")


@torch.library.register_fake("sparsekern::_nm24_mma")
def _nm24_mma_fake(x, values_hw, meta_hw, out_features, bias=None):
    return x.new_empty((x.shape[0], out_features))


# Tests set SPARSEKERN_POISON_OUTPUTS=1 so every kernel output starts as NaN: an element a
# kernel forgets to write then fails the comparison instead of passing on stale memory.
POISON_OUTPUTS = os.environ.get("SPARSEKERN_POISON_OUTPUTS") == "1"


def new_output(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uninitialised kernel output (NaN-filled under SPARSEKERN_POISON_OUTPUTS=1)."""
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


# -- argument checks (shared by the fake and the real implementations) ------------------------


def _check_linear_common(x, weight: torch.Tensor, weight_name: str, out: int, k: int, bias) -> None:
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension, got a scalar")
    _check_same(weight_name, weight, x, "x")
    if x.shape[-1] != k:
        raise ValueError(f"x: expected last dimension {k} (in_features), got shape {tuple(x.shape)}")
    if bias is not None:
        _check_tensor("bias", bias)
        _check_same("bias", bias, x, "x")
        if tuple(bias.shape) != (out,):
            raise ValueError(f"bias: expected shape {(out,)}, got {tuple(bias.shape)}")


def check_nm_linear(x, values, meta, n, m, bias, scales=None, zeros=None, group_size=0, act_block=0) -> None:
    check_nm(n, m)
    _check_tensor("values", values, (*SUPPORTED_DTYPES, torch.int8, torch.uint8))
    _check_tensor("meta", meta, (torch.int32,))
    packed = 2 if values.dtype == torch.uint8 else 1  # int4: two kept weights per byte
    if values.dim() != 2 or values.shape[1] * packed % n:
        raise ValueError(f"values: expected [out, K*{n}/{m}], got shape {tuple(values.shape)}")
    out, kept = values.shape[0], values.shape[1] * packed
    if tuple(meta.shape) != (out, meta_words(kept, m)):
        raise ValueError(f"meta: expected shape {(out, meta_words(kept, m))}, got {tuple(meta.shape)}")
    if meta.device != values.device:
        raise ValueError(f"meta: expected device {values.device} (that of values), got {meta.device}")
    k = kept // n * m
    if quant.quant_of(values) is None:
        if scales is not None or zeros is not None or group_size or act_block:
            raise ValueError(
                f"scales/zeros/group_size/act_block: only int8 / uint8 (int4) values take them, got {values.dtype}"
            )
        _check_linear_common(x, values, "values", out, k, bias)
        return
    quant.check_parts(values, scales, zeros, out, kept, quant.groups_of(group_size, k, m))
    quant.check_act_block(act_block, k)
    _check_linear_common(x, scales, "scales", out, k, bias)


def check_bsr_tensors(crow, col, blocks, quantized: bool = False) -> tuple[int, int, int]:
    """The dtypes of a BSR weight's tensors and the shape of ``blocks``: ``(nnz, bm, bk)``
    (one BSR linear's or a grouped op's stacked experts'; crow's shape is theirs to check).
    ``quantized``: int8 / uint8 (int4) blocks are accepted too; bk counts weights, not bytes."""
    _check_tensor("blocks", blocks, (*SUPPORTED_DTYPES, torch.int8, torch.uint8) if quantized else SUPPORTED_DTYPES)
    _check_tensor("crow", crow, (torch.int32,))
    _check_tensor("col", col, (torch.int32,))
    if blocks.dim() != 3 or blocks.shape[1] < 1 or blocks.shape[2] < 1:
        raise ValueError(f"blocks: expected [nnz, bm, bk] with bm, bk >= 1, got shape {tuple(blocks.shape)}")
    return blocks.shape[0], blocks.shape[1], block_width(blocks)


def check_bsr_linear(x, crow, col, blocks, bias, scales=None, zeros=None) -> None:
    nnz, bm, bk = check_bsr_tensors(crow, col, blocks, quantized=True)
    if crow.dim() != 1 or crow.numel() < 1 or col.dim() != 1 or col.numel() != nnz:
        raise ValueError(
            f"crow/col: expected 1-D crow and col with {nnz} entries, got {tuple(crow.shape)} / {tuple(col.shape)}"
        )
    for name, t in (("crow", crow), ("col", col)):
        if t.device != blocks.device:
            raise ValueError(f"{name}: expected device {blocks.device} (that of blocks), got {t.device}")
    if quant.quant_of(blocks) is None:
        if scales is not None or zeros is not None:
            raise ValueError(f"scales/zeros: only int8 / uint8 (int4) blocks take them, got {blocks.dtype}")
        weight, weight_name = blocks, "blocks"
    else:
        check_quant_blocks(blocks, scales, zeros, bk)
        weight, weight_name = scales, "scales"
    _check_linear_common(x, weight, weight_name, (crow.numel() - 1) * bm, x.shape[-1] if x.dim() else 0, bias)
    if x.shape[-1] % bk:
        raise ValueError(f"x: last dimension {x.shape[-1]} is not divisible by the block width {bk}")


# id(col) -> (weakref to col, stamp of crow/col/K) of BSR indices that passed the value checks.
_checked_indices: dict[int, tuple[weakref.ref, tuple]] = {}


def check_bsr_index_values(crow, col, blocks, k: int, grouped: bool = False) -> None:
    """crow/col ranges for K = ``k``, refused in the words of the C++ ops (``check_bsr_indices``;
    ``grouped``: stacked experts' 2-D crow, ``check_bsr_grouped_indices``).

    They read the tensors, so they stay out of the fake impl. Passed once per index tensors
    (stamp: identity, data pointer, size and version), not per call: on a GPU every scan syncs.
    Inference tensors have no version counter, so theirs are scanned on every call.
    """
    nnz, kb = blocks.shape[0], k // block_width(blocks)
    stamp, key = weight_stamp(crow, col, tuple(crow.shape), col.numel(), kb), id(col)
    hit = _checked_indices.get(key)
    if stamp is not None and hit is not None and hit[0]() is col and hit[1] == stamp:
        return
    if grouped:
        check_bsr_grouped_indices(crow, col, nnz, kb)
    else:
        check_bsr_indices(crow, col, nnz, kb, ("crow", "col"))
    if stamp is not None:
        _checked_indices[key] = (weakref.ref(col, lambda _: _checked_indices.pop(key, None)), stamp)


# -- fake (meta) implementations -------------------------------------------------------------


@torch.library.register_fake("sparsekern::nm_linear")
def _nm_linear_fake(x, values, meta, n, m, bias=None, scales=None, zeros=None, group_size=0, act_block=0):
    check_nm_linear(x, values, meta, n, m, bias, scales, zeros, group_size, act_block)
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@torch.library.register_fake("sparsekern::bsr_linear")
def _bsr_linear_fake(x, crow, col, blocks, bias=None, scales=None, zeros=None):
    check_bsr_linear(x, crow, col, blocks, bias, scales, zeros)
    return x.new_empty((*x.shape[:-1], (crow.numel() - 1) * blocks.shape[1]))


@torch.library.register_fake("sparsekern::token_scores")
def _token_scores_fake(q, k, causal=False, scale=None, cls_only=False):
    check_token_scores(q, k, cls_only)
    return q.new_empty(k.shape[:3], dtype=torch.float32)


@torch.library.register_fake("sparsekern::pruned_attention")
def _pruned_attention_fake(q, k, v, keep_idx, causal=False, scale=None):
    check_attention(q, k, v, keep_idx)
    return torch.empty_like(q)


@torch.library.register_fake("sparsekern::pruned_attention_with_scores")
def _pruned_attention_with_scores_fake(q, k, v, keep_idx, causal=False, scale=None):
    check_attention(q, k, v, keep_idx)
    return torch.empty_like(q), q.new_empty(keep_idx.shape, dtype=torch.float32)


torch.library.register_fake("sparsekern::_pruned_attention_cpu")(_pruned_attention_fake)
torch.library.register_fake("sparsekern::_pruned_attention_scores_cpu")(_pruned_attention_with_scores_fake)
torch.library.register_fake("sparsekern::_token_scores_cpu")(_token_scores_fake)


@torch.library.register_fake("sparsekern::_lean_step_cpu")
def _lean_step_fake(tokens, pos, embed, cos, sin, norms, eps, weights, specs, k_cache, v_cache, final_norm, *rest):
    return embed.new_empty((tokens.shape[0], embed.shape[1]))


@torch.library.register_fake("sparsekern::_lean_head_cpu")
def _lean_head_fake(x, weight):
    return x.new_empty((x.shape[0], weight.shape[0]))


for _name in ("_nm_linear_cpu", "_bsr_linear_cpu"):
    torch.library.register_fake(f"sparsekern::{_name}")(
        _nm_linear_fake if _name.startswith("_nm") else _bsr_linear_fake
    )


# -- real implementations: check, then run the selected backend -------------------------------


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _nm_linear_impl(x, values, meta, n, m, bias=None, scales=None, zeros=None, group_size=0, act_block=0):
    # Floating weights keep the short argument list: backends registered for it still run them.
    short = scales is None and zeros is None and not group_size and not act_block
    quant = () if short else (scales, zeros, group_size, act_block)
    return plan.run(NM_LINEAR, x, (values, meta, n, m, bias, *quant), plan.plans_for(values))


def _bsr_linear_impl(x, crow, col, blocks, bias=None, scales=None, zeros=None):
    quant = () if scales is None and zeros is None else (scales, zeros)
    return plan.run(BSR_LINEAR, x, (crow, col, blocks, bias, *quant), plan.plans_for(blocks))


def _token_scores_impl(q, k, causal=False, scale=None, cls_only=False):
    check_token_scores(q, k, cls_only)
    return dispatch.select("token_scores", q, k, causal, scale, cls_only).fn(q, k, causal, scale, cls_only)


def _checked_keep_idx(keep_idx, sk):
    if keep_idx.device.type == "cpu":
        check_keep_idx_values(keep_idx, sk)
        return keep_idx, None
    return keep_idx_on_device(keep_idx, sk)


def _pruned_attention_impl(q, k, v, keep_idx, causal=False, scale=None):
    check_attention(q, k, v, keep_idx)
    keep_idx, bad = _checked_keep_idx(keep_idx, k.shape[2])
    impl = dispatch.select("pruned_attention", q, k, v, keep_idx, causal, scale)
    return _nan_rows(impl.fn(q, k, v, keep_idx, causal, scale), bad)


def _pruned_attention_with_scores_impl(q, k, v, keep_idx, causal=False, scale=None):
    check_attention(q, k, v, keep_idx)
    keep_idx, bad = _checked_keep_idx(keep_idx, k.shape[2])
    impl = dispatch.select("pruned_attention_with_scores", q, k, v, keep_idx, causal, scale)
    out, scores = impl.fn(q, k, v, keep_idx, causal, scale)
    return _nan_rows(out, bad), _nan_rows(scores, bad)


lib.impl("nm_linear", _nm_linear_impl, "CompositeExplicitAutograd")
lib.impl("bsr_linear", _bsr_linear_impl, "CompositeExplicitAutograd")
lib.impl("token_scores", _token_scores_impl, "CompositeExplicitAutograd")
lib.impl("pruned_attention", _pruned_attention_impl, "CompositeExplicitAutograd")
lib.impl("pruned_attention_with_scores", _pruned_attention_with_scores_impl, "CompositeExplicitAutograd")


# -- autograd for the linears: gradients for x, the kept weights and bias ---------------------


def _linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*[t if isinstance(t, torch.Tensor) else None for t in inputs])
    ctx.args = inputs


def _dense_grad(grad, x):
    """dL/dW for y = x @ W.T, as [out, K] fp32."""
    return _flat(grad).float().t() @ _flat(x).float()


def nm_linear_backward(ctx, grad):
    x, values, meta, n, m, bias, scales, zeros, group_size, act_block = (*ctx.args, None, None, 0, 0)[:10]
    gx = gv = gb = None
    if ctx.needs_input_grad[0]:
        kept = values if scales is None else quant.dequantize(values, scales, zeros)
        gx = grad @ nm_to_dense(kept, meta, n, m)
    if ctx.needs_input_grad[1] and scales is None:  # integer values take no gradient
        from sparsekern.formats.nm import column_indices

        cols = column_indices(meta, n, m, values.shape[1])
        gv = _dense_grad(grad, x).gather(1, cols).to(values.dtype)
    if bias is not None and ctx.needs_input_grad[5]:
        gb = _flat(grad).sum(0).to(bias.dtype)
    return (gx, gv, None, None, None, gb, None, None, None, None)[: len(ctx.args)]


def bsr_linear_backward(ctx, grad):
    x, crow, col, blocks, bias, scales, zeros = (*ctx.args, None, None)[:7]
    gx = gblk = gb = None
    if ctx.needs_input_grad[0]:
        from sparsekern.formats.bsr import bsr_to_dense, dequantize_blocks

        w = blocks if scales is None else dequantize_blocks(blocks, scales, zeros)
        gx = grad @ bsr_to_dense(crow, col, w, x.shape[-1])
    if ctx.needs_input_grad[3] and scales is None:  # integer blocks take no gradient
        nnz, bm, bk = blocks.shape
        dw = _dense_grad(grad, x)
        tiles = dw.view(dw.shape[0] // bm, bm, -1, bk).permute(0, 2, 1, 3)
        rows = torch.repeat_interleave(
            torch.arange(crow.numel() - 1, device=crow.device), (crow[1:] - crow[:-1]).long()
        )
        gblk = tiles[rows, col.long()].to(blocks.dtype)
    if bias is not None and ctx.needs_input_grad[4]:
        gb = _flat(grad).sum(0).to(bias.dtype)
    return (gx, None, None, gblk, gb, None, None)[: len(ctx.args)]


torch.library.register_autograd("sparsekern::nm_linear", nm_linear_backward, setup_context=_linear_setup)
torch.library.register_autograd("sparsekern::bsr_linear", bsr_linear_backward, setup_context=_linear_setup)


def _recheck_bsr(x2, crow, col, blocks, bias=None, *quant):
    check_bsr_index_values(crow, col, blocks, x2.shape[-1])  # before any timing: never on bad indices


# What plans (sparsekern/plan.py) need of the linears: they run the public ops, eager or not.
NM_LINEAR = plan.LinearOp(
    "nm_linear", torch.ops.sparsekern.nm_linear, check_nm_linear, None, reference.nm_linear, nm_linear_backward, 0, 2, 4
)
BSR_LINEAR = plan.LinearOp(
    "bsr_linear",
    torch.ops.sparsekern.bsr_linear,
    check_bsr_linear,
    _recheck_bsr,
    reference.bsr_linear,
    bsr_linear_backward,
    2,
    3,
    3,
)
plan.LINEARS.update(nm_linear=NM_LINEAR, bsr_linear=BSR_LINEAR)


# -- typed wrappers: the public Python API ----------------------------------------------------


def nm_linear(x: torch.Tensor, weight: NMSparseWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.to_dense().T + bias`` for any leading dims of ``x``."""
    if not isinstance(weight, NMSparseWeight):
        raise TypeError(f"weight: expected NMSparseWeight, got {type(weight).__name__}")
    quant = () if weight.scales is None else weight.quant_args()
    return plan.linear(NM_LINEAR, x, (weight.values, weight.meta, weight.n, weight.m, bias, *quant))


def bsr_linear(x: torch.Tensor, weight: BlockSparseWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.to_dense().T + bias`` for any leading dims of ``x``."""
    if not isinstance(weight, BlockSparseWeight):
        raise TypeError(f"weight: expected BlockSparseWeight, got {type(weight).__name__}")
    if isinstance(x, torch.Tensor) and x.dim() and x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected last dimension {weight.shape[1]} (in_features), got shape {tuple(x.shape)}")
    quant = () if weight.scales is None else weight.quant_args()
    return plan.linear(BSR_LINEAR, x, (weight.crow_indices, weight.col_indices, weight.blocks, bias, *quant))


def token_scores(
    q: torch.Tensor, k: torch.Tensor, causal: bool = False, scale: float | None = None, cls_only: bool = False
) -> torch.Tensor:
    """fp32 ``[B, H, Sk]``: mean attention probability each key receives (see reference.py)."""
    return torch.ops.sparsekern.token_scores(q, k, causal, scale, cls_only)


def pruned_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep_idx: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    return_scores: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over only the keys/values at ``keep_idx`` (original positions).

    With ``return_scores`` also returns fp32 ``[B, H, kept]``: the attention mass each kept key
    receives, averaged over queries, computed in the same kernel sequence (no eager attention).
    """
    if return_scores:
        return torch.ops.sparsekern.pruned_attention_with_scores(q, k, v, keep_idx, causal, scale)
    return torch.ops.sparsekern.pruned_attention(q, k, v, keep_idx, causal, scale)


# The grouped (MoE) op's checks, fake, implementation and typed wrapper live in ops_moe.py.
from sparsekern.ops_moe import bsr_grouped_linear, nm_grouped_linear  # noqa: E402,F401

# The dense int8 linear (the quantized LM head) lives in ops_quant.py.
from sparsekern.ops_quant import quant_linear  # noqa: E402,F401
