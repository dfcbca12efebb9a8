"""The int8 LM head (``sparsify(head="int8")``) as vLLM's ``ParallelLMHead``, at every
tensor-parallel rank: the checkpoint's ``values`` / ``scales`` go through the head's own weight
loader (as vLLM's model loader calls it), and each rank's logits equal the reference's rows for
its slice of the vocabulary; rows vLLM pads the vocabulary with give 0. No process group is
started: vLLM's TP rank and size are patched where the head reads them.
"""

import contextlib
from unittest import mock

import pytest
import torch

pytest.importorskip(
    "vllm.model_executor", reason="vLLM is not installed here (make test-vllm runs these in .venv-vllm)"
)

import vllm.model_executor.layers.vocab_parallel_embedding as vve  # noqa: E402
from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402

from sparsekern import reference  # noqa: E402
from sparsekern.formats.quant import quantize  # noqa: E402
from sparsekern.vllm.config import SparsekernConfig  # noqa: E402
from sparsekern.vllm.head import SparsekernInt8HeadMethod  # noqa: E402

VOCAB, HIDDEN, ACT = 123, 64, 32  # 123 rows: vLLM pads the head to 128


def entry(**kw) -> dict:
    e = {"class": "QuantLinear", "in_features": HIDDEN, "out_features": VOCAB, "bias": False, "dtype": "float32"}
    return {**e, "quant": "int8", "act_block": ACT, **kw}


@contextlib.contextmanager
def tp_rank(size: int, rank: int):
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(vve, "get_tensor_model_parallel_world_size", return_value=size))
        stack.enter_context(mock.patch.object(vve, "get_tensor_model_parallel_rank", return_value=rank))
        stack.enter_context(set_current_vllm_config(VllmConfig()))
        yield


def build_head(cfg: SparsekernConfig):
    return vve.ParallelLMHead(VOCAB, HIDDEN, params_dtype=torch.float32, quant_config=cfg, prefix="lm_head")


def checkpoint(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(VOCAB, HIDDEN, generator=g)
    values, scales, _ = quantize(w, "int8", 1)
    return values, scales[:, 0]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_each_rank_computes_its_vocabulary_rows(tp):
    values, scales = checkpoint()
    cfg = SparsekernConfig({"lm_head": entry()})
    x = torch.randn(5, HIDDEN)  # decode and prefill rows at once
    want = reference.quant_linear(x, values, scales, None, ACT)
    for rank in range(tp):
        with tp_rank(tp, rank):
            head = build_head(cfg)
            assert isinstance(head.quant_method, SparsekernInt8HeadMethod)
            for name in ("values", "scales"):  # what vLLM's loader does for an unstacked parameter
                param = dict(head.named_parameters())[name]
                param.weight_loader(param, {"values": values, "scales": scales}[name])
            head.quant_method.process_weights_after_loading(head)
            got = torch.full((x.shape[0], head.num_embeddings_per_partition), float("nan"))
            got[:] = head.quant_method.apply(head, x)
        lo = head.shard_indices.org_vocab_start_index
        real = head.shard_indices.org_vocab_end_index - lo
        torch.testing.assert_close(got[:, :real], want[:, lo : lo + real], rtol=1e-5, atol=1e-4)
        assert torch.equal(got[:, real:], torch.zeros_like(got[:, real:]))  # vLLM's padding rows


def test_bad_checkpoint_tensors_are_refused_by_name():
    values, scales = checkpoint()
    with tp_rank(1, 0):
        head = build_head(SparsekernConfig({"lm_head": entry()}))
        params = dict(head.named_parameters())
        with pytest.raises(ValueError, match=r"lm_head\.values: shape \[123, 32\] .* needs shape \[123, 64\], int8"):
            params["values"].weight_loader(params["values"], values[:, :32])
        with pytest.raises(ValueError, match=r"lm_head\.values: .* dtype torch\.float32"):
            params["values"].weight_loader(params["values"], values.float())
        with pytest.raises(ValueError, match=r"tensors \['lm_head\.values', 'lm_head\.scales'\] are missing"):
            head.quant_method.process_weights_after_loading(head)
        params["values"].weight_loader(params["values"], values)
        with pytest.raises(ValueError, match=r"lm_head\.values arrived twice"):
            params["values"].weight_loader(params["values"], values)
        bad = scales.clone()
        bad[7] = 0.0
        params["scales"].weight_loader(params["scales"], bad)
        with pytest.raises(ValueError, match=r"checkpoint layer lm_head: scales: expected every scale finite and > 0"):
            head.quant_method.process_weights_after_loading(head)


def test_head_entry_that_does_not_fit_the_model_is_refused():
    with tp_rank(1, 0):
        with pytest.raises(
            ValueError, match=r"layers\['lm_head'\]: an int8 head of 100 x 64, but .* vocabulary of 123"
        ):
            build_head(SparsekernConfig({"lm_head": entry(out_features=100)}))
        with pytest.raises(ValueError, match=r"layers\['lm_head'\]: an int8 head with a bias"):
            build_head(SparsekernConfig({"lm_head": entry(bias=True)}))
    cfg = SparsekernConfig({"lm_head": entry()})
    with pytest.raises(ValueError, match=r"layers\['lm_head'\]: an int8 LM head .* vLLM builds it as Linear"):
        cfg.get_quant_method(torch.nn.Linear(HIDDEN, VOCAB), "lm_head")
