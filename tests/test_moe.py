"""Mixture-of-experts models: N:M-sparse experts (SparseExperts), MoE-Pruner statistics, expert dropping.

The ground truth for a pruned experts module is transformers' own experts forward run on the
dense pruned weights (``SparseExperts.dense``, decompressed by the format, not by a kernel).
"""

import copy

import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern.nn.moe import SparseExperts, experts_layout
from sparsekern.prune.experts import ExpertStats, drop_experts, prune_experts


def mixtral(layers=2, experts=4, hidden=64, inter=128, dtype=torch.float32):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=100, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2,
    )  # fmt: skip
    return MixtralForCausalLM(cfg).to(dtype).eval()


def qwen2_moe(layers=2, experts=4):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        num_experts=experts, num_experts_per_tok=2,
    )  # fmt: skip
    return Qwen2MoeForCausalLM(cfg).eval()


MODELS = {"mixtral": mixtral, "qwen2_moe": qwen2_moe}


def dense_twin(sparse_model, original):
    """A copy of ``original`` holding the sparse model's pruned weights densely (format decompression)."""
    twin = copy.deepcopy(original)
    with torch.no_grad():
        for name, mod in sparse_model.named_modules():
            if isinstance(mod, SparseExperts):
                dense = twin.get_submodule(name)
                getattr(dense, "gate_up_proj" if mod.has_gate else "up_proj").copy_(mod.dense("up"))
                dense.down_proj.copy_(mod.dense("down"))
            elif isinstance(mod, sk.SparseLinear):
                twin.get_submodule(name).weight.copy_(mod.weight)
    return twin


def routing(tokens, experts, k, generator):
    """Distinct top-k experts per token and normalised weights (fp32, as the routers give them)."""
    index = torch.stack([torch.randperm(experts, generator=generator)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=generator).softmax(-1)
    return index, weights


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("tokens", [1, 2, 37])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "block16x16:0.75", "block32x16:0.5"])
def test_sparse_experts_matches_transformers_forward(family, tokens, pattern):
    torch.manual_seed(tokens)
    g = torch.Generator().manual_seed(tokens)
    experts = MODELS[family]().model.layers[0].mlp.experts
    sparse, note = prune_experts(experts, pattern)
    assert note == "" and sparse.pattern == (pattern.replace(":0.5", ":0.50") if "block" in pattern else pattern)
    dense = copy.deepcopy(experts)
    with torch.no_grad():
        dense.gate_up_proj.copy_(sparse.dense("up"))
        dense.down_proj.copy_(sparse.dense("down"))
    zeros = float(pattern.split(":")[1]) if "block" in pattern else 1 - int(pattern[0]) / int(pattern[2])
    assert (dense.gate_up_proj == 0).float().mean() == pytest.approx(zeros)
    assert (dense.down_proj == 0).float().mean() == pytest.approx(zeros)
    x = torch.randn(tokens, experts.gate_up_proj.shape[2], generator=g)
    index, weights = routing(tokens, experts.num_experts, 2, g)
    with torch.no_grad():
        want = dense(x, index, weights)
        got = sparse(x, index, weights)
    assert got.shape == want.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if tokens > 1:
        # An expert-parallel sentinel (id == num_experts) adds nothing: the same as weight 0 there.
        # (transformers' own forward reads past the stack for it unless expert-parallel is set up.)
        sentinel, zeroed = index.clone(), weights.clone()
        sentinel[0, 0], zeroed[0, 0] = experts.num_experts, 0.0
        with torch.no_grad():
            torch.testing.assert_close(sparse(x, sentinel, weights), dense(x, index, zeroed), rtol=1e-5, atol=1e-5)


