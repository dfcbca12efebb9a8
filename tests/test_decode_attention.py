"""Decode attention (sparsekern/nn/decode_attention.py): one-position decode as G query rows per KV
head, against HF's own sdpa attention on real head shapes, masks and dtypes; every other call
handed to the module's previous attention unchanged; which models get it (sparsify, sk.save +
from_pretrained) and that greedy generation is unchanged; KV eviction on top of it."""

import copy

import pytest
import tiny_lm
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import sparsekern as sk
from sparsekern.nn import _attn_patch, decode_attention
from sparsekern.nn.decode_attention import NAME, use_decode_attention
from sparsekern.nn.kv_cache import disable_kv_eviction, enable_kv_eviction

# rtol, atol: fp32 sums in another order; bf16 one rounding of the output.
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-2)}


class _Attn(nn.Module):
    """What HF's sdpa attention reads off its module."""

    def __init__(self, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.num_key_value_groups = heads // kv_heads
        self.is_causal = True
        self._sparsekern_decode_fallback = "sdpa"


def _inputs(b, h, hkv, d, s, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 1, h, d, generator=g).to(dtype).transpose(1, 2)  # as HF: a transposed view
    k = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    return q, k, v


def _spy(monkeypatch) -> list:
    """Shapes of the queries decode_attention's own SDPA call got."""
    seen, real = [], torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, *args, **kwargs):
        seen.append(tuple(q.shape))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(decode_attention.F, "scaled_dot_product_attention", sdpa)
    return seen


# (batch, heads, KV heads, head dim, cached keys): TinyLlama-1.1B, SmolLM2-135M, multi-head, odd
@pytest.mark.parametrize(
    "b, h, hkv, d, s", [(1, 32, 4, 64, 300), (1, 9, 3, 64, 100), (2, 4, 4, 32, 17), (3, 6, 2, 24, 1)], ids=str
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_matches_hf_sdpa(b, h, hkv, d, s, dtype, mask, monkeypatch):
    q, k, v = _inputs(b, h, hkv, d, s, dtype, seed=h * 1000 + s)
    m = None
    if mask is not None:
        keep = torch.rand(b, 1, 1, s, generator=torch.Generator().manual_seed(s)) > 0.3
        keep[..., 0] = True  # no fully masked row
        m = keep if mask == "bool" else torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))
    mod = _Attn(h, hkv)
    want, _ = sdpa_attention_forward(mod, q, k, v, m, dropout=0.0, scaling=d**-0.5)
    seen = _spy(monkeypatch)
    got, weights = decode_attention.decode_attention(mod, q, k, v, m, dropout=0.0, scaling=d**-0.5)
    assert seen == [(b, hkv, h // hkv, d)] and weights is None  # the fast path ran
    assert got.shape == want.shape == (b, 1, h, d) and got.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "case",
    [
        "prefill",
        "mask per head",
        "mask per query",
        "mask of other keys",
        "sliding window",
        "softcap",
        "dropout",
        "weights",
    ],
)
def test_everything_else_goes_to_the_previous_attention(case, monkeypatch):
    b, h, hkv, d, s = 2, 8, 2, 16, 12
    q, k, v = _inputs(b, h, hkv, d, s, torch.float32, seed=7)
    mask, kwargs, dropout = None, {}, 0.0
    if case == "prefill":
        q = torch.randn(b, h, 3, d)
    elif case == "mask per head":
        mask = torch.rand(b, h, 1, s) > 0.2
    elif case == "mask per query":
        mask = torch.ones(b, 1, 2, s, dtype=torch.bool)
    elif case == "mask of other keys":
        mask = torch.ones(b, 1, 1, s + 1, dtype=torch.bool)
    elif case == "sliding window":
        kwargs["sliding_window"] = 4
    elif case == "softcap":
        kwargs["softcap"] = 30.0
    elif case == "dropout":
        dropout = 0.5
    else:
        kwargs["output_attentions"] = True
    mod = _Attn(h, hkv)
    calls = []

    def previous(module, *args, **kw):
        calls.append(module)
        return "previous"

    _attn_patch.register("test_previous", previous)
    mod._sparsekern_decode_fallback = "test_previous"
    seen = _spy(monkeypatch)
    got = decode_attention.decode_attention(mod, q, k, v, mask, dropout=dropout, scaling=0.25, **kwargs)
    assert got == "previous" and calls == [mod] and seen == []


def _greedy(model, ids, new=6):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
        logits = model(out).logits
    return out, logits


def _swapped(model) -> int:
    return sum(
        1 for m in model.modules() if getattr(m, "config", None) is not None and m.config._attn_implementation == NAME
    )


def test_sparsify_gives_it_and_tokens_stay(monkeypatch):
    torch.manual_seed(0)
    model = tiny_lm.llama()
    sk.sparsify(model, "2:4", progress=False)
    before = copy.deepcopy(model)
    for layer in before.model.layers:  # the same sparse model on HF's own attention
        _attn_patch.restore_attention(layer.self_attn)
    assert _swapped(model) == 2 and _swapped(before) == 0
    assert model.config._attn_implementation == "sdpa"  # the model's config is untouched
    assert use_decode_attention(model) == 0  # already swapped
    seen = _spy(monkeypatch)
    ids = tiny_lm.ids(batch=2)
    got, got_logits = _greedy(model, ids)
    # 2 layers x 5 decode steps as [B, Hkv, G, D]; the prefill and the scoring forward go to sdpa.
    assert seen.count((2, 2, 2, 16)) == 2 * 5 and len(seen) == 2 * 5 + 2 * 2
    want, want_logits = _greedy(before, ids)
    assert (2, 2, 2, 16) not in seen[14:]
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)


def test_which_models():
    dense = tiny_lm.llama()
    sk.sparsify(dense, "2:4", progress=False, skip=["*"])  # nothing swapped: attention left alone
    assert _swapped(dense) == 0
    eager = tiny_lm.llama()
    eager.config._attn_implementation = "eager"
    for layer in eager.model.layers:
        layer.self_attn.config._attn_implementation = "eager"
    assert use_decode_attention(eager) == 0
    assert use_decode_attention(tiny_lm.bert()) == 0
    assert use_decode_attention(nn.Linear(2, 2)) == 0


def test_saved_folders_get_it(tmp_path):
    torch.manual_seed(1)
    model = tiny_lm.llama()
    sk.sparsify(model, "2:4", progress=False)
    sk.save(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert _swapped(loaded) == 2 and loaded.config._attn_implementation == "sdpa"
    assert _swapped(sk.load(tmp_path, tiny_lm.llama())) == 2
    ids = tiny_lm.ids(batch=1)
    assert torch.equal(_greedy(loaded, ids)[0], _greedy(model, ids)[0])


def test_kv_eviction_on_top():
    """KV eviction swaps the same modules: it falls back to decode attention, which falls back
    to sdpa (no loop), and undoing it leaves decode attention in place."""
    torch.manual_seed(2)
    model = tiny_lm.llama()
    sk.sparsify(model, "2:4", progress=False)
    ids = tiny_lm.ids(batch=1)
    want = _greedy(model, ids)[0]
    enable_kv_eviction(model)
    assert torch.equal(_greedy(model, ids)[0], want)
    disable_kv_eviction(model)
    assert _swapped(model) == 2
    assert torch.equal(_greedy(model, ids)[0], want)
