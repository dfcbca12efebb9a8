"""``sparsekern dispatch show | clear | retune``: the measured-dispatch cache from the shell.

- ``show``: every cache file under ``$SPARSEKERN_CACHE_DIR`` (device, build, ISA, threads) and
  its entries: bucket, chosen backend, measured ms per candidate.
- ``clear``: delete them all (every device, build and thread count).
- ``retune``: measure every entry of this process's cache file (this device, build, ISA and
  thread count) again, on synthetic tensors of the recorded shape, pattern and dtype.
"""

from __future__ import annotations

import argparse

import torch

from sparsekern import dispatch, dispatch_cache, dispatch_measure

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def synthetic_args(op: str, recipe: dict) -> tuple:
    """Random arguments of the recorded shape, pattern and dtype for a linear's entry."""
    from sparsekern.formats import BlockSparseWeight, NMSparseWeight

    dtype = _DTYPES[recipe["dtype"]]
    x = torch.randn(recipe["rows"], recipe["k"]).to(dtype)
    dense = torch.randn(recipe["out"], recipe["k"])
    if op == "nm_linear":
        w = NMSparseWeight.from_dense(dense, n=recipe["n"], m=recipe["m"], prune=True).to(dtype)
        if recipe.get("quant"):
            w = w.quantize(recipe["quant"], int(recipe.get("group_size", 0)), act_block=int(recipe.get("act_block", 0)))
        return (x, w.values, w.meta, w.n, w.m, None, *w.quant_args())
    if op == "bsr_linear":
        sparsity = min(1.0, max(0.0, 1.0 - float(recipe["density"])))
        w = BlockSparseWeight.from_dense(dense, block=tuple(recipe["block"]), sparsity=sparsity).to(dtype)
        if recipe.get("quant"):
            w = w.quantize(recipe["quant"], int(recipe.get("group_size", 0)))
        return (x, w.crow_indices, w.col_indices, w.blocks, None, *(w.quant_args() if w.quant else ()))
    raise ValueError(f"op: expected nm_linear or bsr_linear, got {op!r}")


def _fmt_times(times: dict) -> str:
    return ", ".join(f"{b} {t:.3f}" for b, t in sorted(times.items(), key=lambda kv: kv[1]))


def show(args: argparse.Namespace) -> int:
    paths = dispatch_cache.files()
    if not paths:
        print(f"no dispatch cache in {dispatch_cache.cache_dir()}")
    for path in paths:
        head, entries = dispatch_cache.read_file(path)
        print(path)
        print("  " + ", ".join(f"{k} {v}" for k, v in head.items()))
        for key, e in sorted(entries.items()):
            flag = "  (suspect)" if e.get("suspect") else ""
            print(f"  {key} -> {e['backend']}  [ms: {_fmt_times(e.get('times_ms', {}))}]{flag}")
    return 0


def clear(args: argparse.Namespace) -> int:
    n = len(dispatch_cache.files())
    dispatch.clear_cache(disk=True)
    print(f"removed {n} dispatch cache file(s) from {dispatch_cache.cache_dir()}")
    return 0


def retune(args: argparse.Namespace) -> int:
    path = dispatch.cache_path(torch.device("cpu"))
    _, entries = dispatch_cache.read_file(path)
    if not entries:
        print(f"nothing to retune: no entries in {path}")
    for key, e in sorted(entries.items()):
        op, recipe = key.split("|", 1)[0], e.get("args")
        if not isinstance(recipe, dict) or op not in dispatch_measure.LINEAR_OPS:
            print(f"  {key}: skipped (no recorded arguments)")
            continue
        try:
            call_args = synthetic_args(op, recipe)
        except (KeyError, TypeError, ValueError) as exc:
            print(f"  {key}: skipped (bad recorded arguments: {exc})")
            continue
        with dispatch.use_backend("auto"):
            winner, times = dispatch.tune(op, *call_args)
        print(f"  {key} -> {winner}  [ms: {_fmt_times({b: t * 1e3 for b, t in times.items()})}] (was {e['backend']})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("dispatch", help="show, clear or re-measure the measured-dispatch cache")
    cmds = p.add_subparsers(dest="dispatch_command", required=True)
    cmds.add_parser("show", help="list cache files and their entries").set_defaults(func=show)
    cmds.add_parser("clear", help="delete every dispatch cache file").set_defaults(func=clear)
    cmds.add_parser("retune", help="measure this build's entries again on synthetic tensors").set_defaults(func=retune)
