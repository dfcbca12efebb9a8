"""sparsekern attention inside HF models: encoder token pruning and KV-cache eviction.

- :func:`prune_tokens` (``token_pruning.py``): BERT-family / ViT-family (ViT, DeiT, ViT-MSN,
  DINOv2) encoders run later layers on the top fraction of tokens, scored by the pruning layer's
  own attention.
- :class:`H2OCache` (``kv_cache.py``): heavy-hitter + recent-window KV-cache eviction for
  decoder models during ``model.generate``.
"""

from sparsekern.nn.kv_cache import H2OCache, H2OLayer, disable_kv_eviction, enable_kv_eviction
from sparsekern.nn.token_pruning import TokenPruningHandle, mean_pool, prune_tokens

__all__ = [
    "H2OCache",
    "H2OLayer",
    "TokenPruningHandle",
    "disable_kv_eviction",
    "enable_kv_eviction",
    "mean_pool",
    "prune_tokens",
]
