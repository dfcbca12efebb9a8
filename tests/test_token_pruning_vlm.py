"""sparsekern.prune_tokens on a small random-weight LLaVA: image tokens pruned inside the decoder."""

import math

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    StaticCache,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import sparsekern

IMAGE = 100  # image token id of the tiny model (vocab 128)
N_IMAGE = 16  # 32x32 image, 8x8 patches, CLS dropped ("default" feature strategy)
LAYER = 1  # pruning layer (of 4)
ATOL = 1e-4  # fp32 logits: sparsekern attention vs sdpa differ only by summation order


def _llava(sharp: float = 4.0, next_: bool = False) -> LlavaForConditionalGeneration:
    vc = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    tc = LlamaConfig(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in most LLaVA text models
        vocab_size=128,
    )
    if next_:  # LLaVA-NeXT: anyres crops + newline tokens, the same decoder path
        cfg = LlavaNextConfig(
            vision_config=vc, text_config=tc, image_token_id=IMAGE, image_grid_pinpoints=[[32, 32], [32, 64]]
        )
        model = LlavaNextForConditionalGeneration(cfg).eval()
    else:
        model = LlavaForConditionalGeneration(
            LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE)
        ).eval()
    # HF's 0.02 init gives near-uniform attention, where the ranking of image tokens would rest
    # on rounding noise; sharper q/k in the pruning layer give scores with a real order.
    attn = model.model.language_model.layers[LAYER].self_attn
    with torch.no_grad():
        attn.q_proj.weight.mul_(sharp)
        attn.k_proj.weight.mul_(sharp)
    return model


def _inputs(b: int = 1, before: int = 5, after: int = 7):
    text = torch.randint(1, IMAGE, (b, before + after))
    ids = torch.cat([text[:, :before], torch.full((b, N_IMAGE), IMAGE), text[:, before:]], dim=1)
    return ids, torch.randn(b, 3, 32, 32)


def _n_kept(keep: float, s: int) -> int:
    return s - N_IMAGE + math.ceil(keep * N_IMAGE - 1e-9)


def _next_inputs(model):
    """LLaVA-NeXT inputs: one 32x64 image (base view + 2 crops) and as many image tokens as it makes."""
    px, sizes = torch.randn(1, 3, 3, 32, 32), torch.tensor([[32, 64]])
    with torch.no_grad():
        n = model.model.get_image_features(px, sizes).pooler_output[0].shape[0]
    text = torch.randint(1, IMAGE, (1, 12))
    ids = torch.cat([text[:, :5], torch.full((1, n), IMAGE), text[:, 5:]], dim=1)
    return ids, {"pixel_values": px, "image_sizes": sizes}


@torch.no_grad()
def _reference(model, ids, pixel_values, keep, n_new=0, **images):
    """Prune by hand with the model's own layers: (kept positions, prefill logits, decode logits)."""
    lm = model.model.language_model
    seen = {}
    hook = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw["inputs_embeds"]), with_kwargs=True)
    model(input_ids=ids, pixel_values=pixel_values, **images)
    hook.remove()
    h, s = seen["x"], ids.shape[1]
    cache = DynamicCache(config=lm.config)

    def run(h, pos, layers):
        pe = lm.rotary_emb(h, position_ids=pos)
        for blk in layers:
            h = blk(h, attention_mask=None, position_embeddings=pe, position_ids=pos, cache=cache, use_cache=True)
        return h

    pos = torch.arange(s)[None]
    h = run(h, pos, lm.layers[:LAYER])
    # Scores of the pruning layer: eager causal attention probabilities, mean over heads and queries.
    blk = lm.layers[LAYER]
    attn, x = blk.self_attn, blk.input_layernorm(h)
    q = attn.q_proj(x).view(1, s, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, s, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *lm.rotary_emb(h, position_ids=pos))
    logits = q @ repeat_kv(k, attn.num_key_value_groups).transpose(2, 3) * attn.scaling
    logits = logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    scores = logits.softmax(-1).mean(dim=(1, 2))[0]
    h = run(h, pos, [blk])

    image = (ids[0] == IMAGE).nonzero().squeeze(1)
    n_keep = math.ceil(keep * image.numel() - 1e-9)
    ranked = scores[image].sort(descending=True).values
    if n_keep < image.numel():  # the choice must not hang on rounding noise
        assert ranked[n_keep - 1] - ranked[n_keep] > 1e-5 * ranked[0]
    chosen = image[scores[image].topk(n_keep).indices]
    idx = torch.cat([(ids[0] != IMAGE).nonzero().squeeze(1), chosen]).sort().values
    for layer in cache.layers[: LAYER + 1]:
        layer.keys, layer.values = layer.keys[:, :, idx], layer.values[:, :, idx]
    h = run(h[:, idx], idx[None], lm.layers[LAYER + 1 :])
    prefill = model.lm_head(lm.norm(h))

    steps, tok = [], prefill[:, -1].argmax(-1)
    for t in range(n_new):
        h = run(lm.embed_tokens(tok[:, None]), torch.tensor([[s + t]]), lm.layers)
        steps.append(model.lm_head(lm.norm(h))[:, -1])
        tok = steps[-1].argmax(-1)
    return idx, prefill, steps


