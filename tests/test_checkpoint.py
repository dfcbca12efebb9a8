"""save/load: exact round trip, compressed on disk, refusals that leave the model unchanged;
compressed-tensors sparse-24-bitmask checkpoints."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import sparsekern as sk
from sparsekern.formats import compressed_tensors as ct
from sparsekern.nn.linear import SparseLinear


class Net(nn.Module):
    def __init__(self, vocab=50, d=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.a = nn.Linear(d, 128)
        self.b = nn.Linear(128, d, bias=False)
        self.c = nn.Linear(d, 64)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied, as in most LMs

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.b(torch.relu(self.a(h)))
        h = h + self.c(h)
        return self.head(self.norm(h))


def _sparse_net():
    net = Net()
    sk.sparsify(net, "2:4", skip=("head",), overrides={"c": "block16x16:0.5"}, progress=False)
    return net


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, state):
    now = model.state_dict()
    return set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())


def test_round_trip_exact(tmp_path):
    net = _sparse_net()
    sk.save(net, tmp_path)
    fresh = Net()
    assert sk.load(tmp_path, fresh) is fresh
    assert isinstance(fresh.a, SparseLinear) and fresh.a.pattern == "2:4" and fresh.c.kind == "block"
    assert fresh.head.weight is fresh.emb.weight  # tie survives
    for k, v in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(fresh(ids), net(ids))


def test_disk_holds_compressed_tensors(tmp_path):
    net = _sparse_net()
    sk.save(net, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"a.values", "a.meta", "a.bias", "b.values", "b.meta", "c.blocks", "c.crow_indices"} <= keys
    assert not {"a.weight", "b.weight", "c.weight", "head.weight"} & keys  # head is tied: stored once
    meta = json.loads((tmp_path / "sparsekern.json").read_text())
    assert meta["format_version"] == 1 and meta["sparsekern_version"] == sk.__version__
    assert meta["layers"]["a"] == {
        "class": "SparseLinear", "kind": "nm", "pattern": "2:4", "in_features": 64, "out_features": 128,
        "bias": True, "dtype": "float32", "n": 2, "m": 4,
    }  # fmt: skip
    assert meta["aliases"] == {"head.weight": "emb.weight"}
    dense = Net()
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    lin_dense = sum(getattr(dense, n).weight.numel() * 4 for n in "abc")
    lin_sparse = sum(getattr(net, n).nbytes() for n in "abc") - 128 * 4 - 64 * 4  # minus biases
    assert lin_sparse < 0.6 * lin_dense
    assert os.path.getsize(tmp_path / "model.safetensors") < os.path.getsize(tmp_path / "dense.pt") - 0.4 * lin_dense


def test_load_into_other_dtype(tmp_path):
    net = _sparse_net()
    sk.save(net, tmp_path)
    half = sk.load(tmp_path, Net().half())
    assert half.a.values.dtype == torch.float16 and half.a.meta.dtype == torch.int32
    assert torch.equal(half.a.values, net.a.values.half())


def test_truncated_file_refused(tmp_path):
    sk.save(_sparse_net(), tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    fresh = Net()
    state = _state(fresh)
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated: tensor '[\w.]+'"):
        sk.load(tmp_path, fresh)
    assert _unchanged(fresh, state) and isinstance(fresh.a, nn.Linear)
    f.write_bytes(data[:20])
    with pytest.raises(ValueError, match="truncated"):
        sk.load(tmp_path, fresh)


def _rewrite(path, edit):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t["a.meta"].__setitem__((3, 0), 0), r"layer 'a': meta: row 3, group 0"),  # repeated index
        (lambda t: t["c.col_indices"].__setitem__(0, 99), r"layer 'c': col_indices: entry 0 is 99"),
        (lambda t: t.__setitem__("a.values", t["a.values"][:, :-2].contiguous()), r"layer 'a': values: expected shape"),
        (lambda t: t.__setitem__("norm.weight", torch.ones(63)), r"tensor 'norm.weight' has shape \(63,\)"),
        (lambda t: t.pop("norm.bias"), r"missing for model keys \['norm.bias'\]"),
        (lambda t: t.__setitem__("extra", torch.ones(2)), r"unexpected tensors not in the model: \['extra'\]"),
        (lambda t: t.__setitem__("a.meta", t["a.meta"].float()), r"layer 'a': meta: expected dtype torch.int32"),
    ],
)
def test_bad_checkpoint_refused_model_unchanged(tmp_path, edit, message):
    sk.save(_sparse_net(), tmp_path)
    _rewrite(tmp_path, edit)
    fresh = Net()
    state = _state(fresh)
    with pytest.raises(ValueError, match=message):
        sk.load(tmp_path, fresh)
    assert _unchanged(fresh, state)
    assert not any(isinstance(m, SparseLinear) for m in fresh.modules())


def test_wrong_architecture_refused(tmp_path):
    sk.save(_sparse_net(), tmp_path)
    other = Net(d=32)
    with pytest.raises(ValueError, match=r"layer 'a': weight shape \(128, 64\), model expects \(128, 32\)"):
        sk.load(tmp_path, other)
    with pytest.raises(FileNotFoundError):
        sk.load(tmp_path / "nope", Net())


# -- compressed-tensors sparse-24-bitmask ----------------------------------------------------


def test_bitmask_packing_matches_numpy_little_order():
    mask = torch.rand(5, 44) > 0.5  # 44 columns: last byte half used
    want = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    got = ct.pack_bitmask(mask)
    assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), want)
    assert torch.equal(ct.unpack_bitmask(got, 44), mask)


def _ct_decompress(shape, compressed, bitmask):
    """compressed-tensors' own decompression, restated: unpack bits (little order), scatter values."""
    rows, cols = shape.flatten().tolist()
    mask = np.unpackbits(bitmask.numpy(), axis=-1, count=cols, bitorder="little").reshape(rows, cols).astype(bool)
    dense = torch.zeros(rows, cols, dtype=compressed.dtype)
    dense[torch.from_numpy(mask)] = compressed.flatten()
    return dense


