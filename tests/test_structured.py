"""Structured pruning shrinks models: the smaller model equals the masked dense model."""

import copy

import pytest
import torch
from torch import nn

from sparsekern.prune import drop_layers, prune_heads, prune_mlp_channels

transformers = pytest.importorskip("transformers")


def bert():
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertModel(cfg).eval()


def llama():
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def run(model, ids, mask=None):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def blocks(model):
    if hasattr(model, "encoder"):
        return [
            (lay.attention.output.dense, lay.output.dense, lay.attention.self.attention_head_size)
            for lay in model.encoder.layer
        ]
    return [(lay.self_attn.o_proj, lay.mlp.down_proj, lay.self_attn.head_dim) for lay in model.model.layers]


def zero_cols(lin: nn.Linear, cols):
    with torch.no_grad():
        lin.weight[:, cols] = 0


def masked_heads(model, removed):
    ref = copy.deepcopy(model)
    for i, heads in removed.items():
        o, _, hd = blocks(ref)[i]
        zero_cols(o, [h * hd + d for h in heads for d in range(hd)])
    return ref


def inputs():
    ids = torch.randint(2, 100, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    return ids, mask


@pytest.mark.parametrize("make", [bert, llama])
def test_prune_heads_explicit_equals_masked(make):
    model = make()
    ids, mask = inputs()
    # BERT: any heads. Llama (4 query heads, 2 KV heads): layer 0 loses KV group 1 (heads 2, 3);
    # layer 1 loses one query head in each group (heads 0 and 3).
    removed = {0: [1, 2]} if make is bert else {0: [2, 3], 1: [0, 3]}
    ref = masked_heads(model, removed)
    dense = run(model, ids, mask)
    before = n_params(model)
    assert prune_heads(model, removed) == removed
    assert n_params(model) < before
    torch.testing.assert_close(run(model, ids, mask), run(ref, ids, mask), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(run(model, ids, mask), dense, atol=1e-3), "pruning must change the output"
    if make is llama:
        attn0, attn1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
        assert (attn0.q_proj.out_features, attn0.k_proj.out_features) == (2 * 16, 1 * 16)
        assert (attn1.q_proj.out_features, attn1.k_proj.out_features, attn1.num_key_value_groups) == (32, 32, 1)
        assert model.config.sparsekern_structure["layers"]["1"] == {"num_attention_heads": 2, "num_key_value_heads": 2}
        out = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 9)
    else:
        assert model.config.pruned_heads == {0: [1, 2]}
        assert model.encoder.layer[0].attention.self.query.out_features == 32


def test_llama_uneven_gqa_is_refused():
    with pytest.raises(ValueError, match="same number of query heads per KV head"):
        prune_heads(llama(), {0: [0]})
    with pytest.raises(ValueError, match="all 4 heads"):
        prune_heads(bert(), {0: [0, 1, 2, 3]})
    with pytest.raises(ValueError, match="head indices"):
        prune_heads(bert(), {0: [7]})
    with pytest.raises(ValueError, match="exactly one"):
        prune_heads(bert())
    with pytest.raises(TypeError, match="supported family"):
        prune_heads(nn.Sequential(nn.Linear(4, 4)), fraction=0.5)


@pytest.mark.parametrize("make", [bert, llama])
@pytest.mark.parametrize("calibrated", [False, True])
def test_prune_heads_by_fraction(make, calibrated):
    model = make()
    ids, mask = inputs()
    calib = [{"input_ids": torch.randint(2, 100, (2, 9))} for _ in range(2)] if calibrated else None
    ref = copy.deepcopy(model)
    removed = prune_heads(model, fraction=0.5, calibration=calib, compensate=False)
    assert all(len(h) == 2 for h in removed.values()) and len(removed) == 2
    ref = masked_heads(ref, removed)
    torch.testing.assert_close(run(model, ids, mask), run(ref, ids, mask), rtol=1e-5, atol=1e-5)
    if make is llama:
        # Whole KV groups go: one KV head and its two query heads per layer.
        assert all(h in ([0, 1], [2, 3]) for h in removed.values())
        assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 1, 16)
        assert model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


