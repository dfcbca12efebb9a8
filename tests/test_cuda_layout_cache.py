"""The CUDA backend's cache of 2:4 hardware layouts (backends/cuda.py), on CPU tensors.

The layout builder (formats/sm80.hw_layout) runs on any device, so the cache logic is tested
here without a GPU: one build per weight, a rebuild after anything that changes what the layout
was derived from, inference tensors, and one build when threads race on a new weight.
"""

import threading

import pytest
import torch

import sparsekern as sk
from sparsekern.backends import cuda
from sparsekern.nn.linear import SparseLinear


@pytest.fixture
def builds(monkeypatch):
    calls = []
    real = cuda.hw_layout

    def counting(weight):
        calls.append(weight.values.dtype)
        return real(weight)

    monkeypatch.setattr(cuda, "hw_layout", counting)
    cuda.clear_cache()
    yield calls
    cuda.clear_cache()


def _weight(dtype=torch.float16):
    return sk.NMSparseWeight.from_dense(torch.randn(128, 64), n=2, m=4, prune=True).to(dtype)


def test_built_once_and_rebuilt_after_in_place_update(builds):
    w = _weight()
    first = cuda.hw_weight(w.values, w.meta)
    assert cuda.hw_weight(w.values, w.meta) is first and len(builds) == 1
    with torch.no_grad():
        w.values.mul_(2)  # load_state_dict / an optimizer step: same storage, new contents
    again = cuda.hw_weight(w.values, w.meta)
    assert len(builds) == 2
    torch.testing.assert_close(again[0][: w.values.shape[0], : w.values.shape[1]], w.values)


def test_inference_tensors(builds):
    with torch.inference_mode():
        w = _weight()
        assert w.values.is_inference()
        a = cuda.hw_weight(w.values, w.meta)  # _version raised here before
        assert cuda.hw_weight(w.values, w.meta) is a and len(builds) == 1


def test_module_half_rebuilds(builds):
    """Module.half() swaps param.data under the same Parameter: the old layout was fp32... or stale."""
    layer = SparseLinear(_weight(torch.bfloat16))
    cuda.hw_weight(layer.values, layer.meta)
    layer.half()
    assert layer.values.dtype == torch.float16
    values_hw, _ = cuda.hw_weight(layer.values, layer.meta)
    assert builds == [torch.bfloat16, torch.float16] and values_hw.dtype == torch.float16


def test_threads_build_once(builds):
    w = _weight()
    results = []
    start = threading.Barrier(8)

    def run():
        start.wait()
        results.append(cuda.hw_weight(w.values, w.meta))

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and all(r is results[0] for r in results)
