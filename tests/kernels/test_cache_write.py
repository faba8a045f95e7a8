"""Keys and values written into a cache in one copy where both sides are one tensor split along the heads."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from perceiver_fast.kernels.cache_write import cache_pairs, heads_joined
from perceiver_fast.kernels.decode import decode_attention
from perceiver_fast.models.core.kv_cache import KVCache


def _projected(batch=2, rows=1, heads=2, dim=8):
    """Queries, keys and values as one GEMM gives them: ``[B, N, 3 * H * D]`` split along the last dim."""
    qkv = torch.randn(batch, rows, 3 * heads * dim)
    width = heads * dim
    return tuple(qkv[..., i * width : (i + 1) * width].unflatten(-1, (heads, dim)) for i in range(3))


def test_adjacent_heads_are_joined_and_others_are_not():
    q, k, v = _projected()
    joined = heads_joined(k, v)
    assert joined is not None and torch.equal(joined, torch.cat((k, v), dim=2))
    assert joined.data_ptr() == k.data_ptr()  # a view: writing from it reads the GEMM's output in place
    assert heads_joined(v, k) is None  # the values' heads come after the keys', not before
    assert heads_joined(q, v) is None  # not adjacent
    assert heads_joined(k, v.clone()) is None  # another tensor
    assert heads_joined(k, torch.cat((k, v), dim=2)[:, :, 2:].contiguous()) is None
    with FakeTensorMode():
        fake = torch.empty(2, 1, 6, 8)
        assert heads_joined(fake[:, :, :2], fake[:, :, 2:4]) is None  # traced: never joined


def test_a_cache_of_one_buffer_takes_both_rows_in_one_copy_and_keeps_them_apart():
    cache = KVCache(2, 5, 2, 8, 8, dtype=torch.float32, device="cpu")
    _, k, v = _projected()
    pairs = cache_pairs(cache.k, cache.v, k, v)
    assert len(pairs) == 1
    cache.k.fill_(7.0)
    cache.v.fill_(7.0)
    cache.write(torch.tensor([3]), k, v)
    assert torch.equal(cache.k[:, 3:4], k) and torch.equal(cache.v[:, 3:4], v)
    untouched = torch.ones(5, dtype=torch.bool)
    untouched[3] = False
    assert bool((cache.k[:, untouched] == 7.0).all()) and bool((cache.v[:, untouched] == 7.0).all())
    # Rows that are not one tensor (a rotated key) and caches of unequal head dims go apart.
    assert len(cache_pairs(cache.k, cache.v, k.clone(), v)) == 2
    unequal = KVCache(2, 5, 2, 8, 4, dtype=torch.float32, device="cpu")
    assert len(cache_pairs(unequal.k, unequal.v, k, v[..., :4])) == 2


@pytest.mark.parametrize("position", [3, torch.tensor([3]), torch.tensor([1, 4])], ids=["int", "one", "per-row"])
def test_the_decoding_step_writes_joined_rows_like_separate_ones(position):
    torch.manual_seed(0)
    q, k, v = _projected()
    joined, apart = (KVCache(2, 5, 2, 8, 8, dtype=torch.float32, device="cpu") for _ in range(2))
    for cache in (joined, apart):
        cache.k.copy_(torch.arange(2 * 5 * 2 * 8, dtype=torch.float32).view(2, 5, 2, 8))
        cache.v.copy_(-cache.k)
    apart_k, apart_v = apart.k.contiguous(), apart.v.contiguous()  # other buffers: written apart
    kv_len = torch.full((2,), 5, dtype=torch.int32)
    with torch.no_grad():
        out_joined = decode_attention(q, k, v, joined.k, joined.v, position, kv_len=kv_len)
        out_apart = decode_attention(q, k.clone(), v.clone(), apart_k, apart_v, position, kv_len=kv_len)
    assert torch.equal(joined.k, apart_k) and torch.equal(joined.v, apart_v)
    torch.testing.assert_close(out_joined, out_apart, rtol=0, atol=0)
