"""The Hugging Face files :func:`sparsekern.save` adds to a folder: config, generation config, tokenizer.

With them the folder is a complete HF model folder: ``AutoModelForCausalLM.from_pretrained(dir)``
(after ``import sparsekern``) rebuilds the model, the pruned layers straight into
``SparseLinear`` through ``quantization_config`` (see :mod:`sparsekern.hf.quantizer`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable

from torch import nn

from sparsekern.checkpoint import FORMAT_VERSION
from sparsekern.hf import METHOD


def is_pretrained(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (never imports transformers)."""
    tf = sys.modules.get("transformers.modeling_utils")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def hf_files(model: nn.Module, layers: dict, tokenizer=None) -> dict[str, Callable[[str], None]]:
    """Writers (file name -> ``write(path)``) for the HF files of ``model``; ``layers``: the
    sparse layer entries of ``sparsekern.json``, recorded again as ``quantization_config``."""
    files: dict[str, bytes] = {}
    if is_pretrained(model):
        files["config.json"] = _config_json(model, layers)
        gen = getattr(model, "generation_config", None)
        if gen is not None and model.can_generate():
            files["generation_config.json"] = gen.to_json_string(use_diff=True).encode()
    if tokenizer is not None:
        if not callable(getattr(tokenizer, "save_pretrained", None)):
            raise TypeError(
                f"tokenizer: expected a transformers tokenizer or processor, got {type(tokenizer).__name__}"
            )
        files.update(_tokenizer_files(tokenizer))
    return {name: _writer(data) for name, data in files.items()}


def _config_json(model, layers: dict) -> bytes:
    config = json.loads(model.config.to_json_string(use_diff=True))
    config.pop("quantization_config", None)  # a model loaded from a sparsekern folder carries the old one
    config["architectures"] = [type(model).__name__]
    floats = [p for p in model.parameters() if p.is_floating_point()]
    if floats:
        config["dtype"] = str(floats[0].dtype).removeprefix("torch.")
    if layers:
        config["quantization_config"] = {"quant_method": METHOD, "format_version": FORMAT_VERSION, "layers": layers}
    return json.dumps(config, indent=2, sort_keys=True).encode() + b"\n"


def _tokenizer_files(tokenizer) -> dict[str, bytes]:
    # The tokenizer picks its own file names; read them back (they are small) so the folder
    # itself is still written in one atomic step.
    with tempfile.TemporaryDirectory(prefix="sparsekern-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        out = {}
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, name)
            if os.path.isfile(path) and not os.path.islink(path) and name != "config.json":
                with open(path, "rb") as f:
                    out[name] = f.read()
        return out


def _writer(data: bytes) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "wb") as f:
            f.write(data)

    return write