def test_sparse_experts_bf16():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    experts = mixtral(dtype=torch.bfloat16).model.layers[0].mlp.experts
    sparse, _ = prune_experts(experts, "2:4")
    assert sparse.up_values.dtype == torch.bfloat16
    x = torch.randn(5, 64, generator=g).bfloat16()
    index, weights = routing(5, 4, 2, g)
    with torch.no_grad():
        got = sparse(x, index, weights).float()
        # fp32 ground truth on the same bf16 weights and input.
        up, down = sparse.dense("up").float(), sparse.dense("down").float()
        want = torch.zeros(5, 64)
        for t in range(5):
            for j in range(2):
                e = int(index[t, j])
                gate, u = (x[t].float() @ up[e].T).chunk(2)
                want[t] += weights[t, j] * (down[e] @ (nn.functional.silu(gate) * u))
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", MODELS)
def test_sparsify_swaps_experts_and_matches_dense_pruned_model(family):
    torch.manual_seed(0)
    model = MODELS[family]()
    original = copy.deepcopy(model)
    ids = torch.randint(0, 100, (2, 9))
    report = sk.sparsify(model, "2:4", progress=False)
    assert isinstance(model.model.layers[1].mlp.experts, SparseExperts)
    rows = {r.name: r for r in report.experts}
    assert set(rows) == {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")}
    for r in rows.values():
        assert r.sparsity == pytest.approx(0.5) and r.bytes_after < 0.6 * r.bytes_before
    assert "SparseLinear / SparseExperts" in str(report)
    twin = dense_twin(model, original)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, twin(ids).logits, rtol=1e-4, atol=1e-4)
    out = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, twin.generate(ids[:1], max_new_tokens=6, do_sample=False))


def test_expert_stats_are_router_weighted_and_skip_padding():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    experts = mixtral().model.layers[0].mlp.experts
    x = torch.randn(6, 64, generator=g)
    index, weights = routing(6, 4, 2, g)
    mask = torch.tensor([[True, True, True, False, True, True]])  # token 3 is padding
    stats = ExpertStats(experts)
    stats.observe(experts, (x, index, weights), {}, mask, ("norm", "hessian"))
    for e in range(4):
        rows = [(t, j) for t in range(6) for j in range(2) if index[t, j] == e and t != 3]
        assert int(stats.counts[e]) == len(rows)
        if not rows:
            continue
        xs = torch.stack([x[t] * weights[t, j] for t, j in rows])
        torch.testing.assert_close(stats.up[e].act_norm, xs.norm(dim=0))
        torch.testing.assert_close(stats.up[e].hessian, xs.T @ xs)
        gate, up = (torch.stack([x[t] for t, _ in rows]) @ experts.gate_up_proj[e].detach().T).chunk(2, -1)
        hs = nn.functional.silu(gate) * up * torch.stack([weights[t, j] for t, j in rows])[:, None]
        torch.testing.assert_close(stats.down[e].act_norm, hs.norm(dim=0), rtol=1e-5, atol=1e-5)


def _logit_error(model, original, ids):
    with torch.no_grad():
        return (model(ids).logits - original(ids).logits).pow(2).mean().item()


def test_calibrated_expert_pruning_sequential():
    torch.manual_seed(0)
    base = mixtral(layers=2, hidden=128, inter=256)
    calib = [torch.randint(0, 100, (2, 64)) for _ in range(2)]
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(base)
        report = sk.sparsify(
            model, "2:4", method=method, calibration=calib, skip=("lm_head", "self_attn"), progress=False
        )
        assert len(report.experts) == 4 and all(r.sparsity == pytest.approx(0.5) for r in report.experts)
        if method != "magnitude":
            assert report.calibration is not None  # block by block
        errors[method] = _logit_error(model, base, calib[0])
    # On the tokens they were fitted to (what the methods minimise; random weights and ~64 tokens
    # per expert leave held-out text to chance): SparseGPT's compensation is far closer to dense.
    assert errors["sparsegpt"] < 0.5 * errors["magnitude"], errors
    assert errors["wanda"] < errors["magnitude"], errors