@pytest.mark.parametrize("make", [bert, llama])
def test_prune_mlp_channels_equals_masked(make):
    model = make()
    ids, mask = inputs()
    ref = copy.deepcopy(model)
    before = n_params(model)
    sizes = prune_mlp_channels(model, 0.25)
    assert sizes == {0: 72, 1: 72} and model.config.intermediate_size == 72
    assert n_params(model) < before
    for (_, down, _), (_, ref_down, _) in zip(blocks(model), blocks(ref)):
        # The kept columns are the original ones, in order; zero the others in the reference.
        kept = [j for j in range(96) if any(torch.equal(ref_down.weight[:, j], down.weight[:, c]) for c in range(72))]
        assert len(kept) == 72
        zero_cols(ref_down, [j for j in range(96) if j not in kept])
    torch.testing.assert_close(run(model, ids, mask), run(ref, ids, mask), rtol=1e-5, atol=1e-5)
    if make is llama:
        assert model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_mlp_mean_compensation_folds_into_bias():
    # BERT's output.dense has a bias: removed channels are replaced by their calibration mean.
    model = bert()
    calib = [{"input_ids": torch.randint(2, 100, (2, 9))} for _ in range(2)]
    layer = model.encoder.layer[0]
    seen = []
    h = layer.output.dense.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 96)))
    with torch.no_grad():
        for b in calib:
            model(**b)
    h.remove()
    mean = torch.cat(seen).mean(0)
    old_w, old_b = layer.output.dense.weight.detach().clone(), layer.output.dense.bias.detach().clone()
    prune_mlp_channels(model, 0.5, calibration=calib)
    new = model.encoder.layer[0].output.dense
    kept = [j for j in range(96) if any(torch.equal(old_w[:, j], new.weight[:, c]) for c in range(48))]
    gone = [j for j in range(96) if j not in kept]
    torch.testing.assert_close(new.bias, old_b + old_w[:, gone] @ mean[gone], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [bert, llama])
def test_drop_layers(make):
    model = make()
    ids, mask = inputs()
    ref = copy.deepcopy(model)
    layers = ref.encoder.layer if make is bert else ref.model.layers
    layers[0].forward = lambda hidden_states, *a, **k: hidden_states  # the masked model: layer 0 is identity
    before = n_params(model)
    drop_layers(model, [0])
    assert model.config.num_hidden_layers == 1 and n_params(model) < before
    torch.testing.assert_close(run(model, ids, mask), run(ref, ids, mask), rtol=1e-5, atol=1e-5)
    if make is llama:
        assert model.model.layers[0].self_attn.layer_idx == 0
        assert model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    with pytest.raises(ValueError, match="all 1 layers"):
        drop_layers(model, [0])
    with pytest.raises(ValueError, match="out of range"):
        drop_layers(model, [3])


def test_head_mean_compensation_folds_into_bias():
    # BERT's attention.output.dense has a bias: removed heads' outputs are replaced by their mean.
    model = bert()
    calib = [{"input_ids": torch.randint(2, 100, (2, 9))} for _ in range(2)]
    dense = model.encoder.layer[1].attention.output.dense
    seen = []
    h = dense.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        for b in calib:
            model(**b)
    h.remove()
    mean = torch.cat(seen).mean(0)
    old_w, old_b = dense.weight.detach().clone(), dense.bias.detach().clone()
    removed = prune_heads(model, fraction=0.25, calibration=calib)
    gone = [h * 16 + d for h in removed[1] for d in range(16)]
    new = model.encoder.layer[1].attention.output.dense
    torch.testing.assert_close(new.bias, old_b + old_w[:, gone] @ mean[gone], rtol=1e-4, atol=1e-5)
    kept = [c for c in range(64) if c not in gone]
    assert torch.equal(new.weight, old_w[:, kept])


# -- checkpoints of shrunk models --------------------------------------------------------------


def shapes(model):
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}


def shrink(model):
    """Uneven structure HF's config cannot describe: heads in one layer, channels, a dropped layer."""
    drop_layers(model, [0])
    prune_heads(model, {0: [1, 2]} if hasattr(model, "encoder") else {0: [0, 3]})
    prune_mlp_channels(model, 0.25)
    return model


