"""The llama.cpp side of ``--peer llama.cpp``: runs under the llama-cpp-python venv's python.

sparsekern never imports this module: :mod:`sparsekern.bench.llamacpp` runs it as a script
(``python -I llamacpp_worker.py ...``, isolated so this folder's modules cannot shadow anything), so
it needs only the standard library, numpy and ``llama_cpp``.

    quantize SRC DST TYPE THREADS   llama.cpp's own quantizer (llama_model_quantize), TYPE e.g. Q8_0
    run JOB.json OUT.json           greedy decode timings and window NLLs of one GGUF (keys below)
"""

from __future__ import annotations

import ctypes
import json
import statistics
import sys
import time
from pathlib import Path


def quantize(src: str, dst: str, type_name: str, threads: int) -> None:
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}", None)
    if ftype is None:
        raise SystemExit(f"quantize: llama.cpp has no file type MOSTLY_{type_name}")
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = ftype
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"quantize: llama_model_quantize({src} -> {type_name}) returned {rc}")


def _last_logits(llm):
    import llama_cpp
    import numpy as np

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def _decode(llm, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    """(prefill + first token s, s per decode step, the greedy tokens): what a user's loop does."""
    llm.reset()  # the next eval drops the KV cache past position 0
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = int(_last_logits(llm).argmax())
    t1 = time.perf_counter()
    out = [tok]
    for _ in range(new):
        llm.eval([tok])
        tok = int(_last_logits(llm).argmax())
        out.append(tok)
    return t1 - t0, (time.perf_counter() - t1) / new, out


def _nll(llm, windows: list[list[int]]) -> tuple[float, int]:
    """Summed next-token NLL (float64 log-softmax) over windows scored independently, and its count."""
    import numpy as np

    total, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = llm.scores[: len(w) - 1].astype(np.float64)
        top = logits.max(axis=1)
        lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        total += float((lse - logits[np.arange(len(w) - 1), w[1:]]).sum())
        count += len(w) - 1
    return total, count


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run(job: dict) -> dict:
    """``job``: path, threads, prompts (lists of ids, the first also timed for decode), new_tokens,
    reps, windows (lists of ids, may be empty)."""
    import llama_cpp

    prompts, new, reps = job["prompts"], job["new_tokens"], job["reps"]
    n_ctx = max(len(p) for p in prompts) + new + 8
    common = dict(n_threads=job["threads"], n_threads_batch=job["threads"], verbose=False)
    llm = llama_cpp.Llama(model_path=job["path"], n_ctx=n_ctx, **common)
    for p in prompts:  # warm-up at every prompt length (first-call allocations stay out of the timing)
        _decode(llm, p, 2)
    ttft = {str(len(p)): statistics.median(_decode(llm, p, 1)[0] for _ in range(reps)) for p in prompts}
    runs = [_decode(llm, prompts[0], new) for _ in range(reps)]
    res = {
        "version": llama_cpp.__version__,
        "ttft_s": ttft,
        "step_s": statistics.median(r[1] for r in runs),
        "tokens": runs[0][2],
    }
    del llm
    if job["windows"]:
        n = max(len(w) for w in job["windows"])
        llm = llama_cpp.Llama(model_path=job["path"], n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True, **common)
        res["nll"], res["nll_tokens"] = _nll(llm, job["windows"])
        del llm
    res["peak_rss"] = _peak_rss()
    return res


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "quantize":
        quantize(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    if len(argv) == 3 and argv[0] == "run":
        res = run(json.loads(Path(argv[1]).read_text()))
        Path(argv[2]).write_text(json.dumps(res))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
