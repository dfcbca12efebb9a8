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


# -- safe inputs: paths stay inside the folder, malformed files are refused by name -----------


def _edit_json(path, edit):
    meta = json.loads((path / "sparsekern.json").read_text())
    edit(meta)
    (path / "sparsekern.json").write_text(json.dumps(meta))


def test_weights_entry_must_stay_inside_folder(tmp_path):
    other, mine = tmp_path / "other", tmp_path / "mine"
    sk.save(_sparse_net(), other)
    sk.save(_sparse_net(), mine)
    outside = str(other / "model.safetensors")
    (mine / "link.safetensors").symlink_to(outside)
    for name in (outside, "../other/model.safetensors", "link.safetensors", "/etc/passwd", "", 3):
        _edit_json(mine, lambda m, n=name: m.__setitem__("weights", n))
        fresh = Net()
        state = _state(fresh)
        with pytest.raises(ValueError, match=r"sparsekern\.json: weights: "):
            sk.load(mine, fresh)
        assert _unchanged(fresh, state)
    # a symlink that stays inside the folder is fine
    (mine / "same.safetensors").symlink_to(mine / "model.safetensors")
    _edit_json(mine, lambda m: m.__setitem__("weights", "same.safetensors"))
    assert isinstance(sk.load(mine, Net()).a, SparseLinear)


def test_sharded_index_must_stay_inside_folder(tmp_path):
    net = Net()
    sk.sparsify(net, "2:4", skip=("head",), progress=False)
    ct.to_sparse24_bitmask(net, str(tmp_path / "ct"))
    d = tmp_path / "ct"
    (d / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.bias": "../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match=r"index\.json: weight_map shard '\.\./elsewhere\.safetensors'"):
        sk.load(d, Net())
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: not valid JSON"):
        sk.load(d, Net())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("layers"), r"sparsekern\.json: layers: expected an object"),
        (lambda m: m["layers"]["a"].pop("n"), r"sparsekern\.json: layers\['a'\]\.n: expected a positive int, got None"),
        (lambda m: m["layers"]["a"].__setitem__("n", "2"), r"layers\['a'\]\.n: expected a positive int, got '2'"),
        (lambda m: m["layers"]["a"].__setitem__("in_features", [64]), r"layers\['a'\]\.in_features: expected"),
        (lambda m: m["layers"]["a"].__setitem__("kind", "csr"), r"layers\['a'\]\.kind: expected one of"),
        (lambda m: m["layers"]["c"].__setitem__("block", 16), r"layers\['c'\]\.block: expected \[rows, cols\]"),
        (lambda m: m["layers"].__setitem__("a", []), r"layers\['a'\]: expected an object"),
        (lambda m: m.__setitem__("aliases", ["head.weight"]), r"sparsekern\.json: aliases: expected an object"),
    ],
)
def test_malformed_metadata_refused_by_key(tmp_path, edit, message):
    sk.save(_sparse_net(), tmp_path)
    _edit_json(tmp_path, edit)
    fresh = Net()
    state = _state(fresh)
    with pytest.raises(ValueError, match=message):
        sk.load(tmp_path, fresh)
    assert _unchanged(fresh, state)


def test_garbled_json_and_safetensors_refused_by_file(tmp_path):
    sk.save(_sparse_net(), tmp_path)
    good = (tmp_path / "sparsekern.json").read_text()
    (tmp_path / "sparsekern.json").write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"sparsekern\.json: not valid JSON"):
        sk.load(tmp_path, Net())
    (tmp_path / "sparsekern.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"sparsekern\.json: expected a JSON object, got list"):
        sk.load(tmp_path, Net())
    (tmp_path / "sparsekern.json").write_text(good)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    hlen = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + hlen])
    for garble in (
        lambda h: list(h),  # not an object
        lambda h: {**h, "a.values": {"dtype": "F32", "shape": [128, 32]}},  # no data_offsets
        lambda h: {**h, "a.values": {**h["a.values"], "data_offsets": [40, 8]}},  # end before start
        lambda h: {**h, "a.values": {**h["a.values"], "shape": "128x32"}},
    ):
        raw = json.dumps(garble(header)).encode().ljust(hlen)[:hlen]
        if len(json.dumps(garble(header)).encode()) > hlen:  # keep the data section where it was
            raw = json.dumps(garble(header), separators=(",", ":")).encode()
            f.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + hlen :])
        else:
            f.write_bytes(data[:8] + raw + data[8 + hlen :])
        with pytest.raises(ValueError, match=r"model\.safetensors: corrupt safetensors header"):
            sk.load(tmp_path, Net())
    f.write_bytes(data[:8] + b"\xff" * hlen + data[8 + hlen :])
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt safetensors header"):
        sk.load(tmp_path, Net())


# -- atomic saves ------------------------------------------------------------------------------


def test_save_is_atomic_and_fsynced(tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "ckpt"
    first = _sparse_net()
    sk.save(first, target)
    (target / "config.json").write_text("{}")  # files beside the checkpoint survive a re-save
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    second = _sparse_net()
    sk.save(second, target)
    names = {os.path.basename(p) for p in synced}
    assert {"model.safetensors", "sparsekern.json", "config.json"} <= names
    assert any(n.startswith(".ckpt.tmp-") for n in names)  # the new folder, before its rename
    assert str(tmp_path) in synced  # the parent, after the rename
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary folder left
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors", "sparsekern.json"]
    assert torch.equal(sk.load(target, Net()).a.values, second.a.values)

    # A save that fails half-way leaves the previous checkpoint whole and no stray files.
    def broken(tensors, file, metadata=None):
        open(file, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        sk.save(_sparse_net(), target)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors", "sparsekern.json"]
    assert torch.equal(sk.load(target, Net()).a.values, second.a.values)


def test_save_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a sparsekern checkpoint"):
        sk.save(_sparse_net(), tmp_path)
    assert os.listdir(tmp_path) == ["notes.txt"]
    sk.save(_sparse_net(), tmp_path / "empty")  # new folder: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="expected a folder"):
        sk.save(_sparse_net(), tmp_path / "file")
