"""`sparsekern bench --suite generate --peer llama.cpp`: the GGUF writer, the refusals, and (where the
venv from bench/llamacpp_env.sh exists) llama.cpp computing the same model as transformers."""

import math
import re
import sys
from pathlib import Path

import pytest
import torch

from sparsekern import cli
from sparsekern.bench import generate, llamacpp

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[1]


def _tiny(tied: bool = False, **kw):
    cfg = dict(
        hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        vocab_size=300, max_position_embeddings=256, tie_word_embeddings=tied,
    )  # fmt: skip
    cfg.update(kw)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # HF initialises norms to ones: random ones show a swapped tensor
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def _ctx():
    from sparsekern.bench.common import Context
    from sparsekern.bench.roofline import Roofline
    from sparsekern.bench.timing import QUICK

    roof = Roofline(bandwidth_gbs=10.0, peak_tflops=0.1, dtype="float32", matmul_n=0, copy_mib=0)
    return Context(torch.device("cpu"), torch.float32, QUICK, roof, quick=True)


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    # llama.cpp row order inside a head is (0, d/2, 1, d/2 + 1, ...): undo it
    out, k = w.shape
    return w.reshape(heads, out // heads // 2, 2, k).transpose(1, 2).reshape(out, k)


def _expected(model) -> dict[str, torch.Tensor]:
    cfg, inner = model.config, model.model
    want = {"token_embd.weight": inner.embed_tokens.weight, "output_norm.weight": inner.norm.weight}
    if not cfg.tie_word_embeddings:
        want["output.weight"] = model.lm_head.weight
    for i, layer in enumerate(inner.layers):
        a, m = layer.self_attn, layer.mlp
        for name, t in (
            ("attn_norm", layer.input_layernorm.weight), ("attn_q", a.q_proj.weight), ("attn_k", a.k_proj.weight),
            ("attn_v", a.v_proj.weight), ("attn_output", a.o_proj.weight), ("ffn_norm", layer.post_attention_layernorm.weight),
            ("ffn_gate", m.gate_proj.weight), ("ffn_up", m.up_proj.weight), ("ffn_down", m.down_proj.weight),
        ):  # fmt: skip
            want[f"blk.{i}.{name}.weight"] = t
    return want


@pytest.mark.parametrize("tied", [False, True])
def test_write_gguf_round_trip(tmp_path, tied):
    model = _tiny(tied)
    path = llamacpp.write_gguf(model, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(path))
    got = {t.name: t for t in reader.tensors}
    want = _expected(model)
    assert set(got) == set(want)
    cfg = model.config
    for name, w in want.items():
        t = got[name]
        assert t.tensor_type.name == ("F16" if w.dim() == 2 else "F32"), name
        assert tuple(t.data.shape) == tuple(w.shape), name
        data = torch.from_numpy(t.data.copy())
        if ".attn_q." in name:
            data = _unpermute(data, cfg.num_attention_heads)
        elif ".attn_k." in name:
            data = _unpermute(data, cfg.num_key_value_heads)
        assert torch.equal(data, w.detach().to(data.dtype)), name
    fields = {k: reader.fields[k].contents() for k in reader.fields}
    assert fields["general.architecture"] == "llama"
    assert fields["llama.attention.head_count"] == 6 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.block_count"] == 2 and fields["llama.feed_forward_length"] == 160
    assert fields["llama.rope.dimension_count"] == 16
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size == len(set(tokens)) and tokens[3 + 0x0A] == "<0x0A>"
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_info_counts_what_a_decode_step_reads(tmp_path, tied):
    model = _tiny(tied)
    info = llamacpp.gguf_info(llamacpp.write_gguf(model, tmp_path / "m.gguf"))
    total = sum(w.numel() * (2 if w.dim() == 2 else 4) for w in _expected(model).values())
    emb = model.model.embed_tokens.weight.numel() * 2
    assert info["type"] == "F16"
    assert info["weight_bytes"] == (total if tied else total - emb)  # an untied embedding: one row a step
    assert (info["layers"], info["kv_heads"], info["head_dim"], info["vocab"]) == (2, 2, 16, 300)


def _rope_hf(x, pos, base=10000.0):  # rotate_half: pairs (i, i + d/2)
    d = x.shape[-1]
    ang = pos[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin


def _rope_llamacpp(x, pos, base=10000.0):  # ggml's normal rope: pairs (2i, 2i + 1)
    d = x.shape[-1]
    ang = pos[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * ang.cos() - x1 * ang.sin(), x0 * ang.sin() + x1 * ang.cos()], -1).flatten(-2)


def test_rope_permutation_gives_the_same_attention_scores():
    heads, kv_heads, d, hidden, seq = 6, 2, 16, 40, 7
    g = torch.Generator().manual_seed(1)
    wq, wk = torch.randn(heads * d, hidden, generator=g), torch.randn(kv_heads * d, hidden, generator=g)
    x, pos = torch.randn(seq, hidden, generator=g), torch.arange(seq, dtype=torch.float64) + 3

    def scores(wq, wk, rope):
        q = rope((x.double() @ wq.double().T).view(seq, heads, d).transpose(0, 1), pos)
        k = rope((x.double() @ wk.double().T).view(seq, kv_heads, d).transpose(0, 1), pos)
        return q @ k.repeat_interleave(heads // kv_heads, 0).transpose(1, 2)

    hf = scores(wq, wk, _rope_hf)
    cpp = scores(llamacpp._rope_permute(wq, heads), llamacpp._rope_permute(wk, kv_heads), _rope_llamacpp)
    torch.testing.assert_close(cpp, hf, rtol=1e-10, atol=1e-9)
    assert not torch.allclose(scores(wq, wk, _rope_llamacpp), hf)  # without the permutation they differ


@pytest.mark.parametrize(
    "kw, field", [({"attention_bias": True}, "attention_bias"), ({"vocab_size": 200}, "vocab_size")]
)
def test_write_gguf_refuses_what_it_cannot_write(tmp_path, kw, field):
    with pytest.raises(ValueError, match=field):
        llamacpp.write_gguf(_tiny(**kw), tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_write_gguf_refuses_sparse_layers(tmp_path):
    import sparsekern as sk

    model = _tiny()
    sk.sparsify(model, "2:4", "magnitude", progress=False)
    with pytest.raises(ValueError, match="SparseLinear"):
        llamacpp.write_gguf(model, tmp_path / "m.gguf")


def test_write_gguf_leaves_nothing_half_written(tmp_path, monkeypatch):
    calls = []

    def failing(self, tensor, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(self, tensor, *a, **k)

    original = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    with pytest.raises(OSError, match="disk full"):
        llamacpp.write_gguf(_tiny(), tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_env_script_pins_the_version_the_module_names():
    script = (ROOT / llamacpp.ENV_SCRIPT).read_text()
    assert re.search(r"^VERSION=(\S+)", script, re.M).group(1) == llamacpp.VERSION


def test_cli_refuses_without_the_venv_naming_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEKERN_LLAMACPP_VENV", str(tmp_path / "none"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--suite", "generate", "--peer", "llama.cpp", "--quick", "--no-out"])
    msg = str(exc.value.code)
    assert f"bash {llamacpp.ENV_SCRIPT}" in msg and str(tmp_path / "none") in msg and llamacpp.VERSION in msg


def test_cli_refuses_a_venv_without_llama_cpp(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(Path(sys.executable))
    monkeypatch.setenv("SPARSEKERN_LLAMACPP_VENV", str(tmp_path))
    with pytest.raises(llamacpp.LlamaCppMissing, match="cannot import llama_cpp"):
        llamacpp.find_python()
    with pytest.raises(llamacpp.LlamaCppMissing, match=re.escape(llamacpp.ENV_SCRIPT)):
        generate.cases(_ctx(), models=("tinyllama",), peer="llama.cpp")


def test_peer_needs_the_generate_suite():
    with pytest.raises(SystemExit, match="needs --suite generate"):
        cli.main(["bench", "--suite", "layer", "--peer", "llama.cpp", "--no-out"])


# ---- with the llama.cpp venv (bash bench/llamacpp_env.sh); skipped where it is absent ----------------


@pytest.fixture(scope="module")
def peer_python():
    try:
        return llamacpp.find_python()[0]
    except llamacpp.LlamaCppMissing as exc:
        pytest.skip(str(exc))


def _hf_nll(model, windows) -> float:
    with torch.no_grad():
        logits = model(input_ids=windows).logits.double()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="sum"
    ).item()


def test_llamacpp_computes_the_model_transformers_computes(tmp_path, peer_python):
    model = _tiny()
    with torch.no_grad():
        for layer in model.model.layers:  # sharp attention: a wrong rope order must change the NLL
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
        for p in model.parameters():  # the F16 file holds fp16-rounded weights: compare with exactly those
            p.copy_(p.half().float())
    path = llamacpp.write_gguf(model, tmp_path / "m.gguf")
    windows = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    prompts = generate.prompt_ids(300, 1, (16,))
    m = llamacpp.run_gguf(peer_python, path, prompts, new_tokens=4, reps=1, windows=windows)
    assert m["nll_tokens"] == 2 * 23
    # ggml rounds activations to fp16 in its F16 dot products: ~1e-5 nats per token measured here
    assert m["nll"] / 46 == pytest.approx(_hf_nll(model, windows) / 46, abs=2e-3)
    assert m["step_s"] > 0 and set(m["ttft_s"]) == {"16"} and len(m["tokens"]) == 5
    with torch.no_grad():
        first = model(input_ids=prompts[16]).logits[0, -1]
    top2 = first.topk(2).values
    if top2[0] - top2[1] > 1e-2:  # no near-tie: the first greedy token must agree
        assert m["tokens"][0] == int(first.argmax())


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_llamacpp_quantize_writes_the_type_asked(tmp_path, peer_python, qtype):
    f16 = llamacpp.write_gguf(_tiny(), tmp_path / "m.gguf")  # rows of 96 and 160: whole 32-blocks
    out = llamacpp.quantize(peer_python, f16, tmp_path / f"m-{qtype}.gguf", qtype, threads=1)
    info = llamacpp.gguf_info(out)
    assert info["type"] == qtype and info["weight_bytes"] < llamacpp.gguf_info(f16)["weight_bytes"]
    m = llamacpp.run_gguf(peer_python, out, generate.prompt_ids(300, 1, (8,)), 2, 1)
    assert math.isfinite(m["step_s"]) and "nll" not in m
