"""The pure-torch reference: runs every op on every device and dtype."""

from sparsekern import dispatch, reference

for _op in ("nm_linear", "bsr_linear", "token_scores", "pruned_attention", "pruned_attention_with_scores"):
    dispatch.register(_op, "reference", getattr(reference, _op))
