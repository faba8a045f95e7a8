"""Keys and values written into a cache in one copy where both sides are one tensor split along the heads."""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code
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


def _loop_bounds(code: str) -> set[int]:
    """The trip counts of the loops in inductor's C++ code for the CPU."""
    return {int(n) for n in re.findall(r"x\d+<static_cast<int64_t>\((\d+)L\)", code)}


def test_a_compiled_decoding_step_writes_its_cache_in_place():
    """Under torch.compile the step writes its row with index_put_, which inductor does in place; an index_copy_
    into the cache's (transposed, joined) view became a copy of the whole cache per write. The attention reads the
    cache where it is too (the reference is one opaque op on the CPU, see test_api). The capacity, 1009 rows, is a
    trip count no loop may have."""
    torch.manual_seed(0)
    capacity = 1009
    compiled_cache, eager_cache = (KVCache(1, capacity, 2, 8, 8, dtype=torch.float32, device="cpu") for _ in range(2))
    for cache in (compiled_cache, eager_cache):
        cache.k.copy_(torch.arange(cache.k.numel(), dtype=torch.float32).view_as(cache.k) / cache.k.numel())
        cache.v.copy_(-cache.k)
    kv_len = torch.tensor([700], dtype=torch.int32)
    position = torch.tensor([699])

    def step(cache, q, k, v):
        return decode_attention(q, k, v, cache.k, cache.v, position, kv_len=kv_len)

    q, k, v = _projected(batch=1)
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    with torch.no_grad():
        out, (code,) = run_and_get_code(compiled, compiled_cache, q, k, v)
        expected = step(eager_cache, q, k, v)
    torch.testing.assert_close(out, expected)
    assert torch.equal(compiled_cache.k, eager_cache.k) and torch.equal(compiled_cache.v, eager_cache.v)
    assert capacity not in _loop_bounds(code), "a loop over the whole cache (copied, or masked where it is narrowed)"


def test_rows_written_apart_under_compile_land_where_eager_writes_put_them():
    """The compiled form of KVCache.write (index_put_) and the eager one (index_copy_), rows per position."""
    torch.manual_seed(0)
    caches = [KVCache(2, 7, 2, 8, 4, dtype=torch.float32, device="cpu") for _ in range(2)]  # k, v apart
    for cache in caches:
        cache.k.zero_(), cache.v.zero_()
    k, v = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 4)
    position = torch.tensor([4])
    torch.compile(lambda: caches[0].write(position, k, v), fullgraph=True)()
    caches[1].write(position, k, v)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    assert caches[1].k[:, 4:7].equal(k) and caches[1].k[:, :4].abs().sum() == 0
