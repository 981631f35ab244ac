"""KVCacheManager: per-request block lists, prefix-cache hits and slot allocation."""

from __future__ import annotations

from typing import Any

import pytest

from atom.engine.block_pool import hash_block_tokens
from atom.engine.kv_cache_manager import KVCacheManager, cdiv
from atom.engine.request import Request
from atom.sampling_params import SamplingParams

BS = 4  # tokens per block; the manager itself does not insist on multiples of 16


def make_request(request_id: str, prompt: list[int], **params: Any) -> Request:
    return Request(request_id, list(prompt), SamplingParams(**params))


def admit(kv: KVCacheManager, req: Request, num_new: int | None = None) -> list[int] | None:
    """What the scheduler does for a waiting request: look up hits, then allocate."""
    hits = kv.get_computed_blocks(req)
    num_computed = len(hits) * BS
    if num_new is None:
        num_new = req.num_tokens - num_computed
    ids = kv.allocate_slots(req, num_new, hits)
    if ids is not None:
        req.num_computed_tokens = num_computed + num_new
    return ids


def ref_counts(kv: KVCacheManager) -> list[int]:
    return [b.ref_cnt for b in kv.pool.blocks]


def drain_ids(kv: KVCacheManager) -> list[int]:
    """Allocate every free block (free-queue order, head first)."""
    return [b.block_id for b in kv.pool.allocate(kv.pool.num_free_blocks)]


def test_cdiv() -> None:
    assert [cdiv(n, 4) for n in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]


def test_allocate_slots_on_a_fresh_pool() -> None:
    kv = KVCacheManager(8, BS)
    req = make_request("a", list(range(10)))
    assert kv.get_computed_blocks(req) == []
    assert kv.allocate_slots(req, 10) == [0, 1, 2]
    assert kv.block_ids("a") == [0, 1, 2]
    assert ref_counts(kv) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert kv.pool.num_free_blocks == 5
    assert kv.usage == 3 / 8

    # Only the two full blocks are cached, under the chained hash.
    h0 = hash_block_tokens(None, [0, 1, 2, 3])
    h1 = hash_block_tokens(h0, [4, 5, 6, 7])
    assert req.block_hashes == [h0, h1]
    assert [b.block_hash for b in kv.pool.blocks[:3]] == [h0, h1, None]
    assert kv.pool.lookup(h1, [4, 5, 6, 7], parent_hash=h0) is kv.pool.blocks[1]
    assert kv.pool.lookup(h1, [4, 5, 6, 7]) is None  # same tokens, other parent: no hit


def test_decode_fills_the_last_block_then_adds_one() -> None:
    kv = KVCacheManager(8, BS)
    req = make_request("a", list(range(10)))
    assert kv.allocate_slots(req, 10) == [0, 1, 2]
    req.num_computed_tokens = 10
    expected_new = {100: [], 101: [], 102: [3], 103: [], 104: []}
    for token, new_ids in expected_new.items():
        req.append_output(token)
        assert kv.allocate_slots(req, 1) == new_ids
        req.num_computed_tokens += 1
    assert kv.block_ids("a") == [0, 1, 2, 3]

    # Block 2 became full with prompt and output tokens and is cached as such.
    h2 = hash_block_tokens(req.block_hashes[1], [8, 9, 100, 101])
    assert kv.pool.blocks[2].block_hash == h2
    assert kv.pool.blocks[2].token_ids == (8, 9, 100, 101)
    h3 = hash_block_tokens(h2, [102, 103, 104])
    assert kv.pool.blocks[3].block_hash is None  # 3 of 4 tokens: not full
    assert kv.pool.lookup(h3, [102, 103, 104]) is None


def test_chunked_allocation_caches_blocks_as_they_fill() -> None:
    kv = KVCacheManager(8, BS)
    req = make_request("a", list(range(10)))
    assert kv.allocate_slots(req, 5) == [0, 1]
    assert [b.block_hash is not None for b in kv.pool.blocks[:2]] == [True, False]
    req.num_computed_tokens = 5
    assert kv.allocate_slots(req, 5) == [2]
    assert [b.block_hash is not None for b in kv.pool.blocks[:3]] == [True, True, False]
    assert kv.block_ids("a") == [0, 1, 2]


