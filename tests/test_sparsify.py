"""sparsify(): in-place swap, overrides, skips, report, and all-or-nothing behaviour."""

import copy

import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern.nn.linear import SparseLinear
from sparsekern.nn.swap import SparsifyReport


class Block(nn.Module):
    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Tiny(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.odd = nn.Linear(d, 6)  # K=32 fits, but blocks of 16 rows do not divide 6 outputs
        self.narrow = nn.Linear(6, d)  # K=6: no N:M pattern with M=4 fits
        self.lm_head = nn.Linear(d, 10)

    def forward(self, x, scale=None):
        for b in self.blocks:
            x = b(x)
        x = x + self.narrow(self.odd(x))
        out = self.lm_head(x)
        return out if scale is None else out * scale


def _masked(model):
    """The same model with every SparseLinear replaced by its dense equivalent."""
    dense = copy.deepcopy(model)
    for name, mod in list(dense.named_modules()):
        if isinstance(mod, SparseLinear):
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent) if parent else dense, child, mod.to_linear())
    return dense


def test_swaps_skips_and_reports():
    model = Tiny()
    before = copy.deepcopy(model)
    report = sk.sparsify(model, "2:4", progress=False)
    assert isinstance(report, SparsifyReport)
    swapped = {r.name for r in report.swapped}
    assert swapped == {"blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "odd"}
    assert {r.name: r.note for r in report.skipped} == {
        "narrow": "2:4: in_features 6 not divisible by m=4",
        "lm_head": "skipped by name",
    }
    assert isinstance(model.narrow, nn.Linear) and isinstance(model.lm_head, nn.Linear)
    assert torch.equal(model.lm_head.weight, before.lm_head.weight)
    for name in swapped:
        assert isinstance(model.get_submodule(name), SparseLinear)
    assert all(abs(r.sparsity - 0.5) < 0.05 for r in report.swapped)  # zero weights only where pruned
    assert report.bytes_after < report.bytes_before and report.bytes_saved == report.bytes_before - report.bytes_after
    text = str(report)
    assert "blocks.0.up" in text and "skipped by name" in text and "5 layers swapped" in text
    x = torch.randn(3, 32)
    torch.testing.assert_close(model(x), _masked(model)(x), rtol=1e-5, atol=1e-5)


def test_overrides_and_globs():
    model = Tiny()
    report = sk.sparsify(
        model,
        "2:4",
        skip=(),
        overrides={"blocks.1.*": "4:8", "blocks.0.down": None, "odd": "block16x16:0.5"},
        progress=False,
    )
    assert model.blocks[1].up.pattern == "4:8"
    assert model.blocks[1].down.pattern == "4:8"
    assert isinstance(model.blocks[0].down, nn.Linear)
    assert isinstance(model.lm_head, SparseLinear)  # skip=() keeps nothing dense by name
    notes = {r.name: r.note for r in report.skipped}
    assert notes["blocks.0.down"] == "override 'blocks.0.down': skip"
    assert "does not divide 6x32" in notes["odd"]


def test_unstructured_keeps_dense_zeroed():
    model = Tiny()
    report = sk.sparsify(model, "unstructured:0.5", progress=False)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    w = model.blocks[0].up.weight
    assert abs((w == 0).float().mean().item() - 0.5) < 0.01
    assert len(report.masked) == 6 and report.bytes_saved == 0  # narrow fits unstructured


def test_calibration_required_and_model_untouched():
    model = Tiny()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="calibration"):
        sk.sparsify(model, "2:4", "wanda", progress=False)
    with pytest.raises(ValueError, match="method"):
        sk.sparsify(model, "2:4", "random", progress=False)
    with pytest.raises(ValueError, match="pattern"):
        sk.sparsify(model, "3:5", progress=False)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_failure_midway_leaves_model_whole(monkeypatch):
    model = Tiny()
    calls = []
    real = SparseLinear.from_linear.__func__

    def flaky(cls, linear, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(cls, linear, *a, **kw)

    monkeypatch.setattr(SparseLinear, "from_linear", classmethod(flaky))
    with pytest.raises(RuntimeError, match="boom"):
        sk.sparsify(model, "2:4", progress=False)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())


