"""vLLM plugin: ``vllm serve DIR`` runs the folders :func:`sparsekern.save` writes.

vLLM 0.2x removed its own 2:4 support (the compressed-tensors Sparse24 integration and the 2:4
Marlin kernels). This plugin brings pruned checkpoints back without a fork: the entry point

    [project.entry-points."vllm.general_plugins"]
    sparsekern = "sparsekern.vllm:register"

registers a ``sparsekern`` quantization method in every vLLM process (front end, engine core,
workers). ``config.json``'s ``quantization_config.quant_method == "sparsekern"`` selects it
(``--quantization sparsekern`` names it explicitly). Pruned linear layers load their compressed
tensors through vLLM's tensor-parallel weight loaders and run on ``torch.ops.sparsekern.*``, as
does an int8 LM head (``sparsify(head="int8")``); every other layer stays on vLLM's own kernels.
See :mod:`sparsekern.vllm.config`, :mod:`sparsekern.vllm.linear` and :mod:`sparsekern.vllm.head`.
"""

from __future__ import annotations

import logging

METHOD = "sparsekern"
_log = logging.getLogger("sparsekern")


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the quantization method (idempotent).

    vLLM calls this in each of its processes before building a model. A vLLM release whose
    quantization API changed must not stop vLLM from serving other models, so a failure is
    logged, not raised.
    """
    try:
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

        from sparsekern.vllm.config import SparsekernConfig

        if METHOD not in QUANTIZATION_METHODS:
            register_quantization_config(METHOD)(SparsekernConfig)
    except Exception as exc:  # noqa: BLE001
        _log.warning("sparsekern: could not register with vLLM (%s: %s)", type(exc).__name__, exc)
