"""The lean decode step in C++ (torch.ops.sparsekern._lean_step_cpu, sparsekern/lean/native.py)
against LeanDecoder's Python step: logits per element and K/V caches, on tiny random LMs; the
choice between the two steps; bad arguments to the op.

The C++ step runs the small ops (rms_norm, rotary, attention, silu * up, residual adds) as its own
fp32 loops (csrc/cpu/lean_kernels.cpp), so it equals the Python step within TOL, not bit for bit;
fp32 greedy tokens still equal model.generate's."""

import pytest
import torch
from test_lean_decode import VOCAB, _hf, _ids, _lm

import sparsekern as sk
from sparsekern import dispatch
from sparsekern.lean import native
from sparsekern.lean.decoder import LeanDecoder
from sparsekern.lean.generate import decoder_for
from sparsekern.lean.native import NativeStep
from sparsekern.nn.linear import SparseLinear

pytestmark = pytest.mark.skipif(native.unavailable() is not None, reason=f"C++ step: {native.unavailable()}")

# name -> sparsify arguments (None: dense nn.Linear layers).
KINDS = {
    "dense": None,
    "2:4": dict(pattern="2:4"),
    "4:8": dict(pattern="4:8"),
    "block": dict(pattern="block16x16:0.5"),
    "int8": dict(pattern="2:4", quant="int8"),
    "int4-g32": dict(pattern="2:4", quant="int4", group_size=32, symmetric=False),
    "int8-a32": dict(pattern="2:4", quant="int8", act_block=32),
}
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
}
PROMPT, STEPS = 7, 4


def _model(arch="llama", kind="2:4", dtype=torch.float32, **overrides):
    model = _lm(arch, None, **overrides)
    if KINDS[kind] is not None:
        args = dict(KINDS[kind])
        sk.sparsify(model, args.pop("pattern"), method="magnitude", progress=False, **args)
        layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
        assert len(layers) == 7 * len(model.model.layers)
        assert {(m.quant, m.group_size, m.act_block) for m in layers} == {
            (args.get("quant"), args.get("group_size", 0), args.get("act_block", 0))
        }
    return model.to(dtype)


def _prefill(model, dec, ids, total):
    with torch.inference_mode():
        pre = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        kv = dec.start(pre.past_key_values, ids.shape[0], ids.shape[1], total)
    return kv, pre.logits[:, -1].argmax(-1)


def _both_steps(model, batch, prompt=PROMPT):
    """Logits and K/V of STEPS decode steps, Python step and C++ step, on copies of one cache."""
    dec = decoder_for(model)
    native = dec.stepper(batch)
    assert isinstance(native, NativeStep), dec.why_python
    ids = _ids(batch, prompt)
    kv_py, tok = _prefill(model, dec, ids, prompt + STEPS)
    kv_cc = [(k.clone(), v.clone()) for k, v in kv_py]
    out = []
    with torch.inference_mode():
        for pos in range(prompt, prompt + STEPS):
            ref, got = dec.step(tok, pos, kv_py), native(tok, pos, kv_cc)
            out.append((ref, got))
            tok = ref.argmax(-1)
    return out, kv_py, kv_cc


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("llama", {}),  # GQA: 2 query heads per KV head
        ("qwen2", {}),  # q/k/v biases
        ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),  # MHA, every bias
        ("mistral", dict(sliding_window=64, num_key_value_heads=1)),  # MQA
    ],
    ids=["llama-gqa", "qwen2", "llama-mha-bias", "mistral-mqa"],
)
def test_cpp_step_matches_python_step(arch, overrides, kind, dtype, batch):
    if kind.startswith("int") and arch != "llama":
        pytest.skip("quantized layers: one architecture is enough")
    model = _model(arch, kind, dtype, **overrides)
    _check_steps(*_both_steps(model, batch), batch, dtype, coarse=bool((KINDS[kind] or {}).get("act_block")))


