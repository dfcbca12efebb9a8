"""The ``sparsekern`` quantization method as vLLM finds it: registration, config parsing, refusals."""

import pytest
import torch

pytest.importorskip(
    "vllm.model_executor", reason="vLLM is not installed here (make test-vllm runs these in .venv-vllm)"
)

from vllm.model_executor.layers.quantization import get_quantization_config  # noqa: E402

import sparsekern.vllm  # noqa: E402
from sparsekern.vllm.config import SparsekernConfig  # noqa: E402

ENTRY = {"class": "SparseLinear", "kind": "nm", "pattern": "2:4", "n": 2, "m": 4}
ENTRY.update(in_features=64, out_features=32, bias=False, dtype="float32")


def test_register_makes_the_method_known_and_is_idempotent():
    sparsekern.vllm.register()
    sparsekern.vllm.register()
    assert get_quantization_config("sparsekern") is SparsekernConfig


@pytest.mark.parametrize(
    "config",
    [
        {"quant_method": "sparsekern", "format_version": 1, "layers": {"model.proj": ENTRY}},
        {"format": "sparsekern", "format_version": 1, "layers": {"model.proj": ENTRY}, "aliases": {}},
    ],
    ids=["config.json", "sparsekern.json"],
)
def test_reads_quantization_config_and_sparsekern_json(config):
    assert SparsekernConfig.from_config(config).layers == {"model.proj": ENTRY}


@pytest.mark.parametrize(
    "config, words",
    [
        ({"quant_method": "sparsekern", "format_version": 2, "layers": {}}, r"format_version: expected 1, got 2"),
        ({"quant_method": "sparsekern", "format_version": 1, "layers": []}, r"layers: expected an object"),
        (
            {"quant_method": "sparsekern", "format_version": 1, "layers": {"p": {**ENTRY, "m": "4"}}},
            r"layers\['p'\]\.m: expected a positive int, got '4'",
        ),
        (
            {
                "quant_method": "sparsekern",
                "format_version": 1,
                "layers": {"p": {**ENTRY, "quant": "int3", "group_size": 32, "zeros": False}},
            },  # fmt: skip
            r"layers\['p'\]\.quant: expected one of \('int8', 'int4'\), got 'int3'",
        ),
        (
            {
                "quant_method": "sparsekern",
                "format_version": 1,
                "layers": {
                    "model.layers.0.mlp.experts": {
                        "class": "SparseExperts",
                        "kind": "nm",
                        "pattern": "2:4",
                        "n": 2,
                        "m": 4,
                        "experts": 8,
                        "hidden": 64,
                        "intermediate": 128,
                        "has_gate": True,
                        "dtype": "float32",
                    }
                },
            },  # fmt: skip
            r"layers\['model.layers.0.mlp.experts'\]\.class: 'SparseExperts' .* not served by the vLLM plugin yet",
        ),
    ],
)
def test_bad_config_is_refused_naming_the_key(config, words):
    with pytest.raises(ValueError, match=words):
        SparsekernConfig.from_config(config)


def test_sparse_entry_on_a_layer_vllm_does_not_build_as_linear_is_refused():
    cfg = SparsekernConfig({"lm_head": ENTRY})
    with pytest.raises(
        ValueError, match=r"layers\['lm_head'\]: sparse in the checkpoint, but vLLM builds it as Embedding"
    ):
        cfg.get_quant_method(torch.nn.Embedding(4, 4), "lm_head")
    assert cfg.get_quant_method(torch.nn.Embedding(4, 4), "model.embed_tokens") is None
