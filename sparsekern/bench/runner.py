"""``sparsekern.bench.run``: measure the roofline, run the suites, write JSON and plots."""

from __future__ import annotations

import datetime
import json
import platform
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch

import sparsekern
from sparsekern import dispatch
from sparsekern.bench import attention, generate, layer, model
from sparsekern.bench.common import Context
from sparsekern.bench.roofline import Roofline, measure_roofline
from sparsekern.bench.timing import FULL, QUICK, Budget

SUITES = ("layer", "attention", "model", "generate")
DEFAULT_OUT = "sparsekern_results"


def git_sha() -> str:
    """Commit of the source tree sparsekern runs from (``-dirty`` with local changes), or "unknown"."""
    root = Path(sparsekern.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _default_dtype(device: torch.device) -> torch.dtype:
    # CPU: fp32 is what CPU inference runs and what torch's CSR/BSR baselines support.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but torch.cuda.is_available() is False on this machine")
    return dev


def metadata(device: torch.device, dtype: torch.dtype, quick: bool, suites: Sequence[str]) -> dict:
    return {
        "device": str(device),
        "device_name": dispatch.device_name(device),
        "torch": torch.__version__,
        "sparsekern": sparsekern.__version__,
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "quick": quick,
        "suites": list(suites),
        "dispatch_policy": dispatch.policy(),
        "backends": {
            op: sorted(dispatch.implementations(op)) for op in ("nm_linear", "bsr_linear", "pruned_attention")
        },
    }


def result_stem(meta: dict) -> str:
    """File name stem of a run: device slug, plus ``-quick``."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["device_name"]).strip("-").lower()
    return slug + ("-quick" if meta["quick"] else "")


def _progress(total: int, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]bench[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        transient=True,
        disable=not enabled,
    )


def run(
    suites: Sequence[str] = ("layer", "attention"),
    quick: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    out: str | Path | None = DEFAULT_OUT,
    tune: bool = False,
    compare: str | Path | None = None,
    model_path: str | None = None,
    shapes: Sequence[str] | None = None,
    rows: Sequence[int] | None = None,
    patterns: Sequence[str] | None = None,
    backends: Sequence[str] | None = None,
    batches: Sequence[int] | None = None,
    peer: str | None = None,
    progress: bool = True,
    show: bool = True,
    plots: bool = True,
    budget: Budget | None = None,
    roofline: Roofline | None = None,
) -> dict:
    """Run the benchmark suites; return ``{"meta", "roofline", "rows", "notes", "files"}``.

    With ``out`` the results go to ``OUT/<device>[-quick].json`` and ``-speedup.png`` /
    ``-roofline.png`` beside it. With ``show`` the table (and the comparison with ``compare``,
    an earlier JSON) is printed. ``budget`` and ``roofline`` override the timing budget and skip
    the roofline measurement (tests use both to stay fast).

    The ``generate`` suite (not part of ``all``: it loads real LLMs and takes long) reads
    ``model_path`` as ``smollm2``, ``tinyllama`` or a directory, ``batches`` as its batch sizes,
    and runs fp32 and bf16 unless ``dtype`` is given; ``peer="llama.cpp"`` adds the same models run
    by llama.cpp (:mod:`sparsekern.bench.llamacpp`).
    """
    suites = [s for s in SUITES if s != "generate"] if "all" in suites else list(suites)
    for s in suites:
        if s not in SUITES:
            raise ValueError(f"suites: expected names from {SUITES} or 'all', got {s!r}")
    if backends is not None:
        for b in backends:
            if b not in dispatch.BACKENDS:
                raise ValueError(f"backends: expected names from {dispatch.BACKENDS}, got {b!r}")
    dev = _resolve_device(device)
    dtypes = (dtype,) if dtype is not None else None
    dtype = dtype or _default_dtype(dev)
    from rich.console import Console

    console = Console(stderr=False)
    if show:
        console.print(f"[bold]sparsekern bench[/] on {dispatch.device_name(dev)}: measuring the roofline ({dtype})...")
    meta = metadata(dev, dtype, quick, suites)  # the date is the start of the run
    roof = roofline or measure_roofline(dev, dtype, quick=quick)
    ctx = Context(
        dev,
        dtype,
        budget or (QUICK if quick else FULL),
        roof,
        quick=quick,
        tune=tune,
        backends=tuple(backends) if backends else None,
    )
    todo = []
    if "layer" in suites:
        todo += layer.cases(ctx, shapes=shapes, rows=rows, patterns=patterns)
    if "attention" in suites:
        todo += attention.cases(ctx)
    if "model" in suites:
        todo += model.cases(ctx, path=None if model_path in generate.MODELS else model_path)
    if "generate" in suites:
        models = (model_path,) if model_path else None
        todo += generate.cases(ctx, models=models, patterns=patterns, batches=batches, dtypes=dtypes, peer=peer)
    results: list[dict] = []
    with _progress(len(todo), progress and show) as bar:
        task = bar.add_task("", total=len(todo))
        for case in todo:
            bar.update(task, description=case.label)
            results += case.run(ctx)
            bar.advance(task)
    ctx.scratch.clear()
    res = {"meta": meta, "roofline": roof.as_dict(), "rows": results, "notes": ctx.notes}
    res["files"] = _write(res, Path(out), plots) if out is not None else {}
    if show:
        from sparsekern.bench import report

        report.print_results(res, console)
        generate.print_rows(res, console)
        if compare is not None:
            report.print_compare(res, load(compare), console)
    return res


def load(path: str | Path) -> dict:
    """A results JSON written by :func:`run` (checked for the fields a comparison needs)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"compare: cannot read results JSON {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or "meta" not in data:
        raise ValueError(f"compare: {str(path)!r} is not a sparsekern bench results file (no 'meta'/'rows')")
    return data


def _write(res: dict, out: Path, plots: bool = True) -> dict:
    from sparsekern.bench import report

    out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(res["meta"])
    files = {"json": str(out / f"{stem}.json")}
    if plots:
        files.update(report.plot(res, out / stem))
        files.update(generate.plot(res, out / stem))
    res["files"] = files
    Path(files["json"]).write_text(json.dumps(res, indent=1, default=str) + "\n")
    return files