def test_unrouted_expert_is_pruned_by_magnitude_and_reported():
    torch.manual_seed(0)
    model = mixtral(layers=1)
    magnitude_up = prune_experts(model.model.layers[0].mlp.experts, "2:4")[0].up_values[3].clone()

    def never_three(module, args, out):  # the router never picks expert 3
        logits, scores, index = out
        other = index.flip(-1)
        spare = torch.where(other == 0, 1, 0)
        return logits, scores, torch.where(index == 3, spare, index)

    model.model.layers[0].mlp.gate.register_forward_hook(never_three)
    calib = [torch.randint(0, 100, (1, 16))]
    report = sk.sparsify(model, "2:4", method="wanda", calibration=calib, skip=("lm_head", "self_attn"), progress=False)
    note = {r.name: r.note for r in report.experts}["model.layers.0.mlp.experts.gate_up_proj"]
    assert note == "wanda: experts [3] got no calibration tokens, pruned by magnitude"
    assert torch.equal(model.model.layers[0].mlp.experts.up_values[3], magnitude_up)
    with torch.no_grad():
        assert torch.isfinite(model(calib[0]).logits).all()


def test_unsupported_layouts_and_patterns_stay_dense_with_reason():
    torch.manual_seed(0)
    model = mixtral()
    model.model.layers[0].mlp.experts.is_transposed = True
    report = sk.sparsify(model, "2:4", progress=False)
    notes = {r.name: r.note for r in report.skipped}
    assert "is_transposed=True" in notes["model.layers.0.mlp.experts.gate_up_proj"]
    assert not isinstance(model.model.layers[0].mlp.experts, SparseExperts)
    assert isinstance(model.model.layers[1].mlp.experts, SparseExperts)
    for pattern, quant, words in (
        ("unstructured:0.5", None, "experts take N:M or block patterns"),
        ("2:4", "int8", "int8 experts"),
    ):
        m2 = mixtral()
        report = sk.sparsify(m2, pattern, quant=quant, progress=False)
        notes = {r.name: r.note for r in report.skipped}
        assert words in notes["model.layers.1.mlp.experts.down_proj"]
        assert not report.experts


def test_prune_experts_bad_input():
    experts = mixtral().model.layers[0].mlp.experts
    with pytest.raises(ValueError, match=r"stats: method 'wanda' needs"):
        prune_experts(experts, "2:4", "wanda")
    with pytest.raises(ValueError, match=r"pattern: SparseExperts holds N:M or block-sparse experts, got 'unstr"):
        prune_experts(experts, "unstructured:0.5")
    experts.has_bias = True
    assert "has_bias=True" in experts_layout(experts)
    with pytest.raises(ValueError, match=r"module: MixtralExperts has has_bias=True"):
        prune_experts(experts, "2:4")


# -- expert dropping ------------------------------------------------------------------------------


def test_drop_experts_keeps_the_most_used():
    torch.manual_seed(0)
    model = mixtral(layers=2, experts=4)
    original = copy.deepcopy(model)
    calib = [torch.randint(0, 100, (2, 24)) for _ in range(2)]
    # Independent usage count of layer 0 (its inputs are the same before any drop).
    seen = []
    hook = original.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out[2]))
    with torch.no_grad():
        for c in calib:
            original(c)
    hook.remove()
    usage0 = torch.bincount(torch.cat(seen).reshape(-1), minlength=4)
    report = drop_experts(model, calib, keep=0.5)
    row = report.layers["model.layers.0.mlp.experts"]
    assert row["usage"] == usage0.tolist()
    assert row["kept"] == sorted(torch.argsort(-usage0, stable=True)[:2].tolist())
    mlp, omlp = model.model.layers[0].mlp, original.model.layers[0].mlp
    kept = torch.tensor(row["kept"])
    assert torch.equal(mlp.gate.weight, omlp.gate.weight[kept])
    assert torch.equal(mlp.experts.gate_up_proj, omlp.experts.gate_up_proj[kept])
    assert torch.equal(mlp.experts.down_proj, omlp.experts.down_proj[kept])
    assert mlp.gate.num_experts == mlp.experts.num_experts == model.config.num_local_experts == 2
    assert "kept 2 experts per layer in 2 layers" in str(report)
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    # The dropped model prunes and runs sparse like any other.
    sk.sparsify(model, "2:4", progress=False)
    assert model.model.layers[1].mlp.experts.num_experts == 2
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)


