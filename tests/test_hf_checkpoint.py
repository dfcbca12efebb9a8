"""sk.save -> transformers from_pretrained: complete HF folders, SparseLinear built on the meta device
(no dense weight of a pruned layer), identical outputs, refused configs and files named."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsekern as sk
from sparsekern.nn.linear import SparseLinear

transformers = pytest.importorskip("transformers")
tiny_lm = pytest.importorskip("tiny_lm")
from transformers import AutoModel, AutoModelForCausalLM  # noqa: E402

PATTERNS = ["2:4", "block16x16:0.5"]


def _pruned_llama(pattern, **kw):
    model = tiny_lm.llama(**kw)
    sk.sparsify(model, pattern, skip=("lm_head",), progress=False)
    return model


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("tie", [False, True])
def test_llama_round_trip(tmp_path, pattern, tie):
    model, tok = _pruned_llama(pattern, tie=tie), tiny_lm.tokenizer()
    sk.save(model, tmp_path, tokenizer=tok)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "sparsekern" and len(qc["layers"]) == 14
    stored = load_file(tmp_path / "model.safetensors")
    up = "model.layers.0.mlp.up_proj"
    assert f"{up}.weight" not in stored
    assert (f"{up}.values" in stored) == (pattern == "2:4") and (f"{up}.blocks" in stored) == (pattern != "2:4")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    swapped = {n for n, m in loaded.named_modules() if isinstance(m, SparseLinear)}
    assert swapped == set(qc["layers"])
    assert all(p.device.type == "cpu" for p in list(loaded.parameters()) + list(loaded.buffers()))
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = tiny_lm.ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path)("w3 w4")["input_ids"] == tok("w3 w4")["input_ids"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_bert_round_trip_with_automodel(tmp_path, pattern):
    model = tiny_lm.bert()
    sk.sparsify(model, pattern, skip=("pooler",), progress=False)
    sk.save(model, tmp_path)
    assert "generation_config.json" not in os.listdir(tmp_path)  # an encoder does not generate
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded.encoder.layer[1].attention.self.query, SparseLinear)
    x = tiny_lm.ids()
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, loaded(x).last_hidden_state)


def test_causal_lm_folder_loads_into_base_model(tmp_path):
    model = _pruned_llama("2:4")
    sk.save(model, tmp_path)
    base = AutoModel.from_pretrained(tmp_path)  # LlamaModel: names lose the "model." prefix
    assert isinstance(base.layers[0].mlp.down_proj, SparseLinear)
    x = tiny_lm.ids()
    with torch.no_grad():
        assert torch.equal(model.model(x).last_hidden_state, base(x).last_hidden_state)


def test_dense_model_saves_a_plain_hf_folder(tmp_path):
    model = tiny_lm.llama()
    sk.save(model, tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(m, SparseLinear) for m in loaded.modules())


def test_no_dense_weight_is_built_for_pruned_layers(tmp_path, monkeypatch):
    sk.save(_pruned_llama("2:4"), tmp_path)
    from sparsekern.formats import bsr, nm

    def refuse(*a, **k):
        raise AssertionError("a dense weight was built while loading")

    monkeypatch.setattr(nm.NMSparseWeight, "to_dense", refuse)
    monkeypatch.setattr(bsr.BlockSparseWeight, "to_dense", refuse)
    monkeypatch.setattr(nm, "nm_to_dense", refuse)
    built = []
    real_init = torch.nn.Linear.__init__

    def linear_init(self, in_features, out_features, *a, **k):
        real_init(self, in_features, out_features, *a, **k)
        built.append(self.weight.device.type)

    monkeypatch.setattr(torch.nn.Linear, "__init__", linear_init)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert set(built) == {"meta"}  # transformers builds the skeleton on meta, never on cpu
    names = {n for n, _ in loaded.named_parameters()}
    assert "model.layers.0.mlp.up_proj.values" in names and "model.layers.0.mlp.up_proj.weight" not in names


_RSS_SCRIPT = textwrap.dedent(
    """
    import os, sys
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
    import torch, sparsekern
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(sys.argv[2])  # lazy imports happen here, not in the measured load
    import gc; gc.collect()
    base = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    # safetensors maps the file: touch every tensor so its pages count, as they would in use
    sum(float(t.float().sum()) for t in list(model.parameters()) + list(model.buffers()))
    print(status("VmHWM:") - base)
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_while_loading_is_the_compressed_size(tmp_path):
    # TinyLlama's shape family, small: the pruned linears hold 48 MB dense, 25 MB at 2:4.
    big = _pruned_llama(
        "2:4", vocab_size=2000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2,
    )  # fmt: skip
    sk.save(big, tmp_path / "big")
    sk.save(tiny_lm.llama(), tmp_path / "warm")
    del big
    # NOTE: 38.3-39.3 MiB here until NMSparseWeight.validate (run on every loaded weight) unpacked
    # whole layers into int64 temporaries; with uint8 indices in row chunks 36.0-36.6 MiB (34.0
    # with validation skipped). Allocator and page noise is ~1 MiB: the least of three readings.
    grown = min(
        int(subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "big"), str(tmp_path / "warm")],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout.strip().splitlines()[-1])
        for _ in range(3)
    )  # fmt: skip
    size = os.path.getsize(tmp_path / "big" / "model.safetensors")
    assert grown <= 1.2 * size, f"peak RSS grew {grown / 2**20:.1f} MiB loading a {size / 2**20:.1f} MiB checkpoint"


