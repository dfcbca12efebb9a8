"""Quantized block-sparse weights (int8, int4 two per byte, scales per group of a stored block
row, optional zeros): the format, the op's checks and backends against the reference, bad input,
SparseLinear, sparsify (SparseGPT rounding inside its sweep), save / load and HF ``from_pretrained``.
The CPU kernels' own cases (every ISA, block shape and row count) are in test_bsr_quant_cpu.py."""

import json

import pytest
import tiny_lm
import torch
import torch.nn.functional as F
from conftest import assert_matches_dense

import sparsekern as sk
from sparsekern import _extension, reference
from sparsekern.formats import quant as q
from sparsekern.formats.bsr import BlockSparseWeight, dequantize_blocks

needs_ext = pytest.mark.skipif(not _extension.HAS_C_EXT, reason="compiled extension not loaded")


def _qbsr(out, k, block, quant, group_size=0, symmetric=True, sparsity=0.6, dtype=torch.float32):
    w = BlockSparseWeight.from_dense(torch.randn(out, k), block, sparsity)
    return w.quantize(quant, group_size, symmetric).to(dtype)


def _check(y, x, wq, bias, what):
    """``y`` against the fp32 reference on the weight dequantized from fp32 scales (as the kernels)."""
    dense32 = BlockSparseWeight(wq.crow_indices, wq.col_indices, wq.blocks, wq.shape, wq.scales.float(),
                                wq.zeros).to_dense()  # fmt: skip
    assert_matches_dense(y, x, dense32, bias, what)


# -- format ----------------------------------------------------------------------------------


