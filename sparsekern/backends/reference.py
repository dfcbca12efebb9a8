"""The pure-torch reference: runs every op on every device and dtype."""

from sparsekern import dispatch, reference

for _op in ("nm_linear", "bsr_linear", "token_scores", "pruned_attention", "pruned_attention_with_scores"):
    # The reference linears decompress and run the dense op: NaN/Inf propagate exactly.
    dispatch.register(_op, "reference", getattr(reference, _op), nonfinite_exact=True)