def test_drop_experts_qwen_router_renormalises():
    torch.manual_seed(0)
    model = qwen2_moe(experts=4)
    calib = [torch.randint(0, 100, (1, 16))]
    drop_experts(model, calib, keep=3)
    gate = model.model.layers[0].mlp.gate
    h = torch.randn(5, 64)
    with torch.no_grad():
        logits, scores, index = gate(h)
    assert logits.shape == (5, 3) and int(index.max()) < 3


@pytest.mark.parametrize(
    "keep, err, words",
    [
        (0, ValueError, r"keep: expected 2\.\.4 experts .*got 0"),
        (1, ValueError, r"keep: expected 2\.\.4 experts \(top-k 2, 4 experts\), got 1"),
        (5, ValueError, r"got 5"),
        (1.5, ValueError, r"keep: expected a fraction in \(0, 1\], got 1.5"),
        (0.0, ValueError, r"keep: expected a fraction in \(0, 1\], got 0.0"),
        (True, TypeError, r"keep: expected an int count or a float fraction, got bool"),
        ("2", TypeError, r"keep: expected an int count or a float fraction, got str"),
    ],
)
def test_drop_experts_bad_keep(keep, err, words):
    model = mixtral()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(err, match=words):
        drop_experts(model, [torch.randint(0, 100, (1, 8))], keep=keep)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_drop_experts_needs_a_moe():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    with pytest.raises(ValueError, match=r"model: has no fused experts modules"):
        drop_experts(llama, [torch.randint(0, 50, (1, 4))], keep=1)


