"""``sparsify(model, ...)``: prune every linear layer of a model and swap in ``SparseLinear``, in place.

Order of work, so a failure never leaves a half-swapped model: find the layers, parse every
pattern and check every shape (misfits are skipped and reported), gather calibration statistics
(Wanda, SparseGPT), prune and compress every layer into new modules, and only then swap them
all in. An exception before the last step leaves the model as it was.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from sparsekern import hugepages
from sparsekern.formats.bsr import GROUP_STEP
from sparsekern.formats.nm import SUPPORTED_DTYPES
from sparsekern.formats.quant import check_quant
from sparsekern.nn.decode_attention import use_decode_attention
from sparsekern.nn.dense_head import head_module, use_dense_head
from sparsekern.nn.linear import SparseLinear, dense_weight, is_conv1d, linear_features
from sparsekern.nn.moe import SparseExperts, expert_weights, experts_layout, find_experts, up_name
from sparsekern.nn.quant_linear import QUANT as QUANT_HEAD
from sparsekern.nn.quant_linear import QuantLinear
from sparsekern.nn.report import LayerReport, SparsifyReport  # noqa: F401  (SparsifyReport: public here too)
from sparsekern.ops_quant import check_act_block, fast_here

AUTO_HEAD = "auto"  # sparsify's head=: DenseHead where the GEMV runs (sparsekern.nn.dense_head)

METHODS = ("magnitude", "wanda", "sparsegpt", "admm")


def _matches(name: str, pat: str) -> bool:
    return pat in name or fnmatch.fnmatchcase(name, pat)


def find_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` and HF ``Conv1D`` by qualified name (SparseLinear excluded)."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear) or is_conv1d(mod)}


def _fits(
    pat, k: int, out: int, dtype: torch.dtype, quant: str | None = None, group_size: int = 0, act_block: int = 0
) -> str | None:
    """Why a layer cannot take ``pat`` (None if it can), quantized to ``quant`` if given."""
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} not supported"
    if quant is not None and pat.kind not in ("nm", "block"):
        return f"{quant} values are implemented for N:M and block patterns only"
    if quant is not None and pat.kind == "block" and act_block:
        return "int8 activations (act_block) are implemented for N:M patterns only"
    if (
        quant is not None
        and pat.kind == "block"
        and group_size
        and (pat.block[1] % group_size or group_size % GROUP_STEP)
    ):
        return f"group_size {group_size} is not a multiple of {GROUP_STEP} that divides the block width {pat.block[1]}"
    if quant is not None and act_block and k % act_block:
        return f"act_block {act_block} does not divide in_features {k}"
    if quant is not None and pat.kind == "nm" and group_size and (k % group_size or group_size % pat.m):
        return f"group_size {group_size} does not divide in_features {k} in whole groups of m={pat.m}"
    if quant == "int4" and pat.kind == "nm" and (k // pat.m * pat.n) % 2:
        return "int4 packs kept weights in pairs: an odd count per row"
    if pat.kind == "nm" and k % pat.m:
        return f"in_features {k} not divisible by m={pat.m}"
    if pat.kind == "block":
        bm, bk = pat.block
        if out % bm or k % bk:
            return f"block {bm}x{bk} does not divide {out}x{k}"
    return None


def _layer_bytes(module: nn.Module) -> int:
    w = dense_weight(module)
    b = getattr(module, "bias", None)
    return w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size())


def sparsify(
    model: nn.Module,
    pattern="2:4",
    method: str = "magnitude",
    calibration: Iterable | None = None,
    skip: Iterable[str] | str | None = ("lm_head",),
    overrides: Mapping[str, str | None] | None = None,
    progress: bool = True,
    sequential: bool | None = None,
    dense_fallback: bool = True,
    quant: str | None = None,
    group_size: int = 0,
    symmetric: bool = True,
    act_block: int = 0,
    head: str | None = "auto",
) -> SparsifyReport:
    """Prune the linear layers of ``model`` in place and swap in :class:`SparseLinear`.

    - ``pattern``: ``"2:4"``, ``"4:8"``, ``"block32x32:0.9"``, ``"unstructured:0.5"`` (or a Pattern).
      Unstructured layers stay dense ``nn.Linear`` with zeroed weights: there is no kernel for them.
    - ``method``: ``"magnitude"``, ``"wanda"``, ``"sparsegpt"`` or ``"admm"`` (Wanda's mask, then the
      kept weights refitted by ADMM); all but magnitude need ``calibration``,
      an iterable of model inputs (tensor -> ``model(t)``, tuple -> ``model(*t)``, dict -> ``model(**d)``).
    - ``skip``: layer names to leave alone, by substring or glob.
    - ``overrides``: ``{glob: pattern or None}`` per layer (first matching glob wins; None skips).
    - ``sequential``: calibrate block by block (Wanda / SparseGPT / ADMM papers' algorithm, one
      block's statistics in memory; see :mod:`sparsekern.prune.sequential`). ``None`` (default):
      when the model's blocks are found, else one pass over the dense model; ``True``: required
      (``ValueError`` naming what was looked for); ``False``: one pass.
    - ``dense_fallback``: whether dispatch may run a swapped layer densely where no sparse kernel
      wins, keeping a dense copy of its weight (the report shows their bytes). ``False``: no dense
      copy, ever; the fastest sparse kernel runs every layer.
    - ``quant``: ``"int8"`` or ``"int4"``: after pruning, the kept weights of every N:M or block
      layer are rounded to integers with one scale per ``group_size`` input columns (N:M: 0 is one
      per output row, see :mod:`sparsekern.formats.quant`; blocks: runs of a block row, a multiple
      of 8 dividing the block width, 0 for the whole block row, see
      :mod:`sparsekern.formats.bsr`) and, unless ``symmetric``, a zero point. With
      ``method="sparsegpt"`` the rounding happens inside the OBS sweep (GPTQ-style: rounding
      errors are compensated with the pruning errors); the other methods round to nearest.
      ``act_block`` (e.g. 32, llama.cpp's Q8_0 block): the layers also round x to int8 per block of
      that many columns, so they run integer dot products (faster; not W8A16 / W4A16 any more; N:M
      only). Layers whose pattern or shape cannot take these (unstructured, a ``group_size`` that
      does not divide in_features or the block width) are skipped and listed.
    - ``head``: ``"auto"`` (default): the LM head, if it is left dense, becomes a
      :class:`~sparsekern.nn.dense_head.DenseHead` (the same ``nn.Linear``, its decode rows on
      sparsekern's dense GEMV, 1.8-2.3x torch's at 1 row here) where this CPU has that kernel
      for its dtype; ``None``: the head is left as it is. ``"int8"``: the LM head
      (``model.get_output_embeddings()``, left dense by ``skip``) becomes a
      :class:`~sparsekern.nn.quant_linear.QuantLinear`: int8 weights per output row and x rounded
      to int8 per ``act_block`` (32 if 0) columns. A tied head is untied (the input embedding
      stays as it is; ``config.tie_word_embeddings`` is set to False). Off the CPU, or where the
      CPU lacks the int8 kernel (AVX-512 VBMI + VNNI), the head stays dense and its report row
      says why.
    - A Llama / Qwen2 / Mistral decoder on ``sdpa`` attention with any layer swapped also gets
      sparsekern's decode attention (:mod:`sparsekern.nn.decode_attention`: one-position decode on
      the CPU as G query rows per KV head, everything else as before).

    Layers whose shape does not fit their pattern are skipped and listed in the report, as are
    weights no kernel takes (fused MoE expert stacks, routers), with the reason.
    """
    from sparsekern.prune import collect_stats, parse_pattern
    from sparsekern.prune.sequential import check_calibration, prune_sequential

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if method != "magnitude" and calibration is None:
        raise ValueError(f"calibration: method {method!r} needs calibration inputs, got None")
    if sequential not in (None, True, False):
        raise ValueError(f"sequential: expected None, True or False, got {sequential!r}")
    if not isinstance(dense_fallback, bool):
        raise TypeError(f"dense_fallback: expected bool, got {type(dense_fallback).__name__}")
    if quant is not None:
        check_quant(quant)
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 0:
            raise ValueError(f"group_size: expected an int >= 0 (0: one scale per row), got {group_size!r}")
    if head not in (None, AUTO_HEAD, QUANT_HEAD):
        raise ValueError(f"head: expected None, {AUTO_HEAD!r} or {QUANT_HEAD!r}, got {head!r}")
    head_name = _head_name(model, head, act_block or 32) if head == QUANT_HEAD else None
    if method != "magnitude":
        calibration = check_calibration(model, calibration)
    skip = [skip] if isinstance(skip, str) else list(skip or ())
    overrides = dict(overrides or {})
    default = parse_pattern(pattern) if isinstance(pattern, str) else pattern
    parsed = {g: (None if p is None else parse_pattern(p) if isinstance(p, str) else p) for g, p in overrides.items()}

    # 1. plan: which layers, which pattern each; misfits become report rows, never exceptions.
    report = SparsifyReport(method=method, pattern=str(default), dense_fallback=dense_fallback)
    plan: dict[str, tuple[nn.Module, object]] = {}
    for name, mod in find_linears(model).items():
        k, out = linear_features(mod)
        row = LayerReport(name, k, out, None, "skipped", 0.0, _layer_bytes(mod), _layer_bytes(mod))
        pat, row.note = _pick(name, skip, parsed, default)
        if not row.note:
            why = _fits(pat, k, out, dense_weight(mod).dtype, quant, group_size, act_block)
            if why:
                row.note = f"{pat}: {why}"
            else:
                plan[name] = (mod, pat)
        report.layers.append(row)
    not_pruned: dict[str, str] = {}
    for name, mod in find_experts(model).items():
        pat, why = _pick(name, skip, parsed, default)
        why = why or experts_layout(mod) or (pat and _fits_experts(pat, mod, quant))
        if why:
            not_pruned[name] = why  # listed below with the reason, as weights that stay dense
            continue
        plan[name] = (mod, pat)
        for pname in (up_name(mod), "down_proj"):
            p = getattr(mod, pname)
            size = p.numel() * p.element_size()
            report.layers.append(
                LayerReport(
                    f"{name}.{pname}", p.shape[2], p.shape[1], None, "skipped", 0.0, size, size, experts=p.shape[0]
                )
            )
    for name, p, why in expert_weights(model, set(plan), not_pruned):  # listed and counted, not pruned
        e, out, k = p.shape if p.dim() == 3 else (1, *p.shape)
        size = p.numel() * p.element_size()
        report.layers.append(LayerReport(name, k, out, None, "skipped", 0.0, size, size, why, experts=e))

    # 2-3. calibration statistics, then prune and build every replacement before the swap.
    rows = {r.name: r for r in report.layers}
    stacks = {n for n, (m, _) in plan.items() if not (isinstance(m, nn.Linear) or is_conv1d(m))}

    def build(name: str, mod: nn.Module, st=None) -> nn.Module:
        pat = plan[name][1]
        if name in stacks:
            return _build_experts(name, mod, pat, method, st, rows, dense_fallback)
        kw = {} if st is None else {"act_norm": st.act_norm, "hessian": st.hessian}
        if pat.kind == "unstructured":
            out = _masked_dense(mod, pat, method, **kw)
            nnz = int((dense_weight(out) != 0).sum())
            after = _layer_bytes(mod)
            module = "Linear (masked)"
        else:
            q = (
                {"quant": quant, "group_size": group_size, "symmetric": symmetric, "act_block": act_block}
                if quant
                else {}
            )
            out = SparseLinear.from_linear(mod, pat, method, dense_fallback=dense_fallback, **q, **kw)
            nnz = _nnz(out)
            after = out.nbytes()
            module = "SparseLinear"
        r = rows[name]
        r.pattern, r.module, r.bytes_after = str(pat), module, after
        r.sparsity = 1.0 - nnz / (r.in_features * r.out_features)
        if pat.kind == "unstructured":
            r.note = "dense storage: no unstructured kernel"
        return out

    new: dict[str, nn.Module] = {}
    layers = {n: m for n, (m, _) in plan.items()}
    need = ("norm", "hessian") if method in ("sparsegpt", "admm") else ("norm",)
    if method != "magnitude" and plan and _sequential(model, sequential):
        # Block by block on the pruned model's own activations (the papers' algorithm); it swaps
        # as it goes and puts every original back if anything raises.
        new, report.calibration = prune_sequential(model, layers, calibration, build, need=need, progress=progress)
    else:
        stats = {}
        if method != "magnitude" and plan:
            # One pass over the dense model: every planned layer's statistics at once.
            was_training = model.training
            model.eval()
            try:
                stats = collect_stats(model, layers, calibration, need=need, progress=progress)
            finally:
                model.train(was_training)
        for name in _progress(list(plan), progress):
            new[name] = build(name, plan[name][0], stats.get(name))

    if head_name is not None:
        if head_name in plan:
            raise ValueError(f"head: {head!r} quantizes the dense LM head, but {head_name!r} is being pruned; skip it")
        new[head_name] = _head_layer(model.get_submodule(head_name), act_block or 32, rows[head_name])

    # 4. swap.
    for name, mod in new.items():
        _set_submodule(model, name, mod)
    if head_name is not None and isinstance(new.get(head_name), QuantLinear):
        cfg = getattr(model, "config", None)
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False  # the int8 head is its own tensor now
    if head is not None and not isinstance(new.get(head_name), QuantLinear):
        _dense_head(model, plan, rows)
    if new:
        use_decode_attention(model)
    hugepages.rehome_module(model)  # decode streams these weights every token
    return report


def _dense_head(model: nn.Module, plan: Mapping, rows: Mapping[str, LayerReport]) -> None:
    """``head="auto"``: a head left dense becomes a DenseHead where the GEMV runs here (said in its row)."""
    found = head_module(model)
    if found is None or found[0] in plan or use_dense_head(model) is not None:
        return
    row = rows.get(found[0])
    if row is not None:
        row.note = "; ".join(filter(None, (row.note, "decode rows on sparsekern's dense GEMV (DenseHead)")))


def _head_name(model: nn.Module, head: str, act_block: int) -> str:
    """Qualified name of the LM head ``head=`` quantizes (checked before anything is pruned)."""
    name, mod = head_module(model) or (None, None)
    if name is None or not isinstance(mod, nn.Linear):
        got = "none" if mod is None else type(mod).__name__
        raise ValueError(f"head: expected the model's LM head to be an nn.Linear, got {got}")
    check_act_block(act_block, mod.in_features)
    if mod.weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"head: expected the LM head in one of {SUPPORTED_DTYPES}, got {mod.weight.dtype}")
    return name


def _head_layer(mod: nn.Linear, act_block: int, row: LayerReport) -> nn.Module:
    """The int8 head, or ``mod`` itself (with the reason in ``row``) where it would be slower."""
    if mod.weight.device.type != "cpu":  # only the reference runs it there: slower than dense
        row.note = f"int8 head not used: no int8 head kernel on {mod.weight.device.type} (the dense head is faster)"
        return mod
    if not fast_here(act_block):
        row.note = "int8 head not used: no AVX-512 VBMI + VNNI kernel here (the dense head is faster)"
        return mod
    out = QuantLinear.from_linear(mod, act_block)
    row.pattern, row.module, row.bytes_after, row.note = (
        "dense",
        "QuantLinear",
        out.nbytes,
        f"int8, x int8 per {act_block}",
    )
    return out


def quantize(
    model: nn.Module,
    quant: str,
    group_size: int = 0,
    symmetric: bool = True,
    skip: Iterable[str] | str | None = (),
    act_block: int = 0,
) -> list[str]:
    """Quantize the kept weights of every floating ``SparseLinear`` of ``model`` in place (round
    to nearest, see :meth:`NMSparseWeight.quantize` and :meth:`BlockSparseWeight.quantize`): the
    step after pruning, for a model already sparsified (``sparsify(..., quant=)`` does both).
    Layers that cannot take it (what ``sparsify`` would skip: a group size or act_block that does
    not fit, int4 with an odd kept count) are left as they are. Returns the names of the layers
    quantized."""
    from sparsekern.prune import parse_pattern

    check_quant(quant)
    skip = [skip] if isinstance(skip, str) else list(skip or ())
    done = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, SparseLinear) or mod.quant is not None:
            continue
        pat = parse_pattern(mod.pattern)
        misfit = _fits(pat, mod.in_features, mod.out_features, mod.dtype, quant, group_size, act_block)
        if any(_matches(name, s) for s in skip) or misfit:
            continue
        w = mod.sparse_weight
        w = (
            w.quantize(quant, group_size, symmetric)
            if mod.block
            else w.quantize(quant, group_size, symmetric, act_block)
        )
        new = SparseLinear(w, mod.bias, dense_fallback=mod.dense_fallback)
        _set_submodule(model, name, new)
        done.append(name)
    return done


def _pick(name: str, skip: list[str], parsed: dict, default) -> tuple[object, str]:
    """``(pattern, "")`` for a layer to prune, or ``(None, why not)``."""
    if any(_matches(name, s) for s in skip):
        return None, "skipped by name"
    glob = next((g for g in parsed if fnmatch.fnmatchcase(name, g) or g == name), None)
    pat = parsed[glob] if glob is not None else default
    return (None, f"override {glob!r}: skip") if pat is None else (pat, "")


def _fits_experts(pat, mod: nn.Module, quant: str | None) -> str | None:
    """Why a supported experts module cannot take ``pat`` (None if it can)."""
    if pat.kind not in ("nm", "block"):
        return f"{pat}: experts take N:M or block patterns (no grouped {pat.kind} kernel)"
    if quant is not None:
        return f"{pat}: {quant} experts are not implemented (float weights only)"
    up, down = getattr(mod, up_name(mod)), mod.down_proj
    for p in (up, down):
        why = _fits(pat, p.shape[2], p.shape[1], p.dtype)
        if why:
            return f"{pat}: {why}"
    return None


def _build_experts(
    name: str, mod: nn.Module, pat, method: str, stats, rows: dict, dense_fallback: bool
) -> SparseExperts:
    from sparsekern.prune.experts import prune_experts

    new, note = prune_experts(mod, pat, method, stats, dense_fallback)
    for which, pname in (("up", up_name(mod)), ("down", "down_proj")):
        r = rows[f"{name}.{pname}"]
        values = new.floating(which)
        r.pattern, r.module, r.bytes_after, r.note = str(pat), "SparseExperts", new.nbytes(which), note
        r.sparsity = 1.0 - int((values != 0).sum()) / (r.experts * r.in_features * r.out_features)
    if method == "wanda":
        rows[f"{name}.down_proj"].note = (note + "; " if note else "") + "MoE-Pruner: router-weighted Wanda scores"
    return new


def _sequential(model: nn.Module, wanted: bool | None) -> bool:
    from sparsekern.prune.sequential import find_blocks

    if wanted is False:
        return False
    found = find_blocks(model)
    if isinstance(found, str) and wanted:
        raise ValueError(f"sequential: True needs the model's blocks; {found}")
    return not isinstance(found, str)


def _nnz(layer: SparseLinear) -> int:
    # Stored entries that are non-zero: the same count as the dense weight's, without decompressing.
    kept = layer.dtype_param() if layer.quant is None else layer.sparse_weight.float_values()
    return int((kept != 0).sum())


def _masked_dense(mod: nn.Module, pat, method: str, **kw) -> nn.Module:
    """A copy of ``mod`` (same class) with the pruned weight: the unstructured case."""
    import copy

    from sparsekern.prune import prune_weight

    with torch.no_grad():
        w, _ = prune_weight(dense_weight(mod).detach(), pat, method, **kw)
        out = copy.deepcopy(mod)
        dense_weight(out).copy_(w.to(dense_weight(mod).dtype))
    return out


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a progress bar is never worth a crash
        return items
    return tqdm(items, desc="sparsify", unit="layer")
