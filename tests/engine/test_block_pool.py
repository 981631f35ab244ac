"""BlockPool: chained block hashes, ref counts, the LRU free queue and the prefix-cache map."""

from __future__ import annotations

import random
import struct

import pytest
import xxhash

from atom.engine.block_pool import (
    BlockPool,
    FreeQueue,
    KVBlock,
    hash_block_tokens,
    hash_blocks,
)

TOKENS = [11, 12, 13, 14]


def drain(pool: BlockPool) -> list[int]:
    """Allocate every free block and return their ids: the free queue, head first."""
    return [b.block_id for b in pool.allocate(pool.num_free_blocks)]


# ---- hashing ----
def test_hash_is_xxh64_of_parent_and_int64_tokens() -> None:
    root = hash_block_tokens(None, TOKENS)
    assert root == xxhash.xxh64(struct.pack("<4q", *TOKENS)).intdigest()
    child = hash_block_tokens(root, [1, 2, 3, 4])
    assert child == xxhash.xxh64(struct.pack("<Q4q", root, 1, 2, 3, 4)).intdigest()


def test_hash_is_deterministic() -> None:
    assert hash_block_tokens(None, TOKENS) == hash_block_tokens(None, list(TOKENS))
    assert hash_block_tokens(None, TOKENS) == hash_block_tokens(None, tuple(TOKENS))
    parent = hash_block_tokens(None, [1, 2, 3, 4])
    assert hash_block_tokens(parent, TOKENS) == hash_block_tokens(parent, TOKENS)


@pytest.mark.parametrize("parent", [None, 0, 2**64 - 1])
def test_hash_blocks_chains_hash_block_tokens(parent: int | None) -> None:
    """Every full block of a run, chained from parent; a partial last block is not hashed."""
    tokens = [(37 * i) % 151_936 for i in range(4 * 16 + 5)]
    expected, h = [], parent
    for i in range(4):
        h = hash_block_tokens(h, tokens[16 * i : 16 * (i + 1)])
        expected.append(h)
    assert hash_blocks(parent, tokens, 16) == expected
    assert hash_blocks(parent, tokens[:15], 16) == []


def test_hash_chains_on_the_parent() -> None:
    parent_a = hash_block_tokens(None, [1, 2, 3, 4])
    parent_b = hash_block_tokens(None, [1, 2, 3, 5])
    hashes = {
        hash_block_tokens(None, TOKENS),
        hash_block_tokens(0, TOKENS),  # a zero parent is still a parent
        hash_block_tokens(parent_a, TOKENS),
        hash_block_tokens(parent_b, TOKENS),
    }
    assert len(hashes) == 4


def test_hash_depends_on_token_order_and_values() -> None:
    hashes = {
        hash_block_tokens(None, [1, 2, 3, 4]),
        hash_block_tokens(None, [4, 3, 2, 1]),
        hash_block_tokens(None, [1, 2, 3]),
        hash_block_tokens(None, [1, 2, 3, 4 + 2**32]),
    }
    assert len(hashes) == 4


# ---- ref counts ----
def test_new_pool_is_all_free() -> None:
    pool = BlockPool(4)
    assert pool.num_free_blocks == 4
    assert pool.usage == 0.0
    assert [(b.block_id, b.ref_cnt, b.block_hash) for b in pool.blocks] == [
        (0, 0, None),
        (1, 0, None),
        (2, 0, None),
        (3, 0, None),
    ]


@pytest.mark.parametrize("num_blocks", [0, -1])
def test_pool_needs_a_block(num_blocks: int) -> None:
    with pytest.raises(ValueError, match=f"got {num_blocks}"):
        BlockPool(num_blocks)


def test_allocate_touch_free_ref_counts() -> None:
    pool = BlockPool(4)
    b0, b1 = pool.allocate(2)
    assert (b0.block_id, b1.block_id) == (0, 1)
    assert (b0.ref_cnt, b1.ref_cnt) == (1, 1)
    assert pool.num_free_blocks == 2
    assert pool.usage == 0.5

    pool.touch([b0])
    assert b0.ref_cnt == 2
    assert pool.num_free_blocks == 2  # already in use: touching takes no free block

    pool.free([b0])
    assert b0.ref_cnt == 1
    assert pool.num_free_blocks == 2  # still referenced: not free

    pool.free([b0, b1])
    assert (b0.ref_cnt, b1.ref_cnt) == (0, 0)
    assert pool.num_free_blocks == 4


