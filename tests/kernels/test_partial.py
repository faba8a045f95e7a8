"""Attention over disjoint key sets merged from each set's output and log-sum-exp."""

import torch

from perceiver_fast.kernels import attention
from perceiver_fast.kernels.partial import merge_partial_attention
from tests.oracle import max_rel_error


def test_merge_partial_attention_equals_attention_over_the_union():
    """Rows that see keys in both sets, in one only (row 1), and in neither (row 2: zeros, lse -inf, no NaN)."""
    q, k, v = torch.randn(3, 5, 3, 8), torch.randn(3, 9, 3, 8), torch.randn(3, 9, 3, 6)
    kv_start = torch.tensor([0, 6, 9], dtype=torch.int32)
    whole, whole_lse = attention(q, k, v, kv_start=kv_start, return_lse=True)
    first = attention(q, k[:, :4], v[:, :4], kv_start=kv_start.clamp(max=4), return_lse=True)
    second = attention(q, k[:, 4:], v[:, 4:], kv_start=(kv_start - 4).clamp(min=0), return_lse=True)
    merged, merged_lse = merge_partial_attention(*first, *second)
    assert max_rel_error(merged, whole) < 1e-6
    torch.testing.assert_close(merged_lse, whole_lse)
    assert torch.equal(merged[2], torch.zeros_like(merged[2])) and bool((merged_lse[2] == float("-inf")).all())
