"""sparsekern.hugepages: large weights copied into mappings advised MADV_HUGEPAGE, values unchanged."""

import gc
import re

import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern import hugepages

pytestmark = pytest.mark.skipif(not hugepages.enabled(), reason="needs Linux with transparent huge pages not 'never'")

BIG = (1024, 1024)  # 4 MiB in fp32, 2 MiB in bf16: both at least one huge page


def thp_eligible(t: torch.Tensor) -> bool:
    """The kernel's own word on the mapping holding ``t``: /proc/self/smaps' THPeligible flag."""
    addr = t.data_ptr()
    with open("/proc/self/smaps") as f:
        text = f.read()
    for m in re.finditer(r"^([0-9a-f]+)-([0-9a-f]+) .*?\nTHPeligible:\s+(\d)", text, re.M | re.S):
        if int(m.group(1), 16) <= addr < int(m.group(2), 16):
            return m.group(3) == "1"
    raise AssertionError(f"no mapping holds address {addr:#x}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8])
def test_rehome_copies_values_into_an_advised_mapping(dtype):
    src = torch.randn(2048, 1536).mul(50).to(dtype)
    out = hugepages.rehome(src)
    assert out is not src and out.data_ptr() != src.data_ptr()
    assert out.dtype == dtype and out.shape == src.shape and out.is_contiguous()
    assert out.data_ptr() % hugepages.HUGE_PAGE == 0  # starts on a huge page
    assert torch.equal(out, src)
    assert hugepages.is_huge(out) and not hugepages.is_huge(src)
    assert thp_eligible(out)
    assert hugepages.rehome(out) is out  # already moved


def test_small_views_and_other_devices_stay():
    small = torch.randn(100, 100)
    assert hugepages.rehome(small) is small
    whole = torch.randn(4096, 1024)
    view = whole[:2048]  # 8 MiB, but part of a 16 MiB storage
    assert hugepages.rehome(view) is view
    assert hugepages.rehome(whole.t()) is not None and not hugepages.is_huge(hugepages.rehome(whole.t()))
    meta = torch.empty(BIG, device="meta")
    assert hugepages.rehome(meta) is meta


def test_switched_off_by_env(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_HUGEPAGES", "0")
    t = torch.randn(BIG)
    assert not hugepages.enabled() and hugepages.rehome(t) is t
    lin = nn.Linear(1024, 1024)
    w = lin.weight.data
    hugepages.rehome_module(lin)
    assert lin.weight.data.data_ptr() == w.data_ptr()


def test_never_mode_switches_it_off(tmp_path, monkeypatch):
    mode = tmp_path / "enabled"
    mode.write_text("always madvise [never]\n")
    monkeypatch.setattr(hugepages, "_THP_MODE", str(mode))
    hugepages._system_allows.cache_clear()
    try:
        assert not hugepages.enabled()
        t = torch.randn(BIG)
        assert hugepages.rehome(t) is t
    finally:
        hugepages._system_allows.cache_clear()


def test_rehome_module_keeps_parameters_ties_and_shared_storage():
    a, b = nn.Linear(1024, 1024), nn.Linear(1024, 1024)
    b.weight = a.weight  # tied: one Parameter object
    c = nn.Linear(1024, 1024)
    c.weight = nn.Parameter(a.weight.data)  # another object on the same storage
    model = nn.Sequential(a, b, c)
    model.register_buffer("table", torch.randn(BIG))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    param = a.weight
    assert hugepages.rehome_module(model) is model
    assert a.weight is param and b.weight is param and isinstance(param, nn.Parameter)
    assert hugepages.is_huge(a.weight) and hugepages.is_huge(model.table)
    assert c.weight.data_ptr() == a.weight.data_ptr()  # still one storage
    assert not hugepages.is_huge(a.bias)  # 4 KiB: stays
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mapping_is_released_with_its_tensor():
    t = hugepages.rehome(torch.randn(BIG))
    ptr = t.data_ptr()
    assert ptr in hugepages._ARENAS
    del t
    gc.collect()
    assert ptr not in hugepages._ARENAS


def test_sparsify_moves_the_sparse_weights():
    model = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 64))
    x = torch.randn(3, 2048)
    sk.sparsify(model, "2:4", skip=None, progress=False)
    big, small = model[0], model[2]
    assert isinstance(big, sk.SparseLinear)
    assert hugepages.is_huge(big.values)  # 2048 x 1024 fp32: 8 MiB
    assert not hugepages.is_huge(small.values)  # 128 KiB
    want = torch.nn.functional.linear(x, big.weight, big.bias)
    torch.testing.assert_close(big(x), want)


def test_generate_moves_the_model_once_and_keeps_its_decoder():
    import tiny_lm

    from sparsekern.lean.generate import _DECODERS

    torch.manual_seed(0)
    model = tiny_lm.llama(vocab_size=8192, hidden_size=64).eval()  # embedding and head: 2 MiB each
    ids = torch.randint(3, 8192, (1, 5))
    want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4)
    got = sk.generate(model, ids, max_new_tokens=4, eos_token_id=None)
    assert hugepages.is_huge(model.get_input_embeddings().weight) and hugepages.is_huge(model.lm_head.weight)
    assert torch.equal(got, want)
    dec = _DECODERS[model][1]  # the one the first call built
    sk.generate(model, ids, max_new_tokens=2, eos_token_id=None)
    assert _DECODERS[model][1] is dec  # kept under the stamp of the moved weights: no rebuild