def test_allocate_more_than_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(RuntimeError, match="cannot allocate 2 blocks, 1 free"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    assert [b.ref_cnt for b in pool.blocks] == [1, 1, 0]


def test_allocate_zero_blocks() -> None:
    pool = BlockPool(2)
    assert pool.allocate(0) == []
    assert pool.num_free_blocks == 2


def test_double_free_is_an_invariant_error() -> None:
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(AssertionError, match="double free of block 0"):
        pool.free([block])


def test_touch_revives_a_free_block() -> None:
    pool = BlockPool(4)
    pool.touch([pool.blocks[2]])
    assert pool.blocks[2].ref_cnt == 1
    assert pool.num_free_blocks == 3
    assert drain(pool) == [0, 1, 3]  # the touched block left the free queue


# ---- LRU order ----
def test_free_appends_at_tail_allocate_pops_head() -> None:
    pool = BlockPool(5)
    blocks = pool.allocate(5)
    assert [b.block_id for b in blocks] == [0, 1, 2, 3, 4]
    pool.free([blocks[3]])
    pool.free([blocks[0]])
    pool.free([blocks[4], blocks[1]])
    assert drain(pool) == [3, 0, 4, 1]


def test_request_blocks_freed_tail_first_are_evicted_tail_first() -> None:
    pool = BlockPool(6)
    req_a = pool.allocate(3)  # 0 1 2
    req_b = pool.allocate(3)  # 3 4 5
    pool.free(reversed(req_a))
    pool.free(reversed(req_b))
    assert drain(pool) == [2, 1, 0, 5, 4, 3]


def test_initial_free_order_is_by_block_id_then_freed_blocks() -> None:
    pool = BlockPool(4)
    first = pool.allocate(2)  # 0 1
    pool.free(reversed(first))
    assert drain(pool) == [2, 3, 1, 0]


# ---- prefix cache ----
def test_cached_block_lookup_needs_hash_and_tokens() -> None:
    pool = BlockPool(4)
    (block,) = pool.allocate(1)
    h = hash_block_tokens(None, TOKENS)
    pool.cache(block, h, TOKENS)
    assert block.block_hash == h
    assert block.token_ids == tuple(TOKENS)
    assert pool.lookup(h, TOKENS) is block
    assert pool.lookup(h, tuple(TOKENS)) is block
    assert pool.lookup(h, [11, 12, 13, 15]) is None
    assert pool.lookup(h, TOKENS[:3]) is None
    assert pool.lookup(hash_block_tokens(None, [1, 2, 3, 4]), TOKENS) is None


def test_lookup_guards_against_hash_collisions() -> None:
    pool = BlockPool(4)
    (block,) = pool.allocate(1)
    other = [7, 7, 7, 7]
    h = hash_block_tokens(None, TOKENS)
    pool.cache(block, h, other)  # as if `other` collided with TOKENS
    assert pool.lookup(h, TOKENS) is None
    assert pool.lookup(h, other) is block


def test_freed_cached_block_stays_findable_until_reused() -> None:
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    ha = hash_block_tokens(None, [1, 2])
    hb = hash_block_tokens(ha, [3, 4])
    pool.cache(a, ha, [1, 2])
    pool.cache(b, hb, [3, 4])
    pool.free([b, a])
    assert pool.lookup(ha, [1, 2]) is a
    assert pool.lookup(hb, [3, 4]) is b

    # Free queue: [2, b, a]. The never-used block goes first, then b is evicted.
    assert [x.block_id for x in pool.allocate(1)] == [2]
    assert pool.lookup(hb, [3, 4]) is b
    (reused,) = pool.allocate(1)
    assert reused is b
    assert reused.ref_cnt == 1
    assert (reused.block_hash, reused.token_ids) == (None, ())
    assert pool.lookup(hb, [3, 4]) is None
    assert pool.lookup(ha, [1, 2]) is a


def test_evicted_hash_can_be_cached_again() -> None:
    pool = BlockPool(2)
    (old,) = pool.allocate(1)
    h = hash_block_tokens(None, TOKENS)
    pool.cache(old, h, TOKENS)
    pool.free([old])
    pool.allocate(2)  # block 1, then `old`: its hash leaves the map
    assert pool.lookup(h, TOKENS) is None
    new = pool.blocks[1]
    pool.cache(new, h, TOKENS)
    assert pool.lookup(h, TOKENS) is new


def test_first_writer_wins_on_duplicate_hash() -> None:
    pool = BlockPool(3)
    first, second = pool.allocate(2)
    h = hash_block_tokens(None, TOKENS)
    pool.cache(first, h, TOKENS)
    pool.cache(second, h, TOKENS)
    assert pool.lookup(h, TOKENS) is first
    assert second.block_hash == h  # marked full, but not the one in the map

    # Evicting the duplicate leaves the original findable.
    pool.free([second])
    pool.allocate(2)  # block 2, then `second`
    assert second.block_hash is None
    assert pool.lookup(h, TOKENS) is first


def test_cache_keeps_the_first_hash_of_a_block() -> None:
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    h1 = hash_block_tokens(None, TOKENS)
    h2 = hash_block_tokens(None, [1, 2, 3, 4])
    pool.cache(block, h1, TOKENS)
    pool.cache(block, h2, [1, 2, 3, 4])
    assert block.block_hash == h1
    assert pool.lookup(h2, [1, 2, 3, 4]) is None


def test_cache_is_a_no_op_without_caching() -> None:
    pool = BlockPool(2, enable_caching=False)
    (block,) = pool.allocate(1)
    h = hash_block_tokens(None, TOKENS)
    pool.cache(block, h, TOKENS)
    assert block.block_hash is None
    assert pool.lookup(h, TOKENS) is None


def test_reset_prefix_cache_only_when_all_free() -> None:
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    ha, hb = hash_block_tokens(None, [1]), hash_block_tokens(None, [2])
    pool.cache(a, ha, [1])
    pool.cache(b, hb, [2])
    pool.free([a])
    assert pool.reset_prefix_cache() is False
    assert pool.lookup(ha, [1]) is a  # nothing forgotten
    assert pool.lookup(hb, [2]) is b

    pool.free([b])
    assert pool.reset_prefix_cache() is True
    assert pool.lookup(ha, [1]) is None
    assert pool.lookup(hb, [2]) is None
    assert all(blk.block_hash is None and blk.token_ids == () for blk in pool.blocks)
    assert pool.num_free_blocks == 3
    assert drain(pool) == [2, 0, 1]  # the LRU order survives a reset


def test_kv_block_identity() -> None:
    # Blocks compare by identity: two blocks with equal fields are not interchangeable.
    assert KVBlock(0) != KVBlock(0)


# ---- the free queue ----
def test_free_queue_matches_an_ordered_reference() -> None:
    """Random pops, appends and removals from the middle (cache hits), against a list."""
    rng = random.Random(0)
    blocks = [KVBlock(i) for i in range(50)]
    queue = FreeQueue(blocks)
    ref = list(blocks)
    taken: list[KVBlock] = []
    for _ in range(2000):
        op = rng.random()
        if op < 0.35 and ref:
            block = queue.popleft()
            assert block is ref.pop(0)
            taken.append(block)
        elif op < 0.5 and ref:
            block = rng.choice(ref)
            queue.remove(block)
            ref.remove(block)
            taken.append(block)
        elif taken:
            block = taken.pop(rng.randrange(len(taken)))
            queue.append(block)
            ref.append(block)
        assert len(queue) == len(ref)
    assert list(queue) == ref
    assert all(b.prev_free is None and b.next_free is None for b in taken)


def test_free_queue_pop_from_empty_and_remove_of_a_taken_block() -> None:
    queue = FreeQueue([KVBlock(0)])
    block = queue.popleft()
    with pytest.raises(IndexError, match="empty free queue"):
        queue.popleft()
    with pytest.raises(AssertionError, match="block 0 is not free"):
        queue.remove(block)
    queue.append(block)
    assert list(queue) == [block] and len(queue) == 1