def _close(got, ref, coarse=False):
    """got == ref within TOL, or, in 16-bit dtypes, within 4 ulps of ref's largest element: the two
    steps sum attention in another order, and a value rounded the other way in one block moves
    every later one by about an ulp of its scale. ``coarse`` (int8 activations): an element of a
    layer's input an ulp apart in the two steps may round to the next int8 step (1/127 of its
    block's largest), coarser than fp16's ulp: 4 ulps of bf16 then, in either 16-bit dtype (fp16
    on an AVX2 Zen 3 measured 13 fp16 ulps of the largest logit)."""
    tol = dict(TOL[ref.dtype])
    if ref.dtype != torch.float32:
        eps = torch.finfo(torch.bfloat16 if coarse else ref.dtype).eps
        tol["atol"] = max(tol["atol"], 4 * eps * ref.float().abs().max().item())
    torch.testing.assert_close(got, ref, **tol)


def _check_steps(steps, kv_py, kv_cc, batch, dtype, prompt=PROMPT, coarse=False):
    for ref, got in steps:
        assert got.shape == ref.shape == (batch, VOCAB) and got.dtype == ref.dtype == dtype
        assert torch.isfinite(ref).all()
        _close(got, ref, coarse)
    n = prompt + STEPS  # every position written by prefill or a step
    for (kp, vp), (kc, vc) in zip(kv_py, kv_cc):
        _close(kc[:, :, :n], kp[:, :, :n], coarse)
        _close(vc[:, :, :n], vp[:, :, :n], coarse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpp_step_long_prefix_and_uneven_blocks(dtype):
    """Softmax over 100+ keys (several vector widths and a tail), and a block with fewer query
    heads than the others (structured pruning leaves such blocks): o's input is narrower there."""
    model = _model("llama", "dense", torch.float32)
    attn = model.model.layers[1].self_attn
    with torch.no_grad():  # 2 of the 4 query heads kept; 1 per KV head (head_dim 16)
        attn.q_proj = torch.nn.Linear(64, 32, bias=False)
        attn.o_proj = torch.nn.Linear(32, 64, bias=False)
        for lin in (attn.q_proj, attn.o_proj):
            lin.weight.normal_(0, 0.2)
    attn.num_key_value_groups = 1
    model = model.to(dtype)
    _check_steps(*_both_steps(model, 3, prompt=101), 3, dtype, prompt=101)


@pytest.mark.parametrize("kind", ["dense", "2:4", "4:8", "block", "int8", "int4-g32", "int8-a32"])
@pytest.mark.parametrize("batch", [1, 3])
def test_generate_through_cpp_step_matches_hf(kind, batch, monkeypatch):
    model = _model("llama", kind)
    ids = _ids(batch)
    ref = _hf(model, ids, max_new_tokens=16)

    def python_step(*args):
        raise AssertionError("sk.generate ran the Python step")

    monkeypatch.setattr(LeanDecoder, "step", python_step)
    assert torch.equal(sk.generate(model, ids, max_new_tokens=16, eos_token_id=None), ref)


# -- which step runs ---------------------------------------------------------------------------


def test_layers_that_do_not_stack_keep_the_python_step():
    model = _model("llama", "2:4")
    model.model.layers[1].self_attn.k_proj = model.model.layers[1].self_attn.k_proj.to_linear()  # q, v stay 2:4
    dec = decoder_for(model)
    assert dec.native is None and "model.layers.1.qkv: Concat" in dec.why_python
    assert dec.stepper(1) == dec.step
    ids = _ids(2)
    assert torch.equal(sk.generate(model, ids, max_new_tokens=8, eos_token_id=None), _hf(model, ids, max_new_tokens=8))


@pytest.mark.parametrize("kind", ["2:4", "block", "int4-g32"])
def test_plans_on_the_dense_fallback_run_its_copy(kind):
    model = _model("llama", kind, torch.bfloat16)
    with dispatch.use_backend("dense"):
        steps, kv_py, kv_cc = _both_steps(model, 3)
        assert set(decoder_for(model).stepper(3).specs[::5]) == {0}  # every linear as at::linear
    _check_steps(steps, kv_py, kv_cc, 3, torch.bfloat16)


def test_int8_activations_on_the_dense_fallback_keep_the_python_step():
    model, ids = _model("llama", "int8-a32"), _ids(1)
    dec = decoder_for(model)
    with dispatch.use_backend("dense"):
        assert dec.stepper(1) == dec.step and "plan runs backend 'dense'" in dec.why_python
        out = sk.generate(model, ids, max_new_tokens=6, eos_token_id=None)
        assert torch.equal(out, _hf(model, ids, max_new_tokens=6))


def test_plan_on_another_backend_keeps_the_python_step():
    model = _model("llama", "2:4")
    ids = _ids(1)
    dec = decoder_for(model)
    with dispatch.use_backend("reference"):
        assert dec.stepper(1) == dec.step
        assert "plan runs backend 'reference'" in dec.why_python
        out = sk.generate(model, ids, max_new_tokens=8, eos_token_id=None)
    assert isinstance(dec.stepper(1), NativeStep)  # the choice follows the dispatch state
    assert torch.equal(out, _hf(model, ids, max_new_tokens=8))


def test_env_keeps_the_python_step(monkeypatch):
    model = _model("llama", "2:4")
    dec = decoder_for(model)
    monkeypatch.setenv("SPARSEKERN_LEAN_STEP", "python")
    assert dec.stepper(1) == dec.step and dec.why_python == "SPARSEKERN_LEAN_STEP=python"
    monkeypatch.delenv("SPARSEKERN_LEAN_STEP")
    assert isinstance(dec.stepper(1), NativeStep)


def test_without_the_op_the_python_step_runs(monkeypatch):
    monkeypatch.setattr(native, "unavailable", lambda: "no extension here")
    model, ids = _model("llama", "2:4"), _ids(1)
    dec = decoder_for(model)
    assert dec.native is None and dec.why_python == "no extension here"
    assert torch.equal(sk.generate(model, ids, max_new_tokens=6, eos_token_id=None), _hf(model, ids, max_new_tokens=6))


# -- the op's arguments ------------------------------------------------------------------------


def _op_args(batch=2):
    model = _model("llama", "2:4")
    dec = decoder_for(model)
    kv, tok = _prefill(model, dec, _ids(batch), PROMPT + 2)
    step = dec.stepper(batch)
    ks, vs = [k.clone() for k, _ in kv], [v.clone() for _, v in kv]  # normal tensors, not inference ones
    for t in ks + vs:  # positions not filled yet: a known value, so a write there shows
        t[:, :, PROMPT:] = 0
    args = dict(
        tokens=tok.clone(), pos=PROMPT, embed=dec.embed, cos=dec.cos, sin=dec.sin, norms=step.norms, eps=step.eps,
        weights=step.weights, specs=step.specs, k_cache=ks, v_cache=vs, final_norm=dec.norm,
        final_eps=dec.norm_eps, scale=dec.scale,
    )  # fmt: skip
    return args


def _call(args):
    return torch.ops.sparsekern._lean_step_cpu(**args)


def _replace(lst, i, value):
    return [value if j == i else t for j, t in enumerate(lst)]


def _bad_cases(a):
    k0, w = a["k_cache"][0], a["weights"]
    long_cos = torch.cat([a["cos"], a["cos"]])
    return {
        "norms short": (dict(norms=a["norms"][:-1]), ValueError, r"norms: expected 4 entries \(2 per block\), got 3"),
        "eps short": (dict(eps=a["eps"][:1]), ValueError, "eps: expected 4 entries"),
        "v_cache short": (dict(v_cache=a["v_cache"][:1]), ValueError, "v_cache: expected 2 entries"),
        "weights short": (dict(weights=w[:-6]), ValueError, "weights: expected 48 entries"),
        "specs long": (dict(specs=[*a["specs"], 0]), ValueError, "specs: expected 40 entries"),
        "pos past cache": (
            dict(pos=PROMPT + 2, cos=long_cos, sin=long_cos),
            ValueError,
            r"pos: expected 0 <= pos < 9 \(the length of k_cache",
        ),
        "pos negative": (dict(pos=-1), ValueError, "pos: expected 0 <= pos"),
        "pos past rope": (dict(cos=a["cos"][:3], sin=a["sin"][:3]), ValueError, r"pos: expected 0 <= pos < 3"),
        "token id": (dict(tokens=torch.tensor([0, VOCAB])), ValueError, r"tokens: expected ids in \[0, 96\), got 96"),
        "token dtype": (dict(tokens=a["tokens"].int()), TypeError, "tokens: expected dtype"),
        "tokens 2-D": (dict(tokens=a["tokens"][:, None]), ValueError, "tokens: expected a non-empty 1-D"),
        "batch vs cache": (dict(tokens=a["tokens"][:1]), ValueError, r"k_cache\[0\]: expected \[batch=1"),
        "cache dtype": (
            dict(k_cache=_replace(a["k_cache"], 1, a["k_cache"][1].double())),
            TypeError,
            r"k_cache\[1\]: cache: expected dtype torch.float32",
        ),
        "cache shape": (
            dict(v_cache=_replace(a["v_cache"], 0, torch.zeros_like(k0[:, :, :-1]))),
            ValueError,
            r"v_cache\[0\]: expected shape",
        ),
        "cache view": (
            dict(k_cache=_replace(a["k_cache"], 0, k0.transpose(1, 2).contiguous().transpose(1, 2))),
            ValueError,
            "expected contiguous",
        ),
        "cos dtype": (dict(cos=a["cos"].double()), TypeError, "cos: expected dtype torch.float32"),
        "norm shape": (dict(norms=_replace(a["norms"], 2, a["norms"][2][:-1])), ValueError, r"norms\[2\]: expected"),
        "final norm": (dict(final_norm=a["final_norm"][:5]), ValueError, "final_norm: expected shape"),
        "meta shape": (
            dict(weights=_replace(w, 7, w[7][:, :1])),
            ValueError,
            r"blocks\[0\]\.o on a \[2, 64\] input: meta: expected shape",
        ),
        "values dtype": (
            dict(weights=_replace(w, 30, w[30].double())),
            TypeError,
            r"blocks\[1\]\.o on a \[2, 64\] input: values: expected",
        ),
        "missing values": (dict(weights=_replace(w, 12, None)), TypeError, r"blocks\[0\]\.gate_up\.values: expected"),
        "n:m": (
            dict(specs=_replace(a["specs"], 1, 5)),
            ValueError,
            r"blocks\[0\]\.qkv on a \[2, 64\] input: n: expected 0 < n < m",
        ),
        "kind": (dict(specs=_replace(a["specs"], 15, 7)), ValueError, r"blocks\[0\]\.down: specs\[0\] \(kind\)"),
        "values strided": (
            dict(weights=_replace(w, 0, w[0].t().contiguous().t())),
            ValueError,
            r"blocks\[0\]\.qkv\.values: expected a contiguous",
        ),
        "gate_up rows": (
            dict(weights=_replace(_replace(w, 12, w[12][1:]), 13, w[13][1:])),
            ValueError,
            r"blocks\[0\]\.gate_up: expected an even number of outputs",
        ),
        "o in_features": (
            dict(weights=_replace(_replace(w, 6, w[6][:, :16].contiguous()), 7, w[7][:, :1].contiguous())),
            ValueError,
            r"blocks\[0\]\.o on a \[2, 64\] input: x: expected last dimension 32 \(in_features\)",
        ),
        "down K": (
            dict(weights=_replace(_replace(w, 42, w[42][:-8]), 43, w[43][:-8])),
            ValueError,
            r"blocks\[1\]\.down: expected 64 outputs",
        ),
    }


def test_bad_arguments_raise_naming_them_and_write_nothing():
    a = _op_args()
    before = [(k.clone(), v.clone()) for k, v in zip(a["k_cache"], a["v_cache"])]
    for case, (change, error, match) in _bad_cases(a).items():
        with pytest.raises(error, match=match):
            _call({**a, **change})
        for (k, v), (k0, v0) in zip(zip(a["k_cache"], a["v_cache"]), before):
            assert torch.equal(k, k0) and torch.equal(v, v0), f"{case}: a cache was written"
    _call(a)  # the unchanged arguments run and write position pos
    assert not torch.equal(a["k_cache"][0][:, :, PROMPT], before[0][0][:, :, PROMPT])


def test_opcheck():
    a = _op_args()
    torch.library.opcheck(torch.ops.sparsekern._lean_step_cpu.default, tuple(a.values()))