def test_import_sparsekern_stays_cheap_and_registers_in_either_order():
    code = (
        "import sys; import sparsekern; assert 'transformers' not in sys.modules;"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; assert 'sparsekern' in M"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    code = (
        "import transformers.quantizers.auto as a; import sparsekern;"
        "assert 'sparsekern' in a.AUTO_QUANTIZER_MAPPING and 'sparsekern' in a.AUTO_QUANTIZATION_CONFIG_MAPPING"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- refusals ---------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    sk.save(_pruned_llama("2:4"), tmp_path)
    return tmp_path


def _edit_layer(folder, **fields):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update(fields)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"pattern": "3:7", "n": 3, "m": 7},
            r"config\.json: quantization_config\.layers\['model\.layers\.0\.mlp\.up_proj'\]",
        ),
        ({"pattern": "dense"}, r"up_proj'\]\.pattern: pattern: cannot parse 'dense'"),
        ({"pattern": "4:8"}, r"\.pattern: '4:8' disagrees with \{'kind': 'nm', 'n': 2, 'm': 4\}"),
        ({"kind": "coo"}, r"up_proj'\]\.kind: expected one of"),
        ({"in_features": 32}, r"shape \(128, 32\), the model's layer is \(128, 64\)"),
    ],
)
def test_bad_quantization_config_is_refused(folder, fields, message):
    _edit_layer(folder, **fields)
    with pytest.raises(ValueError, match=message) as err:
        AutoModelForCausalLM.from_pretrained(folder)
    assert str(folder / "config.json") in str(err.value)


def test_layer_not_in_model_is_refused(folder):
    cfg = json.loads((folder / "config.json").read_text())
    layers = cfg["quantization_config"]["layers"]
    layers["model.layers.9.mlp.up_proj"] = layers["model.layers.0.mlp.up_proj"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"layers\['model\.layers\.9\.mlp\.up_proj'\]: no such module"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_missing_tensor_is_refused_not_left_uninitialised(folder):
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.meta"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"tensor 'model\.layers\.1\.self_attn\.k_proj\.meta' is not in the checkpoint"
    ):
        AutoModelForCausalLM.from_pretrained(folder)


def test_misshapen_tensor_is_refused(folder):
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.values"
    tensors[key] = tensors[key][:, :-2].contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.up_proj\.values: shape"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_truncated_safetensors_names_the_file(folder):
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_corrupt_indices_are_refused_after_loading(folder):
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.1.mlp.gate_proj.meta"
    tensors[key] = torch.full_like(tensors[key], -1)  # every 2-bit index 3: repeated within each group
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.1\.mlp\.gate_proj': meta: row 0, group 0"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_save_refuses_a_tokenizer_that_cannot_save(tmp_path):
    with pytest.raises(TypeError, match="tokenizer: expected a transformers tokenizer or processor, got str"):
        sk.save(tiny_lm.llama(), tmp_path / "x", tokenizer="gpt2")
    assert not (tmp_path / "x").exists()


def test_sparsekern_load_still_reads_the_folder(folder):
    model = sk.load(folder, tiny_lm.llama())
    assert isinstance(model.model.layers[0].mlp.up_proj, SparseLinear)


def test_prune_cli_writes_a_folder_from_pretrained_reads(tmp_path, capsys):
    from sparsekern.cli import main
    from sparsekern.prune.cli import load_pretrained

    src, out = tmp_path / "dense", tmp_path / "pruned"
    tiny_lm.llama().save_pretrained(src)
    tiny_lm.tokenizer().save_pretrained(src)
    assert main(["prune", "--model", str(src), "--pattern", "2:4", "--out", str(out), "--no-progress"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded.model.layers[1].mlp.gate_proj, SparseLinear)
    x = tiny_lm.ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, load_pretrained(str(out))(x).logits)
    assert transformers.AutoTokenizer.from_pretrained(out)("w5")["input_ids"] == [8]


@pytest.mark.skipif(not (sk.HAS_C_EXT and __import__("sparsekern.ops_quant").ops_quant.fast_here()),
                    reason="no AVX-512 VBMI + VNNI int8 kernel: the head stays dense")  # fmt: skip
def test_prune_cli_quantizes_and_writes_the_int8_head(tmp_path, capsys):
    from sparsekern.cli import main
    from sparsekern.nn.quant_linear import QuantLinear

    src, out = tmp_path / "dense", tmp_path / "pruned"
    tiny_lm.llama().save_pretrained(src)
    tiny_lm.tokenizer().save_pretrained(src)
    args = ["prune", "--model", str(src), "--pattern", "2:4", "--out", str(out), "--no-progress"]
    assert main([*args, "--quant", "int4", "--group-size", "32", "--act-block", "32", "--head", "int8"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    up = loaded.model.layers[1].mlp.up_proj
    assert (up.quant, up.group_size, up.act_block) == ("int4", 32, 32)
    assert isinstance(loaded.lm_head, QuantLinear) and loaded.lm_head.act_block == 32
    # a group size that does not fit is refused by name, nothing written
    bad = tmp_path / "bad"
    assert main([*args[:-3], "--out", str(bad), "--no-progress", "--head", "int8", "--act-block", "48"]) == 2
    assert "act_block: expected a block size > 0 that divides in_features 64, got 48" in capsys.readouterr().err
    assert not bad.exists()