def test_drop_experts_failure_leaves_the_model_whole(monkeypatch):
    import sparsekern.prune.experts as ex

    torch.manual_seed(0)
    model = mixtral(layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    real = ex._cut

    def flaky(module, kept, e, undo):
        calls.append(1)
        if len(calls) == 3:  # layer 0 done (experts + router), fail on layer 1
            raise RuntimeError("planted failure")
        real(module, kept, e, undo)

    monkeypatch.setattr(ex, "_cut", flaky)
    with pytest.raises(RuntimeError, match="planted failure"):
        drop_experts(model, [torch.randint(0, 100, (1, 8))], keep=2)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.model.layers[0].mlp.experts.num_experts == model.model.layers[0].mlp.gate.num_experts == 4
    assert model.config.num_local_experts == 4


# -- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family, pattern", [("mixtral", "2:4"), ("qwen2_moe", "2:4"), ("mixtral", "block16x16:0.75")])
def test_save_load_and_from_pretrained(family, pattern, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = MODELS[family]()
    fresh = copy.deepcopy(model)
    sk.sparsify(model, pattern, progress=False)
    sk.save(model, tmp_path / "m")
    entry = sk.checkpoint.read_json(str(tmp_path / "m" / "sparsekern.json"))["layers"]["model.layers.1.mlp.experts"]
    assert entry["class"] == "SparseExperts" and entry["experts"] == 4
    assert entry["pattern"] == model.model.layers[1].mlp.experts.pattern
    ids = torch.randint(0, 100, (2, 7))
    sk.load(tmp_path / "m", fresh)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(hf.model.layers[1].mlp.experts, SparseExperts)
    assert not any(p.is_meta for p in hf.parameters()) and not any(b.is_meta for b in hf.buffers())
    with sk.use_backend("reference"), torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(fresh(ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(hf(ids).logits, want, rtol=0, atol=0)


def _rewrite(folder, edit):
    import json

    for name in ("sparsekern.json", "config.json"):
        path = folder / name
        cfg = json.loads(path.read_text())
        layers = cfg["layers"] if name == "sparsekern.json" else cfg["quantization_config"]["layers"]
        edit(layers["model.layers.0.mlp.experts"])
        path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit, words",
    [
        (
            lambda e: e.update(experts=8),
            r"up_values: expected shape \(8, 256, 32\), got \(4, 256, 32\)|"
            r"\(experts, hidden, intermediate, has_gate\) \(8, 64, 128, True\), the model's module is \(4, 64, 128, True\)",
        ),
        (lambda e: e.update(hidden=0), r"\.hidden: expected a positive int, got 0"),
        (lambda e: e.update(has_gate="yes"), r"\.has_gate: expected true or false, got 'yes'"),
        (lambda e: e.update(kind="csr"), r"\.kind: expected 'nm' or 'block' for SparseExperts, got 'csr'"),
        (lambda e: e.update(kind="block"), r"\.block: expected \[rows, cols\] of positive ints, got None"),
        (lambda e: e.update(quant="int8"), r"\.quant: SparseExperts holds float values only"),
        (lambda e: e.update(m=3), r"\.pattern: '2:4' disagrees|the nm pattern does not divide"),
        (
            lambda e: e.update({"class": "Experts"}),
            r"\.class: expected 'SparseLinear', 'SparseExperts' or 'QuantLinear', got 'Experts'",
        ),
    ],
)
def test_checkpoint_bad_entries(tmp_path, edit, words):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = mixtral()
    fresh = copy.deepcopy(model)
    sk.sparsify(model, "2:4", progress=False)
    sk.save(model, tmp_path / "m")
    _rewrite(tmp_path / "m", edit)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=words):
        sk.load(tmp_path / "m", fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # untouched
    with pytest.raises(ValueError, match=words):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def test_checkpoint_corrupt_meta_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = mixtral()
    fresh = copy.deepcopy(model)
    sk.sparsify(model, "2:4", progress=False)
    sk.save(model, tmp_path / "m")
    file = str(tmp_path / "m" / "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.0.mlp.experts.down_meta"][2, 5, 0] = -1  # every 2-bit index 3: duplicates
    save_file(tensors, file, metadata={"format": "pt", "sparsekern_format_version": "1"})
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp.experts': down expert 2: "):
        sk.load(tmp_path / "m", fresh)
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp.experts': down expert 2: "):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def test_calibrated_qwen2_moe_shared_expert_keeps_its_own_statistics(monkeypatch):
    """The shared expert's linears and the routed experts read the same hidden tensor; the
    linears must not be handed the experts' per-expert statistics (or the other way round)."""
    import sparsekern.nn.swap as swap

    torch.manual_seed(0)
    model = qwen2_moe(layers=1)
    calib = [torch.randint(0, 100, (2, 16))]
    seen = {}
    real = swap._build_experts

    def spy(name, mod, pat, method, stats, rows, dense_fallback):
        seen[name] = stats
        return real(name, mod, pat, method, stats, rows, dense_fallback)

    monkeypatch.setattr(swap, "_build_experts", spy)
    report = sk.sparsify(model, "2:4", method="sparsegpt", calibration=calib, progress=False)
    assert isinstance(seen["model.layers.0.mlp.experts"], ExpertStats)
    assert seen["model.layers.0.mlp.experts"].n_tokens == 2 * 16 * 2  # every token, top-2
    names = {r.name for r in report.swapped}
    assert "model.layers.0.mlp.shared_expert.gate_proj" in names and "model.layers.0.mlp.experts.down_proj" in names
    with torch.no_grad():
        assert torch.isfinite(model(calib[0]).logits).all()


def test_dense_fallback_false_keeps_no_dense_experts():
    from sparsekern import dispatch

    torch.manual_seed(0)
    model = mixtral(layers=1)
    sk.sparsify(model, "2:4", dense_fallback=False, progress=False)
    experts = model.model.layers[0].mlp.experts
    assert experts.dense_fallback is False
    x = torch.randn(40, 64)
    offsets = torch.tensor([0, 10, 20, 30, 40])
    args = (x, experts.up_values, experts.up_meta, offsets, 2, 4)
    assert "dense" not in [impl.backend for impl in dispatch.candidates("nm_grouped_linear", *args)]
    with pytest.raises(ValueError, match=r"backend: 'dense' cannot run nm_grouped_linear .*dense_fallback=False"):
        with sk.use_backend("dense"):
            sk.ops.nm_grouped_linear(*args)
    experts.dense_fallback = True
    assert "dense" in [impl.backend for impl in dispatch.candidates("nm_grouped_linear", *args)]
    with pytest.raises(TypeError, match=r"dense_fallback: expected bool, got int"):
        experts.dense_fallback = 0