@pytest.mark.parametrize("strip", [True, False])
def test_sparse24_bitmask_round_trip(tmp_path, strip):
    net = Net()
    sk.sparsify(net, "2:4", skip=("head",), progress=False)
    written = ct.to_sparse24_bitmask(net, str(tmp_path), strip_weight_suffix=strip)
    assert sorted(written) == ["a", "b", "c"]
    prefix = "a" if strip else "a.weight"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        parts = {s: f.get_tensor(f"{prefix}.{s}") for s in ("shape", "compressed", "bitmask")}
        assert "a.values" not in f.keys() and "a.bias" in f.keys()
    assert parts["shape"].flatten().tolist() == [128, 64] and parts["bitmask"].shape == (128, 8)
    # the files decode to our weight by compressed-tensors' own rule
    assert torch.equal(_ct_decompress(**parts), net.a.weight)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["sparsity_config"]["format"] == "sparse-24-bitmask"
    fresh = Net()
    sk.load(tmp_path, fresh)
    assert isinstance(fresh.a, SparseLinear) and torch.equal(fresh.a.values, net.a.values)
    assert torch.equal(fresh.a.meta, net.a.meta)
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        assert torch.equal(fresh(ids), net(ids))


def test_sparse24_refusals(tmp_path):
    net = Net()
    sk.sparsify(net, "2:4", skip=("head",), progress=False)
    ct.to_sparse24_bitmask(net, str(tmp_path))

    def third_bit(t):
        t["a.bitmask"][2, 1] |= 0xFF  # row 2, columns 8..15: groups 2 and 3 flag 4 each

    _rewrite(tmp_path, third_bit)
    fresh = Net()
    state = _state(fresh)
    with pytest.raises(ValueError, match=r"layer 'a': a.bitmask: row 2, group 2 flags 4 of 4"):
        sk.load(tmp_path, fresh)
    assert _unchanged(fresh, state)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["config_groups"] = {"group_0": {"weights": {"num_bits": 8}}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantized"):
        sk.load(tmp_path, fresh)
    assert _unchanged(fresh, state)


def test_bitmask_to_nm_checks_counts():
    w = torch.randn(4, 16)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, ::2] = True  # 2 of every 4
    values = w[mask].reshape(4, 8)
    nm = ct.bitmask_to_nm(torch.tensor([[4], [16]]), values, ct.pack_bitmask(mask))
    assert torch.equal(nm.to_dense(), torch.where(mask, w, 0.0))
    short = mask.clone()
    short[1, 0] = False
    with pytest.raises(ValueError, match="row 1 flags 7 weights"):
        ct.bitmask_to_nm(torch.tensor([4, 16]), values, ct.pack_bitmask(short))
    with pytest.raises(ValueError, match="compressed: expected shape"):
        ct.bitmask_to_nm(torch.tensor([4, 16]), values[:, :6], ct.pack_bitmask(mask))
    assert copy.copy(nm).pattern == "2:4"