def test_prefix_hit_returns_the_earlier_requests_blocks() -> None:
    kv = KVCacheManager(8, BS)
    a = make_request("a", list(range(10)))
    assert admit(kv, a) == [0, 1, 2]

    b = make_request("b", [*range(8), 50, 51])
    hits = kv.get_computed_blocks(b)
    assert hits == kv.pool.blocks[:2]
    assert kv.allocate_slots(b, 2, hits) == [0, 1, 3]
    assert kv.block_ids("b") == [0, 1, 3]
    assert kv.block_ids("a") == [0, 1, 2]
    assert ref_counts(kv) == [2, 2, 1, 1, 0, 0, 0, 0]
    assert kv.pool.num_free_blocks == 4


def test_prefix_hit_is_chained() -> None:
    kv = KVCacheManager(8, BS)
    admit(kv, make_request("a", list(range(10))))
    # Same second block, different first block: the chained hash misses both.
    c = make_request("c", [99, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert kv.get_computed_blocks(c) == []
    # Same first block, different second block: only the first hits.
    d = make_request("d", [0, 1, 2, 3, 4, 5, 6, 99, 8, 9])
    assert kv.get_computed_blocks(d) == kv.pool.blocks[:1]


@pytest.mark.parametrize(
    ("num_tokens", "num_hits"),
    [(1, 0), (4, 0), (5, 1), (8, 1), (9, 2), (12, 2), (13, 3), (16, 3), (40, 3)],
)
def test_hits_leave_at_least_one_token_to_compute(num_tokens: int, num_hits: int) -> None:
    kv = KVCacheManager(16, BS)
    admit(kv, make_request("a", list(range(12))))  # 3 full cached blocks
    b = make_request("b", list(range(num_tokens)))
    hits = kv.get_computed_blocks(b)
    assert len(hits) == num_hits == min((num_tokens - 1) // BS, 3)
    assert hits == kv.pool.blocks[:num_hits]


def test_hits_span_prompt_and_output_tokens() -> None:
    kv = KVCacheManager(8, BS)
    a = make_request("a", list(range(6)))
    admit(kv, a)
    for token in (100, 101, 102):
        a.append_output(token)
        kv.allocate_slots(a, 1)
        a.num_computed_tokens += 1
    # a: [0..5, 100, 101, 102] -> blocks 0 [0..3] and 1 [4, 5, 100, 101] are full.
    b = make_request("b", [0, 1, 2, 3, 4, 5, 100, 101, 7])  # a follow-up turn
    assert kv.get_computed_blocks(b) == kv.pool.blocks[:2]


def test_allocation_failure_returns_none_and_changes_nothing() -> None:
    kv = KVCacheManager(4, BS)
    a = make_request("a", list(range(10)))
    assert admit(kv, a) == [0, 1, 2]
    counters = (kv.prefix_query_tokens, kv.prefix_hit_tokens)

    b = make_request("b", list(range(100, 108)))
    assert kv.allocate_slots(b, 8) is None
    assert "b" not in kv.req_blocks
    assert kv.block_ids("b") == []
    assert ref_counts(kv) == [1, 1, 1, 0]
    assert kv.pool.num_free_blocks == 1
    assert (kv.prefix_query_tokens, kv.prefix_hit_tokens) == counters

    # A running request that cannot grow keeps what it had.
    for token in (100, 101, 102):
        a.append_output(token)
    assert kv.allocate_slots(b, 4) == [3]
    assert kv.allocate_slots(a, 3) is None
    assert kv.block_ids("a") == [0, 1, 2]
    assert kv.block_ids("b") == [3]
    assert ref_counts(kv) == [1, 1, 1, 1]


def test_free_hits_cannot_also_be_allocated() -> None:
    kv = KVCacheManager(3, BS)
    a = make_request("a", list(range(8)))
    assert admit(kv, a) == [0, 1]
    kv.free(a)  # free queue: [2, 1, 0], blocks 0 and 1 still cached

    # 16 tokens: hits blocks 0 and 1 (both free), needs 2 more; only block 2 is truly free.
    b = make_request("b", list(range(16)))
    hits = kv.get_computed_blocks(b)
    assert hits == kv.pool.blocks[:2]
    assert kv.allocate_slots(b, 8, hits) is None
    assert ref_counts(kv) == [0, 0, 0]
    assert kv.pool.num_free_blocks == 3
    assert "b" not in kv.req_blocks
    assert kv.get_computed_blocks(b) == hits  # still cached

    c = make_request("c", list(range(12)))
    assert admit(kv, c) == [0, 1, 2]
    assert ref_counts(kv) == [1, 1, 1]
    assert kv.pool.num_free_blocks == 0


def test_free_releases_blocks_tail_first() -> None:
    kv = KVCacheManager(6, BS)
    a = make_request("a", list(range(10)))
    admit(kv, a)
    kv.free(a)
    assert "a" not in kv.req_blocks
    assert ref_counts(kv) == [0] * 6
    assert drain_ids(kv) == [3, 4, 5, 2, 1, 0]


def test_freed_cached_block_is_revived_by_a_hit() -> None:
    kv = KVCacheManager(8, BS)
    a = make_request("a", list(range(10)))
    assert admit(kv, a) == [0, 1, 2]
    kv.free(a)
    assert kv.pool.num_free_blocks == 8  # free queue: [3, 4, 5, 6, 7, 2, 1, 0]

    b = make_request("b", list(range(10)))
    hits = kv.get_computed_blocks(b)
    assert hits == kv.pool.blocks[:2]
    assert kv.allocate_slots(b, 2, hits) == [0, 1, 3]
    assert ref_counts(kv) == [1, 1, 0, 1, 0, 0, 0, 0]
    assert kv.pool.num_free_blocks == 5
    # Blocks 0 and 1 left the free queue; the rest keep their order.
    assert drain_ids(kv) == [4, 5, 6, 7, 2]


def test_freeing_one_sharer_keeps_the_shared_blocks() -> None:
    kv = KVCacheManager(8, BS)
    a = make_request("a", list(range(10)))
    b = make_request("b", list(range(10)))
    admit(kv, a)
    assert admit(kv, b) == [0, 1, 3]
    kv.free(a)
    assert ref_counts(kv) == [1, 1, 0, 1, 0, 0, 0, 0]
    assert kv.pool.num_free_blocks == 5
    kv.free(b)
    assert ref_counts(kv) == [0] * 8
    assert kv.pool.num_free_blocks == 8
    assert kv.req_blocks == {}


def test_prompt_logprobs_requests_skip_the_cache() -> None:
    kv = KVCacheManager(8, BS)
    admit(kv, make_request("a", list(range(10))))
    b = make_request("b", list(range(10)), prompt_logprobs=0)
    assert kv.get_computed_blocks(b) == []
    assert admit(kv, b) == [3, 4, 5]
    assert ref_counts(kv) == [1, 1, 1, 1, 1, 1, 0, 0]
    # a request that cannot use the cache is not a cache query: only "a" counts
    assert (kv.prefix_query_tokens, kv.prefix_hit_tokens) == (10, 0)


def test_hit_rate_counters() -> None:
    kv = KVCacheManager(8, BS)
    a = make_request("a", list(range(10)))
    admit(kv, a)
    assert (kv.prefix_query_tokens, kv.prefix_hit_tokens) == (10, 0)
    admit(kv, make_request("b", [*range(8), 50, 51]))
    assert (kv.prefix_query_tokens, kv.prefix_hit_tokens) == (20, 8)

    # Later allocations of a running request are no new queries.
    a.append_output(100)
    kv.allocate_slots(a, 1)
    assert (kv.prefix_query_tokens, kv.prefix_hit_tokens) == (20, 8)

    # A chunked admission counts the whole request once.
    c = make_request("c", list(range(12)))
    assert admit(kv, c, num_new=2) == [0, 1, 4]
    assert (kv.prefix_query_tokens, kv.prefix_hit_tokens) == (32, 16)


def test_no_caching_means_no_hits_no_hashes_no_counters() -> None:
    kv = KVCacheManager(8, BS, enable_caching=False)
    a = make_request("a", list(range(10)))
    b = make_request("b", list(range(10)))
    assert admit(kv, a) == [0, 1, 2]
    assert kv.get_computed_blocks(b) == []
    assert admit(kv, b) == [3, 4, 5]
    assert all(blk.block_hash is None for blk in kv.pool.blocks)
    assert a.block_hashes == []
    assert (kv.prefix_query_tokens, kv.prefix_hit_tokens) == (0, 0)


def test_reset_prefix_cache() -> None:
    kv = KVCacheManager(8, BS)
    a = make_request("a", list(range(10)))
    admit(kv, a)
    kv.free(a)
    admit(kv, c := make_request("c", list(range(10))))  # a prefix hit: counters move
    assert kv.prefix_hit_tokens > 0
    assert kv.reset_prefix_cache() is False  # c holds blocks: nothing reset
    assert kv.prefix_hit_tokens > 0
    kv.free(c)
    assert kv.reset_prefix_cache() is True
    assert (kv.prefix_query_tokens, kv.prefix_hit_tokens) == (0, 0)
    assert kv.get_computed_blocks(make_request("b", list(range(10)))) == []