def test_int4_blocks_pack_columns_in_pairs():
    """Column 2j of a block row in the low nibble, 2j + 1 in the high one; scales per group."""
    dense = torch.zeros(8, 16)
    dense[:, 8:] = torch.arange(-4.0, 4.0).repeat(8, 1)  # block column 1: -4..3, one step of 1
    w = BlockSparseWeight.from_dense(dense, (8, 8)).quantize("int4", 8)
    assert w.blocks.shape == (1, 8, 4) and w.blocks.dtype == torch.uint8 and w.block == (8, 8)
    assert w.scales.shape == (1, 8, 1) and torch.all(w.scales == 4.0 / 7)
    nibbles = q.unpack_int4(w.blocks.reshape(8, 4))
    assert torch.equal(nibbles[0], (torch.arange(-4.0, 4.0) / (4.0 / 7)).round().to(torch.uint8) + 8)
    assert int(w.blocks[0, 0, 0]) == int(nibbles[0, 0]) | int(nibbles[0, 1]) << 4


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [0, 8, 16])
@pytest.mark.parametrize("quant", q.QUANTS)
def test_quantize_error_within_half_a_step(quant, group_size, symmetric):
    w = BlockSparseWeight.from_dense(torch.randn(48, 96), (16, 32), 0.5)
    wq = w.quantize(quant, group_size, symmetric).validate()
    groups = 1 if group_size == 0 else 32 // group_size
    assert wq.quant == quant and wq.dtype == torch.float32 and wq.group_size == (group_size or 32)
    assert wq.scales.shape == (w.nnz_blocks, 16, groups) and (wq.zeros is None) == symmetric
    assert torch.equal(wq.crow_indices, w.crow_indices) and torch.equal(wq.col_indices, w.col_indices)
    step = wq.scales.repeat_interleave(32 // groups, dim=2)
    assert ((wq.float_values() - w.blocks).abs() <= step / 2 + 1e-6).all()
    assert (wq.to_dense()[w.to_dense() == 0] == 0).all()  # pruned blocks stay pruned
    # The stored form round-trips through a new object unchanged (what save / load rely on).
    zeros = None if wq.zeros is None else wq.zeros.clone()
    again = BlockSparseWeight(wq.crow_indices.clone(), wq.col_indices.clone(), wq.blocks.clone(), wq.shape,
                              wq.scales.clone(), zeros)  # fmt: skip
    assert torch.equal(again.to_dense(), wq.to_dense()) and again.group_size == wq.group_size


def test_weight_without_blocks_quantizes_and_runs():
    w = BlockSparseWeight.from_dense(torch.zeros(32, 64), (16, 32)).quantize("int4", 16, symmetric=False)
    assert w.nnz_blocks == 0 and w.scales.shape == (0, 16, 2) and torch.equal(w.to_dense(), torch.zeros(32, 64))
    bias = torch.randn(32)
    for backend in ("reference", "dense", "cpu"):
        with sk.use_backend(backend):
            torch.testing.assert_close(sk.ops.bsr_linear(torch.randn(3, 64), w, bias), bias.expand(3, 32))


def test_to_dtype_moves_scales_and_keeps_integers():
    wq = _qbsr(32, 64, (16, 32), "int4", 16).to(torch.bfloat16)
    nnz = wq.nnz_blocks
    assert wq.blocks.dtype == torch.uint8 and wq.scales.dtype == torch.bfloat16 and wq.dtype == torch.bfloat16
    assert wq.to_dense().dtype == torch.bfloat16
    assert wq.nbytes() == nnz * 16 * 16 + nnz * 16 * 2 * 2 + 4 * (3 + nnz)
    assert "quant=int4, group_size=16" in repr(wq)


def test_bad_quantized_blocks_are_refused():
    wq = _qbsr(32, 64, (16, 32), "int4", 16, symmetric=False)
    nnz = wq.nnz_blocks
    parts = dict(crow_indices=wq.crow_indices, col_indices=wq.col_indices, blocks=wq.blocks, shape=(32, 64),
                 scales=wq.scales, zeros=wq.zeros)  # fmt: skip

    def make(**kw):
        return BlockSparseWeight(**(parts | kw)).validate()

    with pytest.raises(
        ValueError, match=rf"scales: expected shape \({nnz}, 16, groups\) .* width 32 .* got \({nnz}, 16, 3\)"
    ):
        make(scales=wq.scales[..., :1].expand(-1, -1, 3).contiguous(), zeros=None)
    with pytest.raises(ValueError, match=r"scales: expected shape .* multiple of 8 columns, got .*16, 8\)"):
        make(scales=torch.ones(nnz, 16, 8), zeros=None)  # runs of 4 columns
    with pytest.raises(TypeError, match="scales: expected dtype"):
        make(scales=wq.scales.to(torch.int32))
    with pytest.raises(TypeError, match="scales: expected torch.Tensor for int4 blocks"):
        make(scales=None)
    bad = wq.scales.clone()
    bad[1, 3, 1] = 0.0
    with pytest.raises(ValueError, match=r"scales: expected finite values > 0, got 0.0 at block 1, row 3, group 1"):
        make(scales=bad)
    with pytest.raises(ValueError, match="scales: expected finite values > 0, got inf"):
        make(scales=torch.full_like(wq.scales, float("inf")))
    with pytest.raises(ValueError, match=r"zeros: expected values in 0..15, got 16"):
        make(zeros=torch.full_like(wq.zeros, 16))
    with pytest.raises(TypeError, match="zeros: expected an int8 tensor"):
        make(zeros=wq.zeros.to(torch.int32))
    with pytest.raises(ValueError, match=r"zeros: expected shape .*\(that of scales\)"):
        make(zeros=wq.zeros[..., :1])
    with pytest.raises(ValueError, match="scales/zeros: only quantized"):
        BlockSparseWeight(wq.crow_indices, wq.col_indices, wq.float_values(), (32, 64), wq.scales)
    w = BlockSparseWeight.from_dense(torch.randn(32, 64), (16, 32), 0.5)
    with pytest.raises(
        ValueError, match="group_size: expected 0 .* multiple of 8 that divides the block width 32, got 12"
    ):
        w.quantize("int8", 12)
    with pytest.raises(ValueError, match="group_size: expected .* got 64"):
        w.quantize("int8", 64)
    with pytest.raises(TypeError, match="group_size: expected int"):
        w.quantize("int8", 8.0)
    with pytest.raises(ValueError, match="quant: expected one of"):
        BlockSparseWeight.from_dense(torch.randn(32, 64), (16, 32), 0.5, quant="int3")
    with pytest.raises(ValueError, match="quant: this weight is already int4"):
        wq.quantize("int8")
    with pytest.raises(ValueError, match="expected float blocks, got int8"):
        sk.formats.bsr.stack_bsr([_qbsr(32, 64, (16, 32), "int8")])


# -- the op --------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "dense", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 4, 9, 70])  # decode kernel, batched kernel
@pytest.mark.parametrize("quant,group_size,symmetric", [("int8", 0, True), ("int4", 8, False), ("int4", 0, True)])
def test_bsr_linear_backends(backend, dtype, rows, quant, group_size, symmetric):
    wq = _qbsr(96, 160, (16, 32), quant, group_size, symmetric, dtype=dtype)
    x, bias = torch.randn(rows, 160).to(dtype), torch.randn(96).to(dtype)
    with sk.use_backend(backend):
        y = sk.ops.bsr_linear(x, wq, bias)
        y_op = torch.ops.sparsekern.bsr_linear(x, *wq.crow_indices.unsqueeze(0), wq.col_indices, wq.blocks, bias,
                                               wq.scales, wq.zeros)  # fmt: skip
    _check(y, x, wq, bias, f"{backend} {quant} g{group_size} rows={rows}")
    _check(y_op, x, wq, bias, f"op {backend}")


@needs_ext
@pytest.mark.parametrize("quant", q.QUANTS)
def test_real_shape_under_auto_dispatch(quant):
    """TinyLlama's up_proj (5632 x 2048) at block 32x32, 90%: whatever dispatch picks, the answer."""
    wq = _qbsr(5632, 2048, (32, 32), quant, 0, sparsity=0.9)
    for rows in (1, 20):
        x = torch.randn(rows, 2048)
        _check(sk.ops.bsr_linear(x, wq), x, wq, None, f"{quant} rows={rows}")


@needs_ext
def test_op_checks_quantized_arguments_in_python_and_cpp():
    """The Python op (every backend) and the C++ op refuse a bad part with the same words."""
    wq = _qbsr(32, 64, (16, 32), "int4", 16, symmetric=False)
    args = (wq.crow_indices, wq.col_indices, wq.blocks)
    x = torch.randn(2, 64)
    for op in (torch.ops.sparsekern.bsr_linear, torch.ops.sparsekern._bsr_linear_cpu):
        with pytest.raises(ValueError, match=r"scales: expected shape \(\d+, 16, groups\)"):
            op(x, *args, None, wq.scales[:, :8], wq.zeros)
        with pytest.raises(TypeError, match="scales: expected torch.Tensor for (int4|uint8) blocks, got None"):
            op(x, *args, None, None, None)
        with pytest.raises(TypeError, match="zeros: expected"):
            op(x, *args, None, wq.scales, wq.zeros.to(torch.uint8))
        with pytest.raises(ValueError, match="zeros: expected shape"):
            op(x, *args, None, wq.scales, wq.zeros[..., :1])
        with pytest.raises(TypeError, match=r"scales: expected dtype torch.bfloat16 \(that of x\)"):
            op(x.bfloat16(), *args, None, wq.scales, wq.zeros)
        with pytest.raises(ValueError, match="scales/zeros: only int8 / uint8"):
            op(x, wq.crow_indices, wq.col_indices, wq.float_values(), None, wq.scales, None)
        with pytest.raises(ValueError, match="x: expected last dimension 64|x: last dimension 48"):
            op(torch.randn(2, 48), *args, None, wq.scales, wq.zeros)


@needs_ext
@pytest.mark.parametrize("rows", [1, 37])
def test_opcheck_quantized_blocks(rows):
    wq = _qbsr(48, 64, (16, 32), "int4", 16, symmetric=False)
    args = (torch.randn(rows, 64), wq.crow_indices, wq.col_indices, wq.blocks, torch.randn(48), wq.scales, wq.zeros)
    torch.library.opcheck(torch.ops.sparsekern._bsr_linear_cpu.default, args)
    torch.library.opcheck(torch.ops.sparsekern.bsr_linear.default, args)


def test_gradient_flows_to_x_not_to_integers():
    wq = _qbsr(32, 64, (16, 32), "int8", 16)
    x = torch.randn(3, 64, requires_grad=True)
    bias = torch.randn(32, requires_grad=True)
    y = sk.ops.bsr_linear(x, wq, bias)
    y.square().sum().backward()
    dense = wq.to_dense()
    xr = x.detach().requires_grad_()
    F.linear(xr, dense, bias.detach()).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)
    assert bias.grad is not None