@pytest.mark.parametrize("form", ["tensor", "tuple", "dict"])
def test_wanda_calibration_forms(form):
    model = Tiny()
    xs = [torch.randn(4, 32) * torch.linspace(0.1, 5, 32) for _ in range(3)]
    calib = {
        "tensor": xs,
        "tuple": [(x, torch.tensor(2.0)) for x in xs],
        "dict": [{"x": x, "scale": torch.tensor(2.0)} for x in xs],
    }[form]
    ref = copy.deepcopy(model)
    report = sk.sparsify(model, "2:4", "wanda", calibration=calib, progress=False)
    assert len(report.swapped) == 5
    # Wanda weighs |W| by input norms, so masks differ from magnitude's on scaled inputs.
    sk.sparsify(ref, "2:4", "magnitude", progress=False)
    assert not torch.equal(model.blocks[0].up.weight, ref.blocks[0].up.weight)


def test_sparsegpt_runs_and_reduces_error():
    torch.manual_seed(0)
    model = Tiny()
    xs = [torch.randn(16, 32) for _ in range(4)]
    mag, gpt = copy.deepcopy(model), copy.deepcopy(model)
    sk.sparsify(mag, "2:4", "magnitude", progress=False)
    sk.sparsify(gpt, "2:4", "sparsegpt", calibration=xs, progress=False)
    with torch.no_grad():
        x = torch.cat(xs)
        err_mag = (mag(x) - model(x)).pow(2).mean()
        err_gpt = (gpt(x) - model(x)).pow(2).mean()
    assert err_gpt < err_mag


def test_progress_bar(capsys):
    sk.sparsify(Tiny(), "2:4", progress=True)
    assert "sparsify" in capsys.readouterr().err
    sk.sparsify(Tiny(), "2:4", progress=False)
    assert capsys.readouterr().err == ""


# -- mixture of experts left dense: fused 3-D expert weights are listed and counted, never hidden ---


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    return MixtralForCausalLM(cfg).eval()


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    return Qwen2MoeForCausalLM(cfg).eval()


def _zero_fraction_of_all_matrix_weights(model):
    """Independent count: every nn.Linear/SparseLinear weight plus every parameter of a module
    that holds experts or routes to them (3-D stacks, 2-D routers), as dense matrices."""
    zeros = total = 0
    for mod in model.modules():
        if isinstance(mod, SparseLinear):
            w = mod.to_linear().weight
        elif isinstance(mod, nn.Linear):
            w = mod.weight
        elif hasattr(mod, "num_experts"):
            for p in mod.parameters(recurse=False):
                zeros, total = zeros + int((p == 0).sum()), total + p.numel()
            continue
        else:
            continue
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return zeros / total


@pytest.mark.parametrize("make, experts", [(_mixtral, "MixtralExperts"), (_qwen2_moe, "Qwen2MoeExperts")])
def test_moe_experts_listed_and_counted(make, experts):
    torch.manual_seed(0)
    model = make()
    ids = torch.randint(0, 100, (1, 6))
    report = sk.sparsify(model, "2:4", skip=("lm_head", "experts"), progress=False)
    notes = {r.name: r.note for r in report.skipped}
    layer0 = model.model.layers[0].mlp
    assert type(layer0.experts).__name__ == experts
    e, out, k = layer0.experts.gate_up_proj.shape
    assert (
        notes["model.layers.0.mlp.experts.gate_up_proj"] == f"fused expert weights [{e}, {out}, {k}]: skipped by name"
    )
    assert "model.layers.1.mlp.experts.down_proj" in notes
    assert notes["model.layers.0.mlp.gate.weight"].startswith(f"router weight [{e}, 64]")
    assert torch.count_nonzero(layer0.experts.gate_up_proj) == layer0.experts.gate_up_proj.numel()  # untouched
    # Honest totals: the pruned layers are half zero, the model's matrix weights are mostly dense.
    assert report.pruned_sparsity == pytest.approx(0.5, abs=0.01)
    assert report.sparsity == pytest.approx(_zero_fraction_of_all_matrix_weights(model), abs=1e-3)
    assert report.sparsity < 0.3
    text = str(report)
    assert f"{e}x{out}x{k}" in text and f"sparsity {report.sparsity:.1%} of all linear weights" in text
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_sparsity_counts_skipped_layers():
    model = Tiny()
    report = sk.sparsify(model, "2:4", progress=False)
    total = sum(m.weight.numel() if isinstance(m, nn.Linear) else m.to_linear().weight.numel()
                for m in model.modules() if isinstance(m, (nn.Linear, SparseLinear)))  # fmt: skip
    pruned = sum(r.in_features * r.out_features for r in report.swapped)
    assert report.sparsity == pytest.approx(0.5 * pruned / total, abs=1e-3)
    assert report.pruned_sparsity == pytest.approx(0.5, abs=1e-3)