@pytest.mark.parametrize("make", [bert, llama])
@pytest.mark.parametrize("sparse", [False, True])
def test_structured_checkpoint_reloads_through_sk_load(tmp_path, make, sparse):
    import sparsekern as sk
    from sparsekern.nn.linear import SparseLinear

    torch.manual_seed(0)
    model = make()
    model.config.num_hidden_layers = 3
    model = type(model)(model.config).eval()  # three layers, so one can go
    shrink(model)
    if sparse:
        sk.sparsify(model, "2:4", skip=("lm_head",), progress=False)
    ids, mask = inputs()
    want = run(model, ids, mask)
    sk.save(model, tmp_path)
    fresh = make()
    fresh.config.num_hidden_layers = 3
    fresh = type(fresh)(fresh.config).eval()  # the original, unpruned architecture
    sk.load(tmp_path, fresh)
    assert shapes(fresh) == shapes(model)
    assert any(isinstance(m, SparseLinear) for m in fresh.modules()) == sparse
    torch.testing.assert_close(run(fresh, ids, mask), want, rtol=0, atol=0)
    for key in ("num_hidden_layers", "intermediate_size", "pruned_heads", "sparsekern_structure"):
        assert getattr(fresh.config, key, None) == getattr(model.config, key, None), key
    if make is llama:
        assert [lay.self_attn.layer_idx for lay in fresh.model.layers] == [0, 1]
        assert fresh.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    # A model built from the pruned config (two layers) loads the same checkpoint.
    again = type(model)(copy.deepcopy(model.config)).eval()
    sk.load(tmp_path, again)
    torch.testing.assert_close(run(again, ids, mask), want, rtol=0, atol=0)


def test_structured_checkpoint_refusals_leave_model_unchanged(tmp_path):
    import json

    import sparsekern as sk

    model = shrink(llama())
    sk.save(model, tmp_path)
    small = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**llama().config.to_dict(), "intermediate_size": 48})
    ).eval()  # narrower than the checkpoint: not the architecture it came from
    before = shapes(small)
    with pytest.raises(ValueError, match=r"structure\.modules\['model\.layers\.0\.mlp\.gate_proj'\]: pruned shape"):
        sk.load(tmp_path, small)
    assert shapes(small) == before and len(small.model.layers) == 2
    meta = json.loads((tmp_path / "sparsekern.json").read_text())
    meta["structure"]["original_layers"] = "2"
    (tmp_path / "sparsekern.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"sparsekern\.json: structure: layer_list/original_layers"):
        sk.load(tmp_path, llama())
    # A tensor refused after the rebuild puts the original modules back.
    meta["structure"]["original_layers"] = 2
    (tmp_path / "sparsekern.json").write_text(json.dumps(meta))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    fresh = llama()
    before, config = shapes(fresh), fresh.config.to_dict()
    with pytest.raises(ValueError, match=r"tensor 'model\.norm\.weight' has shape \(3,\)"):
        sk.load(tmp_path, fresh)
    assert shapes(fresh) == before and fresh.config.to_dict() == config
    assert fresh.model.layers[1].self_attn.layer_idx == 1


def test_uniform_llama_prune_reloads_through_hf(tmp_path):
    # Uniform results update the HF config, so save_pretrained / from_pretrained rebuild the shapes.
    # (Uneven ones, and BERT's pruned_heads, need sk.save / sk.load: transformers 5 ignores pruned_heads.)
    import sparsekern as sk

    model = llama()
    prune_heads(model, fraction=0.5)
    prune_mlp_channels(model, 0.25)
    drop_layers(model, [1])
    ids, mask = inputs()
    model.save_pretrained(tmp_path / "hf")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(run(back, ids, mask), run(model, ids, mask), rtol=0, atol=0)
    sk.save(model, tmp_path / "sk")
    fresh = sk.load(tmp_path / "sk", llama())
    torch.testing.assert_close(run(fresh, ids, mask), run(model, ids, mask), rtol=0, atol=0)


def moe(name, **experts):
    """A tiny random MoE causal LM from transformers' own config (no download)."""
    cfg = getattr(transformers, f"{name}Config")(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=2, **experts,
    )  # fmt: skip
    return getattr(transformers, f"{name}ForCausalLM")(cfg).eval()


def test_moe_mlp_refused_with_type_error():
    mixtral = moe("Mixtral", num_local_experts=4)
    before = shapes(mixtral)
    with pytest.raises(TypeError, match=r"prune_mlp_channels.*MixtralSparseMoeBlock \(a mixture of experts"):
        prune_mlp_channels(mixtral, 0.25)
    assert shapes(mixtral) == before
    # attention heads of the same model are ordinary nn.Linear: they prune
    assert prune_heads(mixtral, {0: [2, 3]}) == {0: [2, 3]}
    qwen = moe("Qwen2Moe", num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64)
    with pytest.raises(TypeError, match=r"Qwen2MoeSparseMoeBlock \(a mixture of experts"):
        prune_mlp_channels(qwen, 0.25)
    import sparsekern as sk

    sparse = bert()
    sk.sparsify(sparse, "2:4", progress=False)
    with pytest.raises(TypeError, match=r"prune_heads.*BertSelfAttention has query: SparseLinear"):
        prune_heads(sparse, {0: [1]})