def test_triton_takes_quantized_blocks():
    """Its kernel dequantizes them (tests/test_bsr_quant_triton.py): it may decline the device, not the blocks."""
    from sparsekern import dispatch

    wq = _qbsr(32, 64, (16, 32), "int8")
    args = (torch.randn(1, 64), wq.crow_indices, wq.col_indices, wq.blocks, None, wq.scales, wq.zeros)
    impl = dispatch.implementations("bsr_linear").get("triton")
    if impl is not None:
        reason = impl.supports(*args)
        assert reason is None or "quantized" not in reason


# -- modules, pruning, checkpoints -----------------------------------------------------------------


def test_sparse_linear_quantized_blocks_state_and_dtype():
    lin = torch.nn.Linear(64, 32)
    layer = sk.SparseLinear.from_linear(lin, "block16x32:0.5", quant="int4", group_size=16, symmetric=False)
    assert layer.quant == "int4" and layer.dtype == torch.float32 and layer.group_size == 16
    assert set(layer.state_dict()) == {"crow_indices", "col_indices", "blocks", "scales", "zeros", "bias"}
    assert "quant=int4, group_size=16" in repr(layer)
    x = torch.randn(5, 64)
    with sk.use_backend("reference"):
        ref = layer(x)
    torch.testing.assert_close(ref, F.linear(x, layer.weight, layer.bias))
    half = layer.to(torch.bfloat16)
    assert (
        half.blocks.dtype == torch.uint8 and half.scales.dtype == torch.bfloat16 and half.bias.dtype == torch.bfloat16
    )
    assert half(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="act_block: int8 activations are implemented for N:M"):
        sk.SparseLinear.from_linear(lin, "block16x32:0.5", quant="int8", act_block=32)


