"""H2OCache: heavy-hitter + recent-window KV-cache eviction during model.generate (tiny Llama)."""

import inspect

import pytest
import torch
from transformers import BertConfig, BertModel, DynamicCache, LlamaConfig, LlamaForCausalLM, LlamaModel

from sparsekern.nn.attention import H2OCache, disable_kv_eviction, enable_kv_eviction

GEN = dict(do_sample=False, pad_token_id=0)


def _llama():
    # head_dim 32 (the kernels' range is 32..128); 4 query heads share 2 KV heads (GQA).
    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def _eager_mass(model, ids):
    """Per layer, fp32 [B, Hkv, S]: attention each key receives, summed over queries, averaged
    over the query heads of its KV head (what H2O accumulates), from eager attention weights."""
    ref = LlamaForCausalLM._from_config(model.config, attn_implementation="eager").eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        att = ref(ids, output_attentions=True).attentions
    assert len(att) == model.config.num_hidden_layers, "eager reference returned no attention weights"
    h_kv = model.config.num_key_value_heads
    return [a.float().sum(2).unflatten(1, (h_kv, -1)).mean(2) for a in att]


@torch.no_grad()
def test_within_budget_same_tokens_as_no_eviction():
    model = _llama()
    ids = torch.randint(1, 128, (2, 11))
    ref = model.generate(ids, max_new_tokens=20, output_scores=True, return_dict_in_generate=True, **GEN)
    cache = H2OCache(model, budget=64, recent=8)
    out = model.generate(
        ids, past_key_values=cache, max_new_tokens=20, output_scores=True, return_dict_in_generate=True, **GEN
    )
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # The scores came from the attention: they equal eager attention summed over every query
    # that attended (prefill rows + one row per decode step; the last token is never fed).
    seen = out.sequences[:, :-1]
    assert cache.get_seq_length() == seen.shape[1]
    assert len(cache.layers) == 2
    for layer, mass in zip(cache.layers, _eager_mass(model, seen)):
        assert layer.keys.shape[-2] == seen.shape[1]
        torch.testing.assert_close(layer.scores, mass, atol=1e-4, rtol=1e-4)


# transformers 5 renamed generate's/forward's `past_key_values` to `cache` (the old name is a
# deprecated alias): the eviction must see the cache under either name.
CACHE_KWARGS = ["past_key_values"] + (["cache"] if "cache" in inspect.signature(LlamaModel.forward).parameters else [])


@torch.no_grad()
@pytest.mark.parametrize("cache_kwarg", CACHE_KWARGS)
def test_budget_respected_and_recent_window_kept(cache_kwarg):
    model = _llama()
    ids = torch.randint(1, 128, (3, 9))
    budget, recent = 12, 4
    cache = H2OCache(model, budget=budget, recent=recent)
    checks = []

    def after_forward(module, args, output):
        seen = cache.get_seq_length()
        for layer in cache.layers:
            n = layer.keys.shape[-2]
            assert n <= budget
            assert layer.values.shape[-2] == n and layer.scores.shape[-1] == n
            pos = layer.positions
            assert torch.all(pos[..., 1:] > pos[..., :-1]), "entries must stay in position order"
            want_recent = torch.arange(seen - min(recent, seen), seen)
            assert torch.equal(pos[..., -len(want_recent) :], want_recent.expand(*pos.shape[:2], -1))
        checks.append(seen)

    hook = model.register_forward_hook(after_forward)
    out = model.generate(ids, **{cache_kwarg: cache}, max_new_tokens=25, **GEN)
    hook.remove()
    assert out.shape == (3, 9 + 25)
    assert len(checks) == 25 and checks[-1] == 9 + 24
    assert all(layer.keys.shape[-2] == budget for layer in cache.layers)
    assert ((out >= 0) & (out < 128)).all()


@torch.no_grad()
def test_prefill_eviction_keeps_heavy_hitters():
    model = _llama()
    ids = torch.randint(1, 128, (2, 30))
    budget, recent = 10, 3
    cache = H2OCache(model, budget=budget, recent=recent)
    model(ids, past_key_values=cache, use_cache=True)
    full = DynamicCache()
    model(ids, past_key_values=full, use_cache=True)
    assert len(cache.layers) == len(full.layers) == 2
    for layer, dense, mass in zip(cache.layers, full.layers, _eager_mass(model, ids)):
        heavy = mass[..., : 30 - recent].topk(budget - recent, dim=-1).indices.sort(-1).values
        want = torch.cat([heavy, torch.arange(30 - recent, 30).expand(2, 2, recent)], dim=-1)
        assert torch.equal(layer.positions, want)
        # the stored keys/values are the original (rotated) ones at those positions (layer 1's
        # inputs differ from the sdpa run's by fp32 rounding, hence a tolerance)
        idx = want[..., None].expand(-1, -1, -1, dense.keys.shape[-1])
        torch.testing.assert_close(layer.keys, dense.keys.gather(2, idx), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.values, dense.values.gather(2, idx), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_hooks_fall_back_and_disable_restores():
    model = _llama()
    ids = torch.randint(1, 128, (1, 7))
    ref = model.generate(ids, max_new_tokens=8, **GEN)
    enable_kv_eviction(model)
    attn = model.model.layers[1].self_attn
    assert attn.config is not model.config
    assert torch.equal(model.generate(ids, max_new_tokens=8, **GEN), ref)  # plain DynamicCache path
    disable_kv_eviction(model)
    assert attn.config is model.config
    assert torch.equal(model.generate(ids, max_new_tokens=8, **GEN), ref)


@torch.no_grad()
def test_deepcopy_of_enabled_model_is_independent():
    import copy

    model = _llama()
    enable_kv_eviction(model)
    twin = copy.deepcopy(model)
    disable_kv_eviction(twin)
    assert model.model.layers[0].self_attn.config is not model.config  # original still patched
    assert twin.model.layers[0].self_attn.config is twin.config
    ids = torch.randint(1, 128, (1, 8))
    cache = H2OCache(model, budget=6, recent=2)
    model.generate(ids, past_key_values=cache, max_new_tokens=4, **GEN)
    assert all(layer.keys.shape[-2] == 6 for layer in cache.layers)


def test_bad_arguments():
    model = _llama()
    with pytest.raises(ValueError, match="budget"):
        H2OCache(model, budget=1)
    with pytest.raises(TypeError, match="budget"):
        H2OCache(model, budget=8.0)
    for recent in (0, 8, 9):
        with pytest.raises(ValueError, match="recent"):
            H2OCache(model, budget=8, recent=recent)
    with pytest.raises(TypeError, match="recent"):
        H2OCache(model, budget=8, recent=2.5)
    bert = BertModel(BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(TypeError, match="model"):
        H2OCache(bert, budget=8)
    ids = torch.randint(1, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match="padded"):
        model.generate(ids, attention_mask=mask, past_key_values=H2OCache(model, budget=8), max_new_tokens=2, **GEN)