def _generate(model, ids, pixel_values, n_new, **images):
    out = model.generate(
        input_ids=ids,
        pixel_values=pixel_values,
        **images,
        max_new_tokens=n_new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[:, ids.shape[1] :], out.logits


@torch.no_grad()
def test_keep_one_equals_unpruned():
    model = _llava()
    ids, px = _inputs()
    dense = model(input_ids=ids, pixel_values=px).logits
    dense_tokens, dense_logits = _generate(model, ids, px, 6)
    with sparsekern.prune_tokens(model, keep=1.0, layers=(LAYER,), modality="image") as h:
        out = model(input_ids=ids, pixel_values=px)
        torch.testing.assert_close(out.logits, dense, rtol=0, atol=ATOL)
        assert torch.equal(h.kept_indices, torch.arange(ids.shape[1])[None])
        tokens, logits = _generate(model, ids, px, 6)
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(torch.stack(logits), torch.stack(dense_logits), rtol=0, atol=ATOL)


@pytest.mark.parametrize("keep", [0.25, 0.3, 0.5])
@torch.no_grad()
def test_matches_reference_prefill_and_generate(keep):
    model = _llava()
    ids, px = _inputs()
    n_new = 5
    idx, ref_prefill, ref_steps = _reference(model, ids, px, keep, n_new)
    dense = model(input_ids=ids, pixel_values=px).logits
    seen, positions = [], []

    def probe_fn(module, args, kwargs):
        seen.append(args[0].shape[1])
        positions.append(kwargs["position_ids"])

    with sparsekern.prune_tokens(model, keep=keep, layers=(LAYER,)) as h:
        # Registered after the handle's hooks: sees what the layer gets.
        probe = model.model.language_model.layers[LAYER + 1].register_forward_pre_hook(probe_fn, with_kwargs=True)
        out = model(input_ids=ids, pixel_values=px)
        assert torch.equal(h.kept_indices[0], idx)
        torch.testing.assert_close(out.logits, ref_prefill, rtol=0, atol=ATOL)
        # The layers after the pruning layer see text + ceil(keep * image) tokens, every cache layer too.
        assert seen == [_n_kept(keep, ids.shape[1])]
        assert torch.equal(positions[0][0], idx)  # original positions, as rotary saw them
        assert {layer.keys.shape[2] for layer in out.cache.layers} == {seen[0]}
        probe.remove()
        assert torch.equal(model.model(input_ids=ids, pixel_values=px).kept_indices[0], idx)  # base output
        # Pruning changed the answer (else this test could not tell a wrong choice from a right one).
        assert (out.logits[:, -1] - dense[:, -1]).abs().max() > 100 * ATOL

        tokens, logits = _generate(model, ids, px, n_new)
        ref_tokens = torch.stack([ref_prefill[:, -1].argmax(-1)] + [x.argmax(-1) for x in ref_steps[:-1]], 1)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(torch.stack(logits[1:]), torch.stack(ref_steps[:-1]), rtol=0, atol=ATOL)

        # Without generate (no position_ids, an all-ones mask as long as the dense sequence), the
        # decode step gets the dense position and reads the short cache.
        step = model(
            input_ids=tokens[:, :1], cache=out.cache, attention_mask=torch.ones(1, ids.shape[1] + 1, dtype=torch.long)
        )
        torch.testing.assert_close(step.logits[:, -1], ref_steps[0], rtol=0, atol=ATOL)


@torch.no_grad()
def test_batch_without_padding_matches_single_examples():
    model = _llava()
    ids, px = _inputs(b=2)
    with sparsekern.prune_tokens(model, keep=0.25, layers=LAYER) as h:
        both = model(input_ids=ids, pixel_values=px).logits
        kept = h.kept_indices
        for i in range(2):
            one = model(input_ids=ids[i : i + 1], pixel_values=px[i : i + 1]).logits
            torch.testing.assert_close(both[i : i + 1], one, rtol=0, atol=ATOL)
            assert torch.equal(kept[i], h.kept_indices[0])


@torch.no_grad()
def test_remove_restores_exactly():
    model = _llava()
    ids, px = _inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    configs = {name: m.config for name, m in model.named_modules() if hasattr(m, "config")}
    dense = model(input_ids=ids, pixel_values=px).logits
    dense_tokens, _ = _generate(model, ids, px, 4)

    def hooks():  # transformers installs output-capturing hooks of its own on first use
        return {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}

    before = hooks()
    h = sparsekern.prune_tokens(model, keep=0.25, layers=(LAYER,))
    model(input_ids=ids, pixel_values=px)
    _generate(model, ids, px, 4)
    assert hooks() != before
    h.remove()
    assert not hasattr(model.model, "_sparsekern_token_pruning")
    assert hooks() == before
    for name, m in model.named_modules():
        assert not any(k.startswith("_sparsekern") for k in vars(m)), name
        if name in configs:
            assert m.config is configs[name], name
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(input_ids=ids, pixel_values=px).logits, dense)
    assert torch.equal(_generate(model, ids, px, 4)[0], dense_tokens)
    sparsekern.prune_tokens(model, keep=0.5, layers=(LAYER,)).remove()  # can be applied again


