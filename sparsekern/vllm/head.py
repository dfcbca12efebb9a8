"""``SparsekernInt8HeadMethod``: vLLM's LM head (``ParallelLMHead``) with the int8 weight of
``sparsify(..., head="int8")`` (:class:`~sparsekern.nn.quant_linear.QuantLinear`).

At TinyLlama-1.1B shapes the fp32 head is 262 MB of the ~2.3 GB a 2:4 token reads; int8 makes it
66 MB. The layer keeps the checkpoint's tensors, ``values`` (int8 ``[vocab, hidden]``) and
``scales`` (one per vocabulary row), as parameters of the head, so vLLM's model loader feeds
them to the head's own weight loader: under tensor parallelism each rank gets its slice of the
vocabulary, and rows vLLM pads the vocabulary with stay zero. :meth:`apply` (called by vLLM's
``LogitsProcessor``) runs ``torch.ops.sparsekern.quant_linear``, the kernel transformers runs.
"""

from __future__ import annotations

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs

from sparsekern.nn.quant_linear import TENSORS, check_parts
from sparsekern.vllm.linear import expect_tensor, rehome_params


class SparsekernInt8HeadMethod(QuantizeMethodBase):
    """The quant method of one ``ParallelLMHead`` whose checkpoint entry (``entry``, named
    ``prefix``) is a ``QuantLinear``."""

    def __init__(self, prefix: str, entry: dict) -> None:
        self.prefix, self.entry = prefix, entry
        self.act_block = entry["act_block"]
        self._loaded: set[str] = set()

    def _refuse(self, what: str) -> ValueError:
        return ValueError(f"quantization_config.layers[{self.prefix!r}]: {what}")

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        loader = extra_weight_attrs.pop("weight_loader")
        e = self.entry
        vocab = getattr(layer, "org_vocab_size", output_size)
        if (e["out_features"], e["in_features"]) != (vocab, input_size):
            raise self._refuse(
                f"an int8 head of {e['out_features']} x {e['in_features']}, but vLLM's {self.prefix} has a vocabulary "
                f"of {vocab} and {input_size} inputs"
            )
        if e["bias"]:
            raise self._refuse("an int8 head with a bias; vLLM's LM head takes none here")
        rows = sum(output_partition_sizes)
        params = {
            "values": torch.zeros(rows, input_size_per_partition, dtype=torch.int8),
            "scales": torch.ones(rows, dtype=params_dtype),
        }
        for name, data in params.items():
            p = Parameter(data, requires_grad=False)
            set_weight_attrs(p, {"output_dim": 0, "weight_loader": self._checked(loader, name)})
            set_weight_attrs(p, extra_weight_attrs)
            layer.register_parameter(name, p)

    def _checked(self, loader, tensor: str):
        """vLLM's loader (it cuts this rank's vocabulary rows) after checking the whole tensor."""
        e = self.entry

        def load(param, loaded_weight: torch.Tensor) -> None:
            want, dtype = {
                "values": ([e["out_features"], e["in_features"]], torch.int8),
                "scales": ([e["out_features"]], None),
            }[tensor]
            ok = loaded_weight.dtype == dtype if dtype else loaded_weight.is_floating_point()
            expect_tensor(tensor, loaded_weight, want, ok, f"{self.prefix}.{tensor}", dtype)
            if tensor in self._loaded:
                raise ValueError(f"checkpoint tensor {self.prefix}.{tensor} arrived twice")
            self._loaded.add(tensor)
            loader(param, loaded_weight)

        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        missing = [f"{self.prefix}.{t}" for t in TENSORS if t not in self._loaded]
        if missing:
            raise ValueError(f"checkpoint: tensors {missing} are missing ({self.prefix})")
        # The loader zeroed the rows past this rank's share of the vocabulary (vLLM's padding):
        # their values are 0, so any scale gives 0; 1 keeps every scale valid.
        real = getattr(layer, "num_org_embeddings_per_partition", layer.scales.shape[0])
        layer.scales.data[real:] = 1
        rehome_params(layer, TENSORS)
        try:
            check_parts(layer.values.data, layer.scales.data, self.act_block)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint layer {self.prefix}: {exc}") from None

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.sparsekern.quant_linear(x, layer.values, layer.scales, bias, self.act_block)
