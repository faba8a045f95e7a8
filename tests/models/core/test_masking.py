import pytest
import torch

from perceiver_fast.models.core.masking import padding_bounds, rows_without_keys
from tests.oracle import attention_oracle


def test_left_right_and_both_sided_padding():
    pad = torch.tensor(
        [
            [False, False, False, False, False],
            [True, True, False, False, False],
            [False, False, False, True, True],
            [True, False, False, True, True],
            [True, True, True, True, True],
        ]
    )
    kv_start, kv_len = padding_bounds(pad)
    assert kv_start.tolist() == [0, 2, 0, 1, 0] and kv_len.tolist() == [5, 5, 3, 3, 0]
    assert kv_start.dtype == kv_len.dtype == torch.int32


def test_left_only_rejects_trailing_pads_and_holes():
    with pytest.raises(ValueError, match="at the start of each row"):
        padding_bounds(torch.tensor([[False, True]]), left_only=True)
    with pytest.raises(ValueError, match="start and/or end"):
        padding_bounds(torch.tensor([[False, True, False]]))
    with pytest.raises(ValueError, match="bool"):
        padding_bounds(torch.zeros(2, 3))


@pytest.mark.parametrize("causal", [True, False])
def test_rows_without_keys_agrees_with_the_oracle(causal):
    kv_start = torch.tensor([0, 3, 6, 2], dtype=torch.int32)
    kv_len = torch.tensor([6, 6, 6, 2], dtype=torch.int32)
    q, k = torch.randn(4, 4, 1, 8), torch.randn(4, 6, 1, 8)
    _, lse = attention_oracle(q, k, k, causal=causal, kv_start=kv_start, kv_len=kv_len)
    expected = torch.isneginf(lse[:, 0])
    assert torch.equal(rows_without_keys(4, 6, kv_start, kv_len, causal=causal), expected)
