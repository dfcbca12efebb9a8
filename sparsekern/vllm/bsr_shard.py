"""A rank's share of a block-sparse (BSR) weight, cut where vLLM's own loaders cut a dense one.

A BSR weight's block count depends on the data, so it cannot be preallocated and narrowed the
way vLLM loads dense and N:M weights. Instead vLLM's weight loader for the layer is asked where
each checkpoint row and column would land on this rank: it loads ``arange(rows)`` and
``arange(cols)`` into two index "probes" with the same shard id as the real tensor, which covers
every layout vLLM knows (column / row parallel, fused q/k/v with replicated KV heads, fused
gate/up, fused on disk) without restating its arithmetic. The blocks of the rows and columns
that land here are then selected, and a split that would cut through a block is refused.
"""

from __future__ import annotations

import torch
from vllm.model_executor.parameter import ChannelQuantScaleParameter, RowvLLMParameter

from sparsekern.formats.bsr import BlockSparseWeight


def probe(layer: torch.nn.Module, loader, shard: tuple, local: tuple, disk: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``loader`` (vLLM's, for ``layer``) puts a checkpoint tensor of shape ``disk`` carrying
    ``shard`` in this rank's weight of shape ``local``: ``(checkpoint row of each local row, -1
    where another shard lands; checkpoint column of each local column)``."""
    (local_rows, local_cols), (rows, cols) = local, disk
    row_probe = ChannelQuantScaleParameter(
        data=torch.full((local_rows,), -1, dtype=torch.int64), output_dim=0, weight_loader=loader
    )
    col_probe = RowvLLMParameter(
        data=torch.full((local_cols,), -1, dtype=torch.int64), input_dim=0, weight_loader=loader
    )
    for p in (row_probe, col_probe):
        p.tp_rank, p.tp_size = layer.tp_rank, layer.tp_size
    loader(row_probe, torch.arange(rows), *shard)
    loader(col_probe, torch.arange(cols), *shard)
    return row_probe.data, col_probe.data


def _aligned_runs(pos: torch.Tensor, size: int) -> bool:
    """``pos`` is whole runs of ``size`` consecutive indices, each starting at a multiple of ``size``."""
    if pos.numel() % size:
        return False
    runs = pos.view(-1, size)
    return bool(((runs[:, 0] % size == 0) & (runs == runs[:, :1] + torch.arange(size)).all(1)).all())


def select(weight: BlockSparseWeight, row_map: torch.Tensor, col_map: torch.Tensor, where: str) -> tuple:
    """This rank's blocks of ``weight`` (validated) given :func:`probe`'s maps.

    Returns ``(local block row, local block column, per-block tensors)`` of the kept blocks (the
    blocks, then their scales and zero points when quantized) and the local block rows this shard
    covers. ``ValueError`` when a rank's rows or columns would cut a block.
    """
    bm, bk = weight.block
    dest = (row_map >= 0).nonzero().flatten()
    src = row_map[dest]
    if not (_aligned_runs(dest, bm) and _aligned_runs(src, bm)):
        raise ValueError(
            f"{where}: tensor parallelism would split {bm}x{bk} blocks across ranks (this rank takes "
            f"{src.numel()} of the rows, not whole block rows of {bm}); use a block height that divides "
            "each rank's share or a smaller tensor-parallel size"
        )
    k = col_map.numel()
    contiguous = k > 0 and bool((col_map == col_map[0] + torch.arange(k)).all())
    if not contiguous or int(col_map[0]) % bk or k % bk:
        first = int(col_map[0]) if k else 0
        raise ValueError(
            f"{where}: tensor parallelism would split {bm}x{bk} blocks across ranks (this rank takes {k} input "
            f"columns from column {first}, not whole block columns of {bk}); use a block width that divides "
            "each rank's share or a smaller tensor-parallel size"
        )
    dest_rows, src_rows = dest[::bm] // bm, src[::bm] // bm
    crow = weight.crow_indices.long()
    row_of = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow[1:] - crow[:-1])
    dest_of = torch.full((crow.numel() - 1,), -1, dtype=torch.int64)
    dest_of[src_rows] = dest_rows
    first = int(col_map[0]) // bk
    col = weight.col_indices.long()
    d = dest_of[row_of]
    keep = (d >= 0) & (col >= first) & (col < first + k // bk)
    per_block = tuple(t[keep] for t in (weight.blocks, weight.scales, weight.zeros) if t is not None)
    return d[keep], col[keep] - first, per_block, dest_rows


def assemble(pieces: list[tuple], block_rows: int, block_cols: int, where: str) -> tuple:
    """``(crow, col, per-block tensors)`` of the local weight from :func:`select`'s pieces (every
    block row once), the blocks in row-major order."""
    covered = torch.cat([p[3] for p in pieces]) if pieces else torch.empty(0, dtype=torch.int64)
    if covered.numel() != block_rows or not torch.equal(covered.sort().values, torch.arange(block_rows)):
        raise ValueError(
            f"{where}: the loaded shards cover block rows {covered.tolist()}, expected 0..{block_rows - 1}"
        )
    rows = torch.cat([p[0] for p in pieces])
    cols = torch.cat([p[1] for p in pieces])
    per_block = [torch.cat(ts) for ts in zip(*(p[2] for p in pieces))]
    order = torch.argsort(rows * block_cols + cols, stable=True)
    crow = torch.zeros(block_rows + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=block_rows).cumsum(0)
    return crow.to(torch.int32), cols[order].to(torch.int32), tuple(t[order] for t in per_block)
