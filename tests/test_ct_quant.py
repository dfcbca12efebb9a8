"""compressed-tensors 2:4 + W4A16 / W8A16 checkpoints (written by compressed-tensors itself,
tests/data/ct_generate.py) load exactly: integers copied, scales as stored, logits as the
dequantized model's; anything that cannot be converted exactly is refused by file and key."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import sparsekern as sk
from sparsekern.formats import quant as q
from sparsekern.formats.nm import column_indices
from sparsekern.nn.linear import SparseLinear

DATA = Path(__file__).parent / "data"
PACKED = ["ct_w4a16_g32_sym", "ct_w4a16_g32_asym", "ct_w8a16_channel", "ct_v020_w4a16_g32_asym"]
MARLIN = ["ct_marlin24_w4a16_g128", "ct_marlin24_w8a16_channel"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _fresh(folder, dtype=torch.float32):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("quantization_config")
    return LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype).eval()


def _tensors(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _weights(folder):
    """``{layer: (config group's weights args, format)}`` from config.json (one group: targets Linear)."""
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    return group["weights"], group["format"]


def _layers(model):
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LINEARS}


def _signed_dense(layer):
    """A loaded layer's integers as compressed-tensors holds them: signed, zero point subtracted
    nowhere, pruned positions at the zero point. ``[out, K]`` int64 and the zero points."""
    w = layer.sparse_weight
    ints = q.integers(w.values).long()
    zeros = q.zero_points(w.values, w.zeros, w.scales.shape[1]).long()
    offset = q.INT4_ZERO if w.quant == "int4" else 0
    out, k = w.shape
    dense = zeros.repeat_interleave(k // zeros.shape[1], dim=1).clone()
    dense.scatter_(1, column_indices(w.meta, 2, 4, k // 2), ints)
    return dense - offset, zeros - offset


@pytest.mark.parametrize("name", PACKED + MARLIN)
def test_loads_with_the_logits_of_the_dequantized_model(name):
    folder = DATA / name
    model = _fresh(folder)
    sk.load(folder, model)
    args, _ = _weights(folder)
    for layer in _layers(model).values():
        assert isinstance(layer, SparseLinear) and layer.pattern == "2:4"
        assert layer.quant == ("int4" if args["num_bits"] == 4 else "int8")
        assert (layer.zeros is None) == args["symmetric"]
    ref = load_file(str(folder / "reference.safetensors"))
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits
    # fp32 end to end; only the summation order differs from the dense reference.
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-5)


# -- compressed-tensors' own rules, restated ----------------------------------------------------


def ct_unpack(value, bits, count, packed_dim=1):
    """compressed-tensors' unpack_from_int32 (pack_quantized.py, 0.14.0.1)."""
    pf, mask = 32 // bits, (1 << bits) - 1
    value = value.t() if packed_dim == 0 else value
    out = torch.zeros(value.shape[0], value.shape[1] * pf, dtype=torch.int32)
    for i in range(pf):
        out[:, i::pf] = (value >> (bits * i)) & mask
    out = out[:, :count] - (1 << (bits - 1))
    return out.t() if packed_dim == 0 else out


def ct_pack(value, bits):
    """compressed-tensors' pack_to_int32 along dim 1."""
    pf = 32 // bits
    value = (value + (1 << (bits - 1))).long()
    packed = sum(value[:, i::pf] << (bits * i) for i in range(pf))
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def ct_dequantize(x_q, scale, zero_point):
    """compressed-tensors' dequantize for channel/group scales: ``(q - zp) * scale`` in the scale dtype."""
    cols = x_q.shape[1] // scale.shape[1]
    zp = 0 if zero_point is None else zero_point.repeat_interleave(cols, 1).to(scale.dtype)
    return (x_q.to(scale.dtype) - zp) * scale.repeat_interleave(cols, 1)


def _loaded(name):
    """A fresh model loaded from checkpoint ``name``, its stored tensors, weight args and format."""
    folder = DATA / name
    model = _fresh(folder)
    sk.load(folder, model)
    return (model, _tensors(folder), *_weights(folder))


@pytest.mark.parametrize("name", PACKED)
def test_pack_quantized_layers_are_exact(name):
    model, tensors, args, fmt = _loaded(name)
    assert fmt == "pack-quantized"
    bits = args["num_bits"]
    for lname, layer in _layers(model).items():
        out, k = tensors[f"{lname}.weight_shape"].tolist()
        x_q = ct_unpack(tensors[f"{lname}.weight_packed"], bits, k)
        scale = tensors[f"{lname}.weight_scale"]
        zp = tensors.get(f"{lname}.weight_zero_point")
        zp = None if zp is None else ct_unpack(zp, bits, out, packed_dim=0)
        assert torch.equal(layer.sparse_weight.to_dense(), ct_dequantize(x_q, scale, zp))  # bit for bit
        assert torch.equal(layer.scales, scale)  # copied, not recomputed
        dense, zeros = _signed_dense(layer)
        assert torch.equal(dense, x_q.long())  # every integer, kept or pruned
        assert zp is None or torch.equal(zeros, zp.long())
        assert layer.group_size == (0 if args["strategy"] == "channel" else args["group_size"])


def ct_marlin24(x_q, scale, bits, group_size):
    """compressed-tensors' Marlin24Compressor.compress (0.14.0.1) from signed integers ``[out, K]``
    and scales ``[out, groups]``: CUTLASS 2:4 compression, marlin tiles and permutations, packing."""
    out, k = x_q.shape
    nz = (x_q != 0).view(out, k // 4, 4)
    m0, m1, _, m3 = nz.unbind(-1)
    e0, e1, e2 = m0 & m1, ~m0 & m1, ~m0 & ~m1
    i0 = e1.long() | (e2.long() << 1)
    i1 = (e0 | e2 | m3).long() | ((e1 | ~m1).long() << 1)
    groups4 = x_q.view(out, k // 4, 4)
    sparse = torch.stack((groups4.gather(-1, i0[..., None]), groups4.gather(-1, i1[..., None])), -1).view(out, k // 2)
    nib = (i0 | (i1 << 2)).view(out, k // 16, 4)
    meta = nib[..., 0] | (nib[..., 1] << 4) | (nib[..., 2] << 8) | (nib[..., 3] << 12)
    # _calculate_meta_reordering_scatter_offsets (int16 meta: group_x 64, group_y 32)
    ncols = k // 16
    rows = torch.arange(out)[:, None].repeat(1, ncols)
    cols = torch.arange(ncols).repeat(out, 1)
    rows = rows // 64 * 64 + (rows % 2) * 2 + (rows % 8) // 4 + ((rows % 32) % 4) // 2 * 32 + ((rows % 64) // 8) * 4
    topright = ((rows % 2 == 0) & (cols % 2 == 1)).long()
    bottomleft = ((rows % 2 == 1) & (cols % 2 == 0)).long()
    rows, cols = rows + topright - bottomleft, cols - (topright - bottomleft)
    offsets = ((cols // 2) * out * 2 + rows * 2 + cols % 2).view(-1)
    reordered = torch.empty(out * ncols, dtype=torch.int64).scatter_(0, offsets, meta.view(-1))
    meta = torch.where(reordered >= 2**15, reordered - 2**16, reordered).to(torch.int16).view(k // 32, 2 * out)
    # get_permutations_24
    perm = []
    for i in range(32):
        perm1, col = [], i // 4
        for block in [0, 1]:
            for row in [2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4 + 4), 2 * (i % 4 + 4) + 1]:
                perm1.append(16 * row + (col // 2) * 256 + 8 * (col % 2) + 4 * block)
        for j in range(4):
            perm.extend([p + j for p in perm1])
    interleave = [0, 2, 4, 6, 1, 3, 5, 7] if bits == 4 else [0, 2, 1, 3]
    perm = torch.tensor(perm).view(-1, len(interleave))[:, interleave].reshape(-1)
    scale_perm = [i * 8 + j for i in range(8) for j in [0, 4, 1, 5, 2, 6, 3, 7]]
    # marlin_permute_weights + pack_weight_24 on the transposed, offset values
    w = sparse.t() + (1 << bits) // 2
    size_k, size_n = w.shape
    w = w.reshape(size_k // 16, 16, size_n // 16, 16).permute(0, 2, 1, 3).reshape(size_k // 16, size_n * 16)
    w = w.reshape(-1, perm.numel())[:, perm].reshape(w.shape)
    pf = 32 // bits
    packed = sum(w[:, i::pf] << (bits * i) for i in range(pf))
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    # pack_scales_24
    s = scale.to(torch.float16).t()
    if group_size is not None and group_size < size_k:
        s = s.reshape(-1, len(scale_perm))[:, scale_perm]
    return packed, s.reshape(-1, size_n).contiguous(), meta


@pytest.mark.parametrize("name", MARLIN)
def test_marlin24_layers_reencode_to_the_stored_tensors(name):
    model, tensors, args, fmt = _loaded(name)
    assert fmt == "marlin-24" and "weight_shape" not in " ".join(tensors)
    grouped = 0
    for lname, layer in _layers(model).items():
        x_q, zeros = _signed_dense(layer)
        assert not zeros.any()  # symmetric only
        group = args["group_size"] if args["strategy"] == "group" else None
        packed, scale, meta = ct_marlin24(x_q, layer.scales, args["num_bits"], group)
        assert torch.equal(packed, tensors[f"{lname}.weight_packed"])
        assert torch.equal(meta, tensors[f"{lname}.meta"])
        assert torch.equal(scale, tensors[f"{lname}.scale_packed"])
        grouped += group is not None and group < layer.in_features // 2 and layer.scales.shape[1] > 1
    assert grouped == (1 if args["strategy"] == "group" else 0)  # down_proj: the permuted scale layout


def test_scales_take_the_model_dtype():
    folder = DATA / "ct_w4a16_g32_asym"
    exact, half = _fresh(folder), _fresh(folder, torch.bfloat16)
    sk.load(folder, exact)
    sk.load(folder, half)
    for (name, a), b in zip(_layers(exact).items(), _layers(half).values()):
        assert b.scales.dtype == torch.bfloat16, name
        assert torch.equal(a.values, b.values) and torch.equal(a.zeros, b.zeros) and torch.equal(a.meta, b.meta)
        assert torch.equal(b.scales, a.scales.to(torch.bfloat16))


def test_unpacked_zero_points_of_releases_before_0_9_4(tmp_path):
    # compressed-tensors < 0.9.4 saved an asymmetric weight_zero_point as the module held it: int8 [out, groups]
    folder = _copy(tmp_path, "ct_w4a16_g32_asym")

    def unpack_zero_points(t):
        for key in [k for k in t if k.endswith(".weight_zero_point")]:
            out = t[key.replace("weight_zero_point", "weight_shape")][0].item()
            t[key] = ct_unpack(t[key], 4, out, packed_dim=0).to(torch.int8).contiguous()

    _edit_tensors(folder, unpack_zero_points)
    old, new = _fresh(DATA / "ct_w4a16_g32_asym"), _fresh(folder)
    sk.load(DATA / "ct_w4a16_g32_asym", old)
    sk.load(folder, new)
    for a, b in zip(_layers(old).values(), _layers(new).values()):
        assert torch.equal(a.zeros, b.zeros) and torch.equal(a.values, b.values) and torch.equal(a.scales, b.scales)


# -- refusals: by file and key, the model left as it was ---------------------------------------


def _copy(tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(DATA / name, dst)
    return dst


def _edit_tensors(folder, edit):
    tensors = _tensors(folder)
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def _edit_config(folder, edit):
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg["quantization_config"])
    (folder / "config.json").write_text(json.dumps(cfg))


def _refused(folder, match):
    model = _fresh(folder)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        sk.load(folder, model)
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())


Q = "model.layers.0.self_attn.q_proj"
UP = "model.layers.0.mlp.up_proj"


def test_refuses_a_scale_of_the_wrong_shape(tmp_path):
    folder = _copy(tmp_path, "ct_w4a16_g32_sym")
    _edit_tensors(folder, lambda t: t.__setitem__(f"{Q}.weight_scale", t[f"{Q}.weight_scale"][:, :1].contiguous()))
    _refused(folder, rf"model\.safetensors: layer '{Q}': {Q}\.weight_scale: expected shape \(64, 2\)")


def _third_nonzero(t, key=f"{UP}.weight_packed", bits=4):
    x_q = ct_unpack(t[key], bits, t[f"{UP}.weight_shape"][1].item())
    groups = (x_q != 0).view(x_q.shape[0], -1, 4)
    r, g = (int(v) for v in (groups.sum(-1) == 2).nonzero()[0])
    x_q[r, 4 * g + int((~groups[r, g]).nonzero()[0])] = 3
    t[key] = ct_pack(x_q, bits)
    return r, g


def test_refuses_nibbles_that_break_24(tmp_path):
    folder = _copy(tmp_path, "ct_w4a16_g32_sym")
    where = {}
    _edit_tensors(folder, lambda t: where.update(rg=_third_nonzero(t)))
    r, g = where["rg"]
    _refused(
        folder,
        rf"model\.safetensors: 1 quantized layer\(s\) are not 2:4 .*'{UP}' \(row {r}, group {g} .* holds 3 non-zero",
    )


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda c: c["config_groups"]["group_0"].update(
            input_activations={"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}),
         "config_groups.group_0.input_activations: activation quantization"),
        (lambda c: c["config_groups"]["group_0"]["weights"].update(type="float", num_bits=8),
         "config_groups.group_0.weights.type: expected 'int'"),
        (lambda c: c["config_groups"]["group_0"]["weights"].update(num_bits=3), "weights.num_bits: expected 4 or 8"),
        (lambda c: c.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), "kv_cache_scheme: expected None"),
        (lambda c: c["sparsity_config"].update(format="sparse-24-bitmask"), "sparsity_config.format: expected 'dense'"),
        (lambda c: c["sparsity_config"].update(sparsity_structure="unstructured"), "sparsity_structure: expected '2:4'"),
        (lambda c: c.update(ignore=["lm_head", Q]), f"layer '{Q}' holds quantized tensors but no"),
    ],
)  # fmt: skip
def test_refuses_what_cannot_be_converted_exactly(tmp_path, edit, key):
    folder = _copy(tmp_path, "ct_w4a16_g32_sym")
    _edit_config(folder, edit)
    _refused(folder, key)


def test_act_order_group_indices(tmp_path):
    folder = _copy(tmp_path, "ct_w4a16_g32_asym")
    k = 64
    column_order = torch.arange(k, dtype=torch.int32) // 32
    _edit_tensors(folder, lambda t: t.__setitem__(f"{Q}.weight_g_idx", column_order))
    sk.load(folder, _fresh(folder))  # g_idx in column order: the same weight
    unset = torch.full((k,), -1, dtype=torch.int32)  # compressed-tensors' "not initialised": column order
    _edit_tensors(folder, lambda t: t.__setitem__(f"{Q}.weight_g_idx", unset))
    sk.load(folder, _fresh(folder))
    shuffled = column_order[torch.randperm(k)]
    _edit_tensors(folder, lambda t: t.__setitem__(f"{Q}.weight_g_idx", shuffled))
    _refused(folder, rf"layer '{Q}': {Q}\.weight_g_idx: activation-order group indices")


def test_refuses_marlin24_meta_out_of_order(tmp_path):
    folder = _copy(tmp_path, "ct_marlin24_w8a16_channel")
    _edit_tensors(folder, lambda t: t[f"{Q}.meta"].zero_())  # every nibble 0b0000: indices (0, 0)
    _refused(folder, rf"layer '{Q}': {Q}\.meta: row \d+, group \d+ has indices \[0, 0\]")


def test_refuses_marlin24_packed_weight_of_the_wrong_shape(tmp_path):
    folder = _copy(tmp_path, "ct_marlin24_w8a16_channel")
    _edit_tensors(folder, lambda t: t.__setitem__(f"{Q}.weight_packed", t[f"{Q}.weight_packed"][:, :-8].contiguous()))
    _refused(folder, rf"layer '{Q}': {Q}\.weight_packed: shape .* is not a marlin-24 8-bit layout")
