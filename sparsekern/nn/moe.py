"""Mixture-of-experts weights that are not ``nn.Linear``: found so reports can count them.

transformers 5 stores a MoE layer's experts fused, as 3-D parameters ``[num_experts, out, in]``
on one module (``MixtralExperts.gate_up_proj`` / ``down_proj``, ``Qwen2MoeExperts``, ...), and
the router as a bare 2-D parameter (``MixtralTopKRouter.weight``). They are matrix weights like
a linear layer's -- in Mixtral they hold ~90% of the parameters -- but no sparsekern kernel
takes them, so ``sparsify`` must list them as not pruned and count them in its sparsity.
"""

from __future__ import annotations

from torch import nn

_EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts")


def _num_experts(module: nn.Module) -> int | None:
    for attr in _EXPERT_COUNT_ATTRS:
        n = getattr(module, attr, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def expert_weights(model: nn.Module) -> list[tuple[str, nn.Parameter, str]]:
    """``(name, parameter, reason not pruned)`` for every fused expert stack and router weight.

    A module counts when it is not an ``nn.Linear`` and carries ``num_experts`` (or
    ``num_local_experts``); its 3-D parameters ``[num_experts, out, in]`` are expert stacks,
    its 2-D ``[num_experts, hidden]`` ones routers. Biases are not weights and are left out.
    """
    out = []
    for mod_name, mod in model.named_modules():
        n = _num_experts(mod)
        if n is None or isinstance(mod, nn.Linear):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if pname.endswith("bias") or p.dim() not in (2, 3) or p.shape[0] != n:
                continue
            dims = list(p.shape)
            if p.dim() == 3:
                why = f"fused expert weights {dims}: no sparse kernel for 3-D expert stacks yet"
            else:
                why = f"router weight {dims} of {type(mod).__name__}: not an nn.Linear, no sparse kernel"
            out.append((f"{mod_name}.{pname}" if mod_name else pname, p, why))
    return out
