"""The int8 LM head: ``torch.ops.sparsekern.quant_linear`` (dense int8 weight, one scale per output
row, x rounded to int8 per block) against the reference, bad input, ``QuantLinear``,
``sparsify(..., head="int8")``, save / load / HF ``from_pretrained`` and the lean decode path."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_reference

import sparsekern as sk
from sparsekern import _extension, ops_quant, reference
from sparsekern.nn.dense_head import DenseHead
from sparsekern.nn.quant_linear import QuantLinear

sys.path.insert(0, str(Path(__file__).parent))
import tiny_lm  # noqa: E402

needs_ext = pytest.mark.skipif(not _extension.HAS_C_EXT, reason="compiled extension not loaded")


def _int8(out: int, k: int, dtype=torch.float32):
    """A per-row int8 weight as QuantLinear.from_linear makes it: ``(values, scales)``."""
    lin = torch.nn.Linear(k, out, bias=False)
    layer = QuantLinear.from_linear(lin.to(dtype))
    return layer.values, layer.scales.detach()


def _check(y, x, values, scales, bias, act_block, what):
    xq = reference.quantize_x(x, act_block)
    w32 = values.float() * scales.float()[:, None]
    b32 = None if bias is None else bias.float()
    ref32 = F.linear(xq, w32, b32)
    mag = F.linear(xq.abs(), w32.abs(), None if b32 is None else b32.abs())
    # The op's result rounds once to x's dtype: ref32 rounded is what a correct kernel gives.
    assert_matches_reference(y, ref32, ref32.to(x.dtype), what, mag)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 5, 13])  # 13: the dequantized fp32 GEMM
@pytest.mark.parametrize("k", [96, 352, 512])  # 96, 352: a last 64-column step half full
def test_quant_linear_cpu(isa, k, rows, dtype):  # noqa: F811  (isa: the fixture imported above)
    values, scales = _int8(37, k, dtype)
    x = torch.randn(rows, k).to(dtype)
    bias = torch.randn(37).to(dtype) if rows != 3 else None
    y = torch.ops.sparsekern.quant_linear(x, values, scales, bias, 32)
    _check(y, x, values, scales, bias, 32, f"{isa} k={k} rows={rows} {dtype}")
    # and the C++ op computes what the reference backend does, to the rounding of x's dtype
    ref = reference.quant_linear(x, values, scales, bias, 32)
    assert ref.dtype == dtype and torch.equal(torch.isnan(ref), torch.isnan(y))


@needs_ext
@pytest.mark.parametrize("act_block", [16, 64, 96])
def test_other_act_blocks_run_the_portable_loop(act_block):
    values, scales = _int8(19, 192)
    x = torch.randn(2, 4, 192)  # leading dims kept
    y = torch.ops.sparsekern.quant_linear(x, values, scales, None, act_block)
    assert y.shape == (2, 4, 19)
    _check(y.reshape(8, 19), x.reshape(8, 192), values, scales, None, act_block, f"act_block {act_block}")


@needs_ext
@pytest.mark.parametrize("shape", [(49152, 576), (32000, 2048)], ids=["smollm2-head", "tinyllama-head"])
def test_real_head_shapes(shape):
    """SmolLM2-135M's and TinyLlama-1.1B's LM heads, one decode row in bf16: every weight read."""
    out, k = shape
    values = torch.randint(-127, 128, (out, k), dtype=torch.int8)
    scales = (torch.rand(out) * 0.01 + 1e-3).to(torch.bfloat16)
    x = torch.randn(1, k).to(torch.bfloat16)
    y = torch.ops.sparsekern.quant_linear(x, values, scales, None, 32)
    _check(y, x, values, scales, None, 32, f"{out}x{k} bf16")


@needs_ext
def test_nonfinite_rows_propagate_and_others_stay_exact():
    values, scales = _int8(21, 128)
    x = torch.randn(4, 128)
    x[1, 5], x[2, 70] = float("nan"), float("inf")
    y = torch.ops.sparsekern.quant_linear(x, values, scales, None, 32)
    assert not torch.isfinite(y[1]).any() and not torch.isfinite(y[2]).all()
    _check(y[[0, 3]], x[[0, 3]], values, scales, None, 32, "finite rows beside non-finite ones")


def test_reference_path_without_the_kernel(monkeypatch):
    monkeypatch.setattr(ops_quant, "_has_cpu_kernel", lambda: False)
    values, scales = _int8(9, 64)
    x = torch.randn(3, 64)
    y = torch.ops.sparsekern.quant_linear(x, values, scales, None, 32)
    assert torch.equal(y, reference.quant_linear(x, values, scales, None, 32))


@pytest.mark.parametrize("fn", ["quant_linear", "_quant_linear_cpu"])
def test_bad_input_names_the_argument(fn):
    if fn.startswith("_") and not _extension.HAS_C_EXT:
        pytest.skip("compiled extension not loaded")
    op = getattr(torch.ops.sparsekern, fn)
    values, scales = _int8(8, 64)
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match="values: expected dtype"):
        op(x, values.float(), scales, None, 32)
    with pytest.raises(ValueError, match=r"scales: expected shape \(8,\)"):
        op(x, values, scales[:4], None, 32)
    with pytest.raises(TypeError, match="scales: expected dtype torch.float32 .*got torch.bfloat16"):
        op(x, values, scales.bfloat16(), None, 32)
    with pytest.raises(ValueError, match="act_block: expected a block size > 0 that divides in_features 64, got 48"):
        op(x, values, scales, None, 48)
    with pytest.raises(ValueError, match="act_block"):
        op(x, values, scales, None, 0)
    with pytest.raises(ValueError, match="x: expected last dimension 64"):
        op(torch.randn(2, 32), values, scales, None, 32)
    with pytest.raises(ValueError, match=r"bias: expected shape \(8,\)"):
        op(x, values, scales, torch.randn(7), 32)
    with pytest.raises(ValueError, match="values: expected .*2-D"):
        op(x, values[0], scales, None, 32)


def test_opcheck():
    values, scales = _int8(12, 64)
    torch.library.opcheck(torch.ops.sparsekern.quant_linear, (torch.randn(3, 64), values, scales, torch.randn(12), 32))


# -- QuantLinear -------------------------------------------------------------------------------


def test_from_linear_rounds_each_row_to_its_own_step():
    lin = torch.nn.Linear(96, 10)
    layer = QuantLinear.from_linear(lin)
    step = lin.weight.detach().abs().amax(1) / 127
    assert torch.allclose(layer.scales.detach(), step)
    assert ((layer.weight - lin.weight.detach()).abs() <= step[:, None] / 2 + 1e-7).all()
    assert torch.equal(layer.bias.detach(), lin.bias.detach())
    x = torch.randn(5, 96)
    torch.testing.assert_close(layer(x), reference.quant_linear(x, layer.values, layer.scales, layer.bias, 32))
    half = layer.to(torch.bfloat16)
    assert half.values.dtype == torch.int8 and half.scales.dtype == torch.bfloat16 and half.dtype == torch.bfloat16


def test_bad_scales_are_refused():
    values, scales = _int8(6, 64)
    for bad in (0.0, float("inf"), float("nan"), -1.0):
        s = scales.clone()
        s[4] = bad
        with pytest.raises(ValueError, match="scales: expected every scale finite and > 0, got .* at row 4"):
            QuantLinear(values, s)
    layer = QuantLinear(values, scales)
    state = layer.state_dict()
    state["scales"] = state["scales"].clone()
    state["scales"][2] = 0
    with pytest.raises(RuntimeError, match="scales: expected every scale finite"):
        layer.load_state_dict(state)
    assert bool((layer.scales > 0).all())  # nothing half-written
    with pytest.raises(ValueError, match="act_block: expected a block size > 0 that divides in_features 64, got 48"):
        QuantLinear(values, scales, act_block=48)


# -- sparsify(head="int8"), checkpoints, lean decode -------------------------------------------

needs_fast = pytest.mark.skipif(
    not (_extension.HAS_C_EXT and ops_quant.fast_here()), reason="no AVX-512 VBMI + VNNI int8 kernel on this CPU"
)


@needs_fast
@pytest.mark.parametrize("tie", [False, True])
def test_sparsify_head_int8_saves_loads_and_decodes(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    model = tiny_lm.llama(tie=tie)
    embed = model.model.embed_tokens.weight.detach().clone()
    report = sk.sparsify(model, "2:4", quant="int8", act_block=32, head="int8", progress=False)
    head = model.lm_head
    assert isinstance(head, QuantLinear) and head.act_block == 32
    row = next(r for r in report.layers if r.name == "lm_head")
    assert row.module == "QuantLinear" and row.bytes_after < row.bytes_before
    assert torch.equal(model.model.embed_tokens.weight, embed)  # a tied head is untied, the embedding kept
    assert model.config.tie_word_embeddings is False
    ids = torch.randint(3, 120, (2, 6))
    with torch.no_grad():
        ref = model(ids).logits
    sk.save(model, tmp_path / "ck")
    entry = json.loads((tmp_path / "ck" / "sparsekern.json").read_text())["layers"]["lm_head"]
    assert entry == {"class": "QuantLinear", "in_features": 64, "out_features": 123, "bias": False,
                     "dtype": "float32", "quant": "int8", "act_block": 32}  # fmt: skip
    loaded = sk.load(tmp_path / "ck", tiny_lm.llama(tie=tie))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    for other in (loaded, hf):
        assert isinstance(other.lm_head, QuantLinear)
        with torch.no_grad():
            assert torch.equal(other(ids).logits, ref)
    # the lean path runs the head's kernel and decodes what model.generate does
    from sparsekern.lean.generate import decoder_for

    step = decoder_for(hf).stepper(2)
    assert getattr(step, "head", None) is None or step.head.func is torch.ops.sparsekern._quant_linear_cpu.default
    want = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(sk.generate(hf, ids, max_new_tokens=6, eos_token_id=None), want)


def test_head_stays_dense_where_the_kernel_is_missing(monkeypatch):
    from sparsekern.nn import swap

    monkeypatch.setattr(swap, "fast_here", lambda act_block: False)
    model = tiny_lm.llama()
    report = sk.sparsify(model, "2:4", head="int8", progress=False)
    assert type(model.lm_head) in (torch.nn.Linear, DenseHead)  # dense, on the GEMV where it runs
    row = next(r for r in report.layers if r.name == "lm_head")
    assert "no AVX-512 VBMI + VNNI kernel here" in row.note


def test_head_stays_dense_off_the_cpu():
    from sparsekern.nn import swap

    row = swap.LayerReport("lm_head", 64, 123, None, "skipped", 0.0, 0, 0)
    lin = torch.nn.Linear(64, 123, device="meta")
    assert swap._head_layer(lin, 32, row) is lin and "no int8 head kernel on meta" in row.note


def test_bad_head_requests_are_refused_before_pruning():
    model = tiny_lm.llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="head: expected None, 'auto' or 'int8', got 'int4'"):
        sk.sparsify(model, "2:4", head="int4", progress=False)
    with pytest.raises(ValueError, match="act_block: expected a block size > 0 that divides in_features 64, got 48"):
        sk.sparsify(model, "2:4", head="int8", act_block=48, progress=False)
    with pytest.raises(ValueError, match="head: 'int8' quantizes the dense LM head, but 'lm_head' is being pruned"):
        sk.sparsify(model, "2:4", skip=[], head="int8", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched


@needs_fast
def test_checkpoint_with_a_bad_head_is_refused(tmp_path):
    model = tiny_lm.llama()
    sk.sparsify(model, "2:4", head="int8", progress=False)
    sk.save(model, tmp_path / "ck")
    cfg_file = tmp_path / "ck" / "sparsekern.json"
    cfg = json.loads(cfg_file.read_text())
    for key, value, words in (
        ("quant", "int4", r"lm_head'\]\.quant: expected 'int8', got 'int4'"),
        ("act_block", 48, r"lm_head'\]\.act_block: 48 does not divide in_features 64"),
        ("out_features", 0, r"lm_head'\]\.out_features: expected a positive int"),
    ):
        bad = json.loads(json.dumps(cfg))
        bad["layers"]["lm_head"][key] = value
        cfg_file.write_text(json.dumps(bad))
        fresh = tiny_lm.llama()
        with pytest.raises(ValueError, match=words):
            sk.load(tmp_path / "ck", fresh)
        assert type(fresh.lm_head) is torch.nn.Linear
    # a zero scale in the file
    from safetensors.torch import load_file, save_file

    cfg_file.write_text(json.dumps(cfg))
    tensors = load_file(tmp_path / "ck" / "model.safetensors")
    tensors["lm_head.scales"][3] = 0
    save_file(tensors, tmp_path / "ck" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layer 'lm_head': scales: expected every scale finite and > 0"):
        sk.load(tmp_path / "ck", tiny_lm.llama())


def test_bench_patterns_take_the_int8_head(monkeypatch):
    from sparsekern.bench.generate import sparsify_pattern
    from sparsekern.nn import swap

    monkeypatch.setattr(swap, "fast_here", lambda act_block: True)  # the swap, not the kernel, is under test
    model = tiny_lm.llama()
    sparsify_pattern(model, "2:4+int4g32a32+h8")
    assert isinstance(model.lm_head, QuantLinear)
    assert model.model.layers[0].mlp.up_proj.quant == "int4" and model.model.layers[0].mlp.up_proj.act_block == 32
    model = tiny_lm.llama()
    sparsify_pattern(model, "2:4+h8")
    assert isinstance(model.lm_head, QuantLinear) and model.model.layers[0].mlp.up_proj.quant is None
    with pytest.raises(ValueError, match=r"pattern: expected BASE\[\+QUANT\]\[\+h8\], got '2:4\+h8\+int8'"):
        sparsify_pattern(tiny_lm.llama(), "2:4+h8+int8")
