"""keep_idx value checks without a host sync (ops.keep_idx_on_device), the form GPU calls take.

On CPU tensors the public ops raise ValueError for bad positions (test_ops); on other devices
reading the values would sync the host every call, so positions are clamped on the device and
the (batch, head) rows that held a bad one come out NaN. The logic runs on any device: tested
here on CPU tensors.
"""

import torch

from sparsekern import ops, reference


def test_bad_rows_flagged_and_clamped():
    keep = torch.tensor([[[0, 3, 1], [2, 2, 1], [4, 0, 1], [-1, 0, 2]]])  # ok, repeated, >= sk, < 0
    safe, bad = ops.keep_idx_on_device(keep, 4)
    assert bad.tolist() == [[False, True, True, True]]
    assert safe.min() >= 0 and safe.max() <= 3
    assert torch.equal(safe[0, 0], keep[0, 0])


def test_bad_rows_come_out_nan_and_good_rows_exact():
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    keep = torch.tensor([[[0, 3, 1], [2, 2, 1], [9, 0, 1], [5, 6, 7]]])
    safe, bad = ops.keep_idx_on_device(keep, 8)
    out, scores = (ops._nan_rows(t, bad) for t in reference.pruned_attention_with_scores(q, k, v, safe))
    assert out[0, 1:3].isnan().all() and scores[0, 1:3].isnan().all()
    good = [0, 3]
    want = reference.pruned_attention(q[:, good], k[:, good], v[:, good], keep[:, good])
    torch.testing.assert_close(out[:, good], want, rtol=0, atol=0)


def test_no_value_read_off_cpu():
    """check_keep_idx_values reads nothing off the CPU: a meta tensor has no values to read."""
    ops.check_keep_idx_values(torch.empty(1, 2, 3, dtype=torch.int64, device="meta"), 4)