@torch.no_grad()
def test_bad_arguments():
    model = _llava()
    for keep in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep"):
            sparsekern.prune_tokens(model, keep=keep)
    with pytest.raises(TypeError, match="keep"):
        sparsekern.prune_tokens(model, keep="0.25")
    for layers in ((4,), (-1,), (), (1, 2)):
        with pytest.raises(ValueError, match="layers"):
            sparsekern.prune_tokens(model, layers=layers)
    for modality in ("text", "audio"):
        with pytest.raises(ValueError, match="modality"):
            sparsekern.prune_tokens(model, modality=modality)
    with pytest.raises(TypeError, match="modality"):
        sparsekern.prune_tokens(model, modality=1)
    with pytest.raises(ValueError, match="score"):
        sparsekern.prune_tokens(model, score="cls")
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="modality.*'text'.*'image'"):
        sparsekern.prune_tokens(bert, modality="image")
    sparsekern.prune_tokens(bert, modality="text").remove()

    model.config.image_token_id = 500  # outside the vocabulary of 128
    with pytest.raises(ValueError, match="image_token_id.*500"):
        sparsekern.prune_tokens(model)
    model.config.image_token_id = IMAGE

    h = sparsekern.prune_tokens(model, keep=0.25, layers=(LAYER,))
    with pytest.raises(ValueError, match="already"):
        sparsekern.prune_tokens(model)
    ids, px = _inputs(b=2)
    with pytest.raises(ValueError, match="image_token_id"):
        model(input_ids=torch.randint(1, IMAGE, (1, 9)))
    mask = torch.ones_like(ids)
    mask[1, 0] = 0
    with pytest.raises(ValueError, match="attention_mask.*padded"):
        model(input_ids=ids, pixel_values=px, attention_mask=mask)
    uneven = ids.clone()
    uneven[1, 6] = 3
    with pytest.raises(ValueError, match="input_ids.*same number"):
        model(input_ids=uneven, pixel_values=px)
    static = StaticCache(config=model.config.text_config, max_cache_len=64)
    with pytest.raises(TypeError, match="cache"):
        model(input_ids=ids[:1], pixel_values=px[:1], cache=static)
    out = model(input_ids=ids[:1], pixel_values=px[:1])
    with pytest.raises(ValueError, match="pixel_values.*empty cache"):
        model(input_ids=ids[:1], pixel_values=px[:1], cache=out.cache)
    # ... but the image token id as a decoded token is plain text, as in the dense model.
    assert model(input_ids=torch.tensor([[IMAGE]]), cache=out.cache).logits.shape == (1, 1, 128)
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        model(input_ids=ids[:1], pixel_values=px[:1])
    h.remove()


@torch.no_grad()
def test_llava_next_same_path():
    model = _llava(next_=True)
    ids, images = _next_inputs(model)
    dense = model(input_ids=ids, **images).logits
    with sparsekern.prune_tokens(model, keep=1.0, layers=(LAYER,)):
        torch.testing.assert_close(model(input_ids=ids, **images).logits, dense, rtol=0, atol=ATOL)
    idx, ref_prefill, ref_steps = _reference(model, ids, n_new=3, keep=0.25, **images)
    with sparsekern.prune_tokens(model, keep=0.25, layers=(LAYER,)) as h:
        torch.testing.assert_close(model(input_ids=ids, **images).logits, ref_prefill, rtol=0, atol=ATOL)
        assert torch.equal(h.kept_indices[0], idx)
        _, logits = _generate(model, ids, n_new=3, **images)
        torch.testing.assert_close(torch.stack(logits[1:]), torch.stack(ref_steps[:-1]), rtol=0, atol=ATOL)


@torch.no_grad()
def test_eager_attention_same_as_sdpa():
    # Later layers get the kept tokens' mask from the model's own mask builder: a 4D mask under
    # eager attention, none (is_causal) under sdpa; both must give the same answer.
    model = _llava()
    ids, px = _inputs()
    with sparsekern.prune_tokens(model, keep=0.25, layers=(LAYER,)):
        sdpa = model(input_ids=ids, pixel_values=px).logits
        sdpa_tokens, _ = _generate(model, ids, px, 4)
    model.set_attn_implementation("eager")
    with sparsekern.prune_tokens(model, keep=0.25, layers=(LAYER,)):
        torch.testing.assert_close(model(input_ids=ids, pixel_values=px).logits, sdpa, rtol=0, atol=ATOL)
        assert torch.equal(_generate(model, ids, px, 4)[0], sdpa_tokens)
