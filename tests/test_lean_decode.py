"""sk.generate (lean decode): token for token model.generate's greedy output, fp32, tiny random LMs."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import sparsekern as sk
from sparsekern.lean.fuse import Concat, fuse_linears
from sparsekern.nn.linear import SparseLinear

VOCAB = 96
SHAPES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: 2 query heads per KV head
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
)
PATTERNS = {"dense": None, "2:4": "2:4", "block": "block16x16:0.5"}


def _lm(arch: str = "llama", pattern: str | None = None, **overrides) -> nn.Module:
    cfg = {**SHAPES, **overrides}
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    else:
        model = MistralForCausalLM(MistralConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            # Larger than HF's 0.02 init (near-uniform logits), and non-zero biases (Qwen2's q/k/v):
            # a bias stacked in the wrong place must change the tokens.
            if p.dim() > 1:
                p.normal_(0, 0.2)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    if pattern:
        sk.sparsify(model, pattern, method="magnitude", progress=False)
    return model.eval()


def _hf(model, ids, **kw):
    kw.setdefault("eos_token_id", None)
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **kw)


def _ids(batch: int, length: int = 7) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kind", list(PATTERNS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_matches_hf_greedy(arch, kind, batch):
    model = _lm(arch, PATTERNS[kind])
    if kind != "dense":
        assert any(isinstance(m, SparseLinear) for m in model.modules())
    ids = _ids(batch)
    ref = _hf(model, ids, max_new_tokens=24)
    out = sk.generate(model, ids, max_new_tokens=24, eos_token_id=None)
    assert out.shape == (batch, ids.shape[1] + 24) and out.dtype == torch.int64
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})),
        ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),  # MHA, biases
        ("mistral", dict(sliding_window=64)),
    ],
)
def test_matches_hf_variants(arch, overrides):
    model = _lm(arch, "2:4", **overrides)
    ids = _ids(2)
    assert torch.equal(
        sk.generate(model, ids, max_new_tokens=16, eos_token_id=None), _hf(model, ids, max_new_tokens=16)
    )


def _eos_case():
    """A model and prompts whose greedy continuations hit a token at different steps per row."""
    model, ids = _lm("llama", "2:4"), _ids(2, 5)
    free = _hf(model, ids, max_new_tokens=20)[:, 5:]
    for tok in free[0].unique().tolist():
        first = [(row == tok).nonzero() for row in free]
        if all(len(f) for f in first) and first[0][0] != first[1][0]:
            return model, ids, tok
    pytest.skip("no token that both rows generate at different steps")


def test_eos_stops_and_pads_like_hf():
    model, ids, eos = _eos_case()
    ref = _hf(model, ids, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    out = sk.generate(model, ids, max_new_tokens=20, eos_token_id=[eos], pad_token_id=0)
    assert torch.equal(out, ref)
    # Stopped once both rows were done; the row that finished first is padded after its eos.
    assert out.shape[1] < ids.shape[1] + 20 and (out[:, -1] == eos).any()
    assert (out == 0).any()


def test_eos_default_is_the_generation_config():
    model, ids, eos = _eos_case()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, None
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20)
    assert torch.equal(sk.generate(model, ids, max_new_tokens=20), ref)
    assert ref.shape[1] < ids.shape[1] + 20


def test_max_new_tokens_bounds_the_output():
    model, ids = _lm("qwen2"), _ids(2)
    for n in (1, 2, 9):
        out = sk.generate(model, ids, max_new_tokens=n, eos_token_id=None)
        assert torch.equal(out, _hf(model, ids, max_new_tokens=n))
        assert out.shape == (2, ids.shape[1] + n)


def test_weights_changed_after_first_call_are_seen():
    model, ids = _lm("llama"), _ids(1)
    sk.generate(model, ids, max_new_tokens=4, eos_token_id=None)
    sk.sparsify(model, "2:4", method="magnitude", progress=False)  # swaps modules
    assert torch.equal(
        sk.generate(model, ids, max_new_tokens=12, eos_token_id=None), _hf(model, ids, max_new_tokens=12)
    )
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.mul_(-1)  # in place
    assert torch.equal(
        sk.generate(model, ids, max_new_tokens=12, eos_token_id=None), _hf(model, ids, max_new_tokens=12)
    )


@pytest.mark.parametrize("pattern", ["2:4", "2:4+int4", "2:4+int8a32", "block16x16:0.5", None, "mixed", "mixed-quant"])
def test_fuse_linears_stacks_output_rows(pattern):
    lins = [nn.Linear(64, out, bias=True) for out in (64, 32, 32)]
    quant = {"2:4+int4": dict(quant="int4", group_size=32), "2:4+int8a32": dict(quant="int8", act_block=32)}
    base = "2:4" if pattern and pattern.startswith(("2:4", "mixed")) else pattern
    mods = [lin if pattern is None else SparseLinear.from_linear(lin, base, **quant.get(pattern, {})) for lin in lins]
    if pattern == "mixed":
        mods[1] = lins[1]
    if pattern == "mixed-quant":  # quantized rows stack only with the same quantization
        mods[1] = SparseLinear.from_linear(lins[1], "2:4", quant="int8")
    fused = fuse_linears(mods)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = torch.cat([m(x) for m in mods], -1)
        torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5)
    want = {None: nn.Linear, "mixed": Concat, "mixed-quant": Concat}.get(pattern, SparseLinear)
    assert type(fused) is want


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(do_sample=True), ValueError, "do_sample"),
        (dict(temperature=0.7), ValueError, "temperature"),
        (dict(num_beams=2), ValueError, "num_beams"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=True), ValueError, "max_new_tokens"),
        (dict(eos_token_id=VOCAB), ValueError, "eos_token_id"),
        (dict(eos_token_id="2"), TypeError, "eos_token_id"),
        (dict(attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * 7])), ValueError, "padded"),
        (dict(attention_mask=torch.ones(2, 3)), ValueError, "attention_mask"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model, ids = _lm("llama"), _ids(2)
    with pytest.raises(error, match=match):
        sk.generate(model, ids, **kwargs)


def test_bad_inputs_and_models():
    model, ids = _lm("llama"), _ids(2)
    with pytest.raises(TypeError, match="input_ids"):
        sk.generate(model, ids.float())
    with pytest.raises(ValueError, match="input_ids"):
        sk.generate(model, ids[0])
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 96\)"):
        sk.generate(model, ids + VOCAB)
    with pytest.raises(ValueError, match="eval mode"):
        sk.generate(model.train(), ids)
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        sk.generate(_lm("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), ids)
    with pytest.raises(ValueError, match="sliding window"):
        sk.generate(_lm("mistral", sliding_window=10), ids, max_new_tokens=4)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)).eval()
    with pytest.raises(ValueError, match="model_type"):
        sk.generate(gpt2, ids)
