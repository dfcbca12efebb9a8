"""Helpers shared by the Triton linear kernels: interpreter switch, autotune, split-K reduce.

Triton 3.9 reads ``TRITON_INTERPRET`` when a function is decorated with ``@triton.jit``, and
``triton.language`` decorates its own helpers (``tl.zeros``, ``tl.cdiv``, ``tl.sum``) when it is
first imported. So one process either interprets every kernel (CPU tensors, the tests) or
compiles every kernel (GPU, ahead-of-time checks), decided by the environment at the first
``import triton``. :data:`INTERPRET` records which; tests that need the other mode run in a
subprocess.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def triton_interprets() -> bool:
    """Whether this process's ``triton.language`` was imported in interpreter mode."""
    return type(tl.cdiv).__name__ == "InterpretedFunction"


INTERPRET = triton_interprets()

# The interpreter has no SM count. A small stand-in makes the small test shapes take the
# split-K path too, so both paths of every wrapper run under the interpreter.
_INTERPRETER_SMS = 4

# Split-K never splits further than this: each split adds rows*out fp32 of workspace traffic.
MAX_SPLITS = 16


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_SMS


def splits_for(programs: int, work_tiles: int, device: torch.device) -> int:
    """How many ways to split the reduction so ``programs`` fill the GPU about twice.

    Decode shapes with few output tiles (e.g. 4096 out / 64 = 64 programs on 132 SMs) leave
    SMs idle; splitting the K loop gives every SM work at the price of a small fp32 reduce.
    """
    target = 2 * sm_count(device)
    if programs >= target or work_tiles <= 1:
        return 1
    return max(1, min(MAX_SPLITS, triton.cdiv(target, programs), work_tiles))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for inputs of ``dtype``.

    fp32 must match torch's fp32 matmul (TF32 off by default), so plain TF32 is out. "ieee"
    runs the dot as FMAs holding whole operand rows in registers: ptxas spilled 1292 B at a
    64x64x32 tile on sm_90. "tf32x3" (split each operand in two TF32 halves, three tensor-core
    products) keeps the tensor cores at about fp32 accuracy.
    """
    return "tf32x3" if dtype == torch.float32 else "tf32"


class Fixed:
    """Launches ``fn`` at one config, like ``triton.autotune`` would after choosing it.

    Under the interpreter the tuners launch the first config of their list (its timings mean
    nothing and tuning would only slow the tests); tests and benchmarks pin any config with it.
    """

    def __init__(self, fn, config: triton.Config):
        self.fn, self.config = fn, config

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = dict(self.config.kwargs)
            g = grid({**kwargs, **meta}) if callable(grid) else grid
            opts = dict(num_warps=self.config.num_warps, num_stages=self.config.num_stages)
            return self.fn[g](*args, **kwargs, **meta, **opts)

        return launch


def autotune(fn, configs: list[triton.Config], key: list[str]):
    """``triton.autotune`` over ``configs`` when compiling; the first config when interpreting."""
    if INTERPRET:
        return Fixed(fn, configs[0])
    return triton.autotune(configs=configs, key=key)(fn)


def rows_bucket(rows: int) -> int:
    """Power-of-two bucket of the row count, the key of the per-bucket config lists."""
    return 1 << max(0, (rows - 1).bit_length())


@triton.jit
def store_tile(
    acc,  # (rows tile, out tile) fp32
    y_ptr,  # (rows, out) dtype of x; fp32 (n_splits, rows, out) when PARTIAL
    bias_ptr,  # (out,) or unused
    offs_r,
    r_mask,
    offs_n,
    n_mask,
    out_features,
    pid_s,
    stride_ys,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
):
    """Epilogue of every linear kernel: a split's fp32 partial sums, or bias + cast + store.

    int64 row offset: rows * out_features passes 2**31 (16.7k prefill tokens through a 128k-vocab head).
    """
    y_off = offs_r.to(tl.int64)[:, None] * out_features + offs_n[None, :]
    y_mask = r_mask[:, None] & n_mask[None, :]
    if PARTIAL:
        tl.store(y_ptr + pid_s.to(tl.int64) * stride_ys + y_off, acc, mask=y_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _splitk_reduce_kernel(
    ws_ptr,  # (splits, rows * out) fp32 partial sums
    bias_ptr,  # (out,) or unused
    y_ptr,  # (rows, out) contiguous, dtype of x
    numel,  # rows * out
    out_features,
    n_splits,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64: numel (and splits * numel) may pass 2**31; the split step advances a 64-bit pointer.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), tl.float32)
    ws = ws_ptr + offs
    for _ in range(n_splits):
        acc += tl.load(ws, mask=mask, other=0.0)
        ws += numel
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % out_features, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


REDUCE_BLOCK = 1024


def splitk_reduce(ws: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """``y = ws.sum(0) + bias`` with fp32 sums, written once into ``y`` (contiguous)."""
    numel = y.numel()
    grid = (triton.cdiv(numel, REDUCE_BLOCK),)
    _splitk_reduce_kernel[grid](
        ws, bias if bias is not None else ws, y, numel, y.shape[-1], ws.shape[0],
        HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK,
    )  # fmt: skip
    return y
