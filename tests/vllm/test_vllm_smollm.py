"""A real pruned model under vLLM: SmolLM2-135M-Instruct at 2:4 (magnitude), greedy fp32, generates
token for token what transformers + sparsekern generate from the same folder."""

import pytest

pytest.importorskip(
    "vllm.model_executor", reason="vLLM is not installed here (make test-vllm runs these in .venv-vllm)"
)

from vllm_folders import hf_generate, smollm_folder, vllm_generate  # noqa: E402

from sparsekern.bench import smollm  # noqa: E402

TEXTS = ["The capital of France is", "def fibonacci(n):"]
NEW_TOKENS = 16


@pytest.mark.skipif(smollm.model_dir() is None, reason=smollm.MISSING)
def test_pruned_smollm2_generation_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    folder = smollm_folder(str(tmp_path / "smollm2-2of4"))
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = [tok(t).input_ids for t in TEXTS]
    want = hf_generate(folder, prompts, NEW_TOKENS)
    got = vllm_generate(folder, prompts, NEW_TOKENS, quantization="sparsekern")
    assert got["tokens"] == want