def test_state_dict_of_another_pruning_loads_and_bad_one_is_refused():
    lin = torch.nn.Linear(64, 64)
    a = sk.SparseLinear.from_linear(lin, "block16x16:0.5", quant="int8", group_size=8)
    b = sk.SparseLinear.from_linear(lin, "block16x16:0.75", quant="int8", group_size=8)
    a.load_state_dict(b.state_dict())
    x = torch.randn(3, 64)
    torch.testing.assert_close(a(x), b(x))
    assert a.blocks.shape == b.blocks.shape and a.scales.shape == b.scales.shape
    sd = b.state_dict()
    sd["scales"] = sd["scales"].clone()
    sd["scales"][0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="scales: expected finite values > 0"):
        a.load_state_dict(sd)


@pytest.mark.parametrize("quant,group_size,symmetric", [("int8", 0, True), ("int4", 8, False)])
def test_sparsify_save_load_from_pretrained(tmp_path, quant, group_size, symmetric):
    from transformers import AutoModelForCausalLM

    model = tiny_lm.llama(vocab_size=128)
    ids = torch.randint(0, 128, (1, 9))
    report = sk.sparsify(model, "block16x16:0.5", skip=["lm_head"], quant=quant, group_size=group_size,
                         symmetric=symmetric, progress=False)  # fmt: skip
    assert len(report.swapped) == 14
    layer = model.model.layers[0].mlp.down_proj
    assert layer.quant == quant and layer.group_size == (group_size or 16) and layer.kind == "block"
    with torch.no_grad():
        ref = model(ids).logits
    sk.save(model, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "sparsekern.json").read_text())
    assert cfg["layers"]["model.layers.0.mlp.down_proj"]["quant"] == quant
    again = tiny_lm.llama(vocab_size=128)
    sk.load(tmp_path / "ck", again)
    assert again.model.layers[0].mlp.down_proj.quant == quant
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    hf_bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.bfloat16)
    assert hf_bf16.model.layers[1].self_attn.q_proj.scales.dtype == torch.bfloat16
    assert hf_bf16.model.layers[1].self_attn.q_proj.blocks.dtype == (torch.uint8 if quant == "int4" else torch.int8)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)
        assert torch.equal(hf(ids).logits, ref)
        assert (hf_bf16(ids).logits.float() - ref).abs().max() < 0.05
    # A checkpoint whose quant field does not match its tensors is refused, naming them.
    cfg["layers"]["model.layers.0.mlp.up_proj"]["quant"] = "int4" if quant == "int8" else "int8"
    (tmp_path / "ck" / "sparsekern.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="up_proj.*expected int(4|8) blocks"):
        sk.load(tmp_path / "ck", tiny_lm.llama(vocab_size=128))


def test_sparsify_skips_blocks_the_group_does_not_fit_and_quantize_after():
    model = tiny_lm.llama(vocab_size=128)
    report = sk.sparsify(model, "block16x16:0.5", skip=["lm_head"], quant="int8", group_size=32, progress=False)
    assert not report.swapped and any("not a multiple of 8 that divides the block width 16" in r.note
                                      for r in report.skipped)  # fmt: skip
    model = tiny_lm.llama(vocab_size=128)
    sk.sparsify(model, "block16x16:0.5", skip=["lm_head"], progress=False)
    done = sk.nn.swap.quantize(model, "int4", 8)
    assert len(done) == 14 and model.model.layers[1].mlp.up_proj.quant == "int4"


def test_sparsegpt_rounds_blocks_inside_its_sweep():
    """Joint block pruning + int4: the mask of the unquantized pass, values exactly on the stored
    grid, and less added output error than rounding SparseGPT's result after."""
    from sparsekern.prune import prune_quantized, prune_weight

    torch.manual_seed(0)
    w = torch.randn(64, 256)
    x = torch.randn(1024, 256) @ torch.randn(256, 256) * 0.3
    h = x.T @ x

    def added_error(sparse, base):
        return float(((x @ (w - sparse.to_dense()).T) ** 2).mean() - ((x @ (w - base).T) ** 2).mean())

    base, keep = prune_weight(w, "block16x32:0.5", "sparsegpt", hessian=h)
    for quant, group_size, symmetric in (("int4", 16, True), ("int4", 0, False), ("int8", 8, True)):
        joint = prune_quantized(w, "block16x32:0.5", "sparsegpt", quant, group_size, symmetric, hessian=h).validate()
        assert joint.quant == quant and joint.block == (16, 32) and joint.group_size == (group_size or 32)
        assert torch.equal(joint.to_dense() != 0, (joint.to_dense() != 0) & keep)  # SparseGPT's own mask
        after = BlockSparseWeight.from_dense(base, (16, 32)).quantize(quant, group_size, symmetric)
        assert added_error(joint, base) < added_error(after, base), (quant, group_size)
    with pytest.raises(ValueError, match="group_size: expected 0 .* block width 32, got 12"):
        prune_quantized(w, "block16x32:0.5", "sparsegpt", "int8", 12, hessian=h)


def test_lean_generate_with_quantized_blocks_matches_hf():
    """The C++ lean step takes int8 / int4 blocks with their scales and zeros (q/k/v and gate/up
    stacked with them): sk.generate decodes HF generate's tokens, through that step."""
    from sparsekern.lean import native
    from sparsekern.lean.generate import decoder_for

    for quant, symmetric in (("int8", True), ("int4", False)):
        model = tiny_lm.llama(vocab_size=128)
        sk.sparsify(model, "block16x16:0.5", skip=["lm_head"], quant=quant, group_size=8, symmetric=symmetric,
                    progress=False)  # fmt: skip
        tensors, spec = native.pack_linear(model.model.layers[0].mlp.down_proj, torch.float32)
        assert spec[0] == 2 and tensors[4] is not None and (tensors[5] is None) == symmetric
        ids = torch.randint(0, 128, (2, 7))
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12)
        assert torch.equal(sk.generate(model, ids, max_new_tokens=12), ref)
        dec = decoder_for(model)
        assert dec.stepper(2) != dec.step, dec.why_python  # the C++ step, not the Python one


def test_dequantize_blocks_matches_reference_definition():
    wq = _qbsr(32, 64, (16, 32), "int4", 8, symmetric=False)
    w = dequantize_blocks(wq.blocks, wq.scales, wq.zeros)
    nib = q.unpack_int4(wq.blocks.reshape(-1, 16)).reshape(w.shape).float()
    want = (nib - wq.zeros.float().repeat_interleave(8, 2)) * wq.scales.repeat_interleave(8, 2)
    torch.testing.assert_close(w, want)
    x = torch.randn(2, 64)
    args = (wq.crow_indices, wq.col_indices, wq.blocks, None, wq.scales, wq.zeros)
    torch.testing.assert_close(reference.bsr_linear(x, *args), F.linear(x, wq.to_dense()))
