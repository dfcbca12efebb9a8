"""sparsekern serve: a real server process on 127.0.0.1 answering the openai client and raw HTTP;
bad input gets a 4xx naming the field and the server keeps serving; bad folders fail at start-up."""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import sparsekern as sk

openai = pytest.importorskip("openai", reason="the serving tests drive the server with the openai client")
pytest.importorskip("fastapi", reason="sparsekern serve needs transformers[serving] (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="sparsekern serve needs transformers[serving] (fastapi, uvicorn)")
tiny_lm = pytest.importorskip("tiny_lm")

CONTEXT = 96


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(folder, port):
    return subprocess.Popen(
        [sys.executable, "-m", "sparsekern.cli", "serve", str(folder), "--port", str(port), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny-2of4"
    torch.manual_seed(0)
    model = tiny_lm.llama(context=CONTEXT)
    sk.sparsify(model, "2:4", skip=("lm_head",), progress=False)
    sk.save(model, path, tokenizer=tiny_lm.tokenizer())
    return path


@pytest.fixture(scope="module")
def server(folder):
    port = _free_port()
    proc = _serve(folder, port)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                status, _ = _request(port, "GET", "/health")
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not come up in 120 s")
            time.sleep(0.5)
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _request(port, method, path, body=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def _client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_completion_and_chat(server, folder):
    client = _client(server)
    assert [m.id for m in client.models.list().data] == ["tiny-2of4"]
    done = client.completions.create(model="tiny-2of4", prompt="w1 w2 w3", max_tokens=6, temperature=0)
    assert done.usage.prompt_tokens == 3 and 1 <= done.usage.completion_tokens <= 6
    # The served pruned model generates what from_pretrained + greedy generate() give locally.
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(folder)
    tok = tiny_lm.tokenizer()
    want = local.generate(**tok("w1 w2 w3", return_tensors="pt"), max_new_tokens=6, do_sample=False)[0, 3:]
    want = [t for t in want.tolist() if t != tok.eos_token_id]
    assert tok(done.choices[0].text)["input_ids"] == want[: len(tok(done.choices[0].text)["input_ids"])]
    chat = client.chat.completions.create(
        model="tiny-2of4", messages=[{"role": "user", "content": "w4 w5"}], max_tokens=5
    )
    assert isinstance(chat.choices[0].message.content, str) and chat.usage.completion_tokens <= 5


def test_streaming(server):
    client = _client(server)
    chunks = list(
        client.chat.completions.create(
            model="tiny-2of4", messages=[{"role": "user", "content": "w7"}], max_tokens=8, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and chunks[-1].choices[0].finish_reason in ("length", "stop")
    pieces = list(client.completions.create(model="tiny-2of4", prompt="w8 w9", max_tokens=4, stream=True))
    assert pieces[-1].choices[0].finish_reason in ("length", "stop")


def test_concurrent_clients(server):
    results, client = [], _client(server)

    def one(i):
        r = client.completions.create(model="tiny-2of4", prompt=f"w{i} w{i + 1}", max_tokens=8)
        results.append(r.usage.completion_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 6 and all(1 <= n <= 8 for n in results)


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/completions", {"model": "gpt-4", "prompt": "w1"}, 404, "model: this server serves 'tiny-2of4', got 'gpt-4'"),
        ("/v1/completions", {"model": "tiny-2of4"}, 400, "prompt: expected a non-empty string, got None"),
        ("/v1/completions", {"model": "tiny-2of4", "prompt": ""}, 400, "prompt: expected a non-empty string, got ''"),
        ("/v1/completions", {"model": "tiny-2of4", "prompt": "w1", "max_tokens": 0}, 400, "max_tokens: expected an integer >= 1, got 0"),
        ("/v1/completions", {"model": "tiny-2of4", "prompt": "w1", "max_tokens": -3}, 400, "got -3"),
        ("/v1/completions", {"model": "tiny-2of4", "prompt": "w1", "max_tokens": "8"}, 400, "got '8'"),
        ("/v1/completions", {"model": "tiny-2of4", "prompt": "w1 w2", "max_tokens": CONTEXT}, 400,
         f"max_tokens: {CONTEXT} new tokens + 2 prompt tokens exceed the model's context of {CONTEXT} (at most {CONTEXT - 2} here)"),
        ("/v1/completions", {"model": "tiny-2of4", "prompt": " ".join(["w1"] * CONTEXT)}, 400, "leave no room"),
        ("/v1/completions", {"model": "tiny-2of4", "prompt": "w1", "temperature": "hot"}, 400, "temperature: expected a number"),
        ("/v1/chat/completions", {"model": "tiny-2of4"}, 400, "messages: expected a non-empty list, got None"),
        ("/v1/chat/completions", {"model": "tiny-2of4", "messages": []}, 400, "messages: expected a non-empty list"),
        ("/v1/chat/completions", {"model": "tiny-2of4", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
        ("/v1/chat/completions", {"model": "tiny-2of4", "messages": [{"role": "user", "content": "w1"}], "n": 3}, 400, "n: only 1"),
        ("/v1/completions", [1, 2], 400, "body: expected a JSON object, got list"),
    ],
)  # fmt: skip
def test_bad_requests_get_4xx(server, path, body, status, message):
    got, reply = _request(server, "POST", path, body)
    assert got == status and message in reply["error"]["message"], reply
    assert _request(server, "GET", "/health")[0] == 200


def test_malformed_json_and_unknown_routes(server):
    got, reply = _request(server, "POST", "/v1/completions", raw='{"model": "tiny-2of4", "prompt": ')
    assert got == 400 and reply["error"]["message"].startswith("body: not valid JSON")
    # transformers' model-swapping routes are not exposed
    assert _request(server, "POST", "/reset", {})[0] == 404
    assert _request(server, "POST", "/load_model", {"model": "/etc"})[0] == 404


def test_openai_client_sees_the_errors(server):
    client = _client(server)
    with pytest.raises(openai.NotFoundError, match="this server serves 'tiny-2of4'"):
        client.completions.create(model="other", prompt="w1", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny-2of4", messages=[{"role": "user", "content": "w1"}], max_tokens=0)


def test_client_disconnecting_mid_stream_leaves_the_server_serving(server):
    sock = socket.create_connection(("127.0.0.1", server), timeout=30)
    body = json.dumps({"model": "tiny-2of4", "prompt": "w1 w2", "max_tokens": CONTEXT - 2, "stream": True})
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    first = sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 200") and b"text/event-stream" in first
    sock.close()  # gone mid-stream
    done = _client(server).completions.create(model="tiny-2of4", prompt="w3", max_tokens=3)
    assert done.usage.completion_tokens >= 1


def _start_failure(folder) -> str:
    proc = _serve(folder, _free_port())
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    return out


def test_folder_that_is_not_a_model_fails_at_start_up(tmp_path):
    out = _start_failure(tmp_path)
    assert f"{tmp_path / 'config.json'}: missing: {tmp_path} is not a Hugging Face model folder" in out


def test_truncated_safetensors_fails_at_start_up(tmp_path, folder):
    bad = tmp_path / "bad"
    sk.save(sk.load(folder, tiny_lm.llama(context=CONTEXT)), bad, tokenizer=tiny_lm.tokenizer())
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-512])
    assert f"{bad / 'model.safetensors'}: truncated" in _start_failure(bad)


def test_unknown_pattern_fails_at_start_up(tmp_path, folder):
    bad = tmp_path / "bad"
    sk.save(sk.load(folder, tiny_lm.llama(context=CONTEXT)), bad, tokenizer=tiny_lm.tokenizer())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"]["pattern"] = "2:5"
    (bad / "config.json").write_text(json.dumps(cfg))
    out = _start_failure(bad)
    assert f"{bad / 'config.json'}: quantization_config.layers['model.layers.0.mlp.up_proj'].pattern" in out
    assert "'2:5' is not a supported N:M pattern" in out


def test_serve_refuses_a_bad_port():
    proc = subprocess.run(
        [sys.executable, "-m", "sparsekern.cli", "serve", os.devnull, "--port", "70000"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "--port: expected 1..65535, got 70000" in proc.stderr


def test_bench_serve_suite_reports_and_kills_its_servers(tmp_path, folder):
    from sparsekern.bench import serve as bench_serve

    res = bench_serve.run(
        str(folder), compare=str(folder), clients=(1, 2), duration=1.0, max_tokens=4, out=str(tmp_path), show=False
    )
    assert [m["name"] for m in res["models"]] == ["tiny-2of4", "tiny-2of4"]
    for m in res["models"]:
        assert [r["clients"] for r in m["rows"]] == [1, 2]
        for r in m["rows"]:
            assert r["requests"] >= 1 and r["failed"] == 0 and r["tokens_per_s"] > 0
            assert 0 < r["ttft_p50_ms"] <= r["ttft_p95_ms"] and r["server_rss_mb"] > 0
    assert len(res["speedup"]) == 2
    assert os.path.exists(res["files"]["png"]) and json.loads(open(res["files"]["json"]).read())["models"]
    # no `sparsekern serve` of this folder is left running
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if b"serve" in cmd and str(folder).encode() in cmd and b"--host" in cmd:
            left.append(pid)
    assert not left


def test_bench_serve_refuses_bad_arguments(tmp_path):
    from sparsekern.bench import serve as bench_serve

    with pytest.raises(ValueError, match="model: expected a model folder, got"):
        bench_serve.run(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"clients: expected positive integers, got \(0,\)"):
        bench_serve.run(str(tmp_path), clients=(0,))


def test_bench_serve_writes_its_json_without_matplotlib(tmp_path, monkeypatch):
    """The vLLM venv has no matplotlib: a finished load run still writes its numbers."""
    import sys

    from sparsekern.bench import serve as bench_serve

    rows = [{"clients": 1, "tokens_per_s": 8.0, "ttft_p95_ms": 900.0, "itl_p95_ms": 130.0}]
    res = {"meta": {"device_name": "cpu", "date": "2026-11-26"}, "models": [{"name": "m", "rows": rows}]}
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    files = bench_serve._write(res, tmp_path)
    assert set(files) == {"json"} and not list(tmp_path.glob("*.png"))
    saved = json.loads((tmp_path / "serve-m.json").read_text())
    assert saved["models"][0]["rows"] == rows and "matplotlib" in saved["notes"][0]


@pytest.mark.parametrize("dense_copies", [True, False])
def test_no_dense_copies_turns_every_dense_fallback_off(folder, dense_copies):
    """`sparsekern serve --no-dense-copies`: the server keeps the compressed weights only."""
    import argparse

    from sparsekern.serve import cli as serve_cli
    from sparsekern.serve.app import build_app

    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())
    args = parser.parse_args(["serve", str(folder), *([] if dense_copies else ["--no-dense-copies"])])
    assert args.dense_copies is dense_copies
    app = build_app(str(folder), device="cpu", dense_copies=args.dense_copies)
    layers = [m for m in app.state.model.modules() if isinstance(m, sk.SparseLinear)]
    assert layers and all(m.dense_fallback is dense_copies for m in layers)
    with torch.no_grad():  # and the layers still compute (prefill-sized x, the kernels only)
        x = torch.randn(64, layers[0].in_features, dtype=layers[0].dtype)
        want = torch.nn.functional.linear(x, layers[0].weight, layers[0].bias)
        torch.testing.assert_close(layers[0](x), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="dense_copies: expected bool, got str"):
        build_app(str(folder), device="cpu", dense_copies="no")


@pytest.mark.parametrize(
    ("flag", "want"), [([], "auto"), (["--dtype", "fp32"], "float32"), (["--dtype", "bf16"], "bfloat16")]
)
def test_bench_cli_passes_dtype_to_the_serve_suite(tmp_path, monkeypatch, flag, want):
    """`sparsekern bench --suite serve --dtype fp32` serves in fp32 (it once served as saved or,
    under vLLM, in vLLM's own choice for an fp32 checkpoint on CPU: bf16)."""
    from sparsekern import cli
    from sparsekern.bench import serve as bench_serve

    seen = {}

    def fake_run(model, **kw):
        seen.update(kw)
        return {"models": []}

    monkeypatch.setattr(bench_serve, "run", fake_run)
    assert cli.main(["bench", "--suite", "serve", "--model", str(tmp_path), "--no-out", *flag]) == 0
    assert seen["dtype"] == want
