"""KV blocks: ref counts, an LRU free queue, and the prefix-cache map from block hash to block.

A block holds `block_size` tokens of K/V for every layer. A full block is keyed by the chained
xxhash64 of (parent block hash, its token ids), so equal hashes mean equal prefixes. Freed blocks
keep their hash and stay findable until the allocator reuses them, oldest-freed first:

    free queue:  head [b7 b3 b9 ... b2] tail      allocate() pops the head,
                  evicted first     freed last     free() appends at the tail

The free queue is a doubly linked list threaded through the blocks (`FreeQueue`): popping the
head, appending and taking a cache hit out of the middle are O(1) every time. An OrderedDict
did the same on average, but under allocate/free churn it rebuilt its table of ~70k blocks every
~17k frees: one free() then took ~2.5 ms, which at small batches left the GPU idle for a step
(RESULTS.md, eighteenth sitting). The prefix-cache map stays a dict, which its lookups need: it
resizes too (while it grows, then under eviction churn), ~1-2 ms at ~50k cached blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import xxhash


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """xxhash64 over the parent hash (8 bytes, little endian) and the int64 token ids."""
    return _chained(parent_hash, np.asarray(token_ids, dtype=np.int64).tobytes())


def hash_blocks(parent_hash: int | None, token_ids: Sequence[int], block_size: int) -> list[int]:
    """hash_block_tokens chained over each full block of token_ids, from one int64 conversion of
    them all (a prefill chunk of 16k tokens hashes ~1,000 blocks: per block, the conversion cost
    more than the hash)."""
    data = np.asarray(token_ids, dtype=np.int64).tobytes()
    step = 8 * block_size
    hashes = []
    for start in range(0, len(data) - step + 1, step):
        parent_hash = _chained(parent_hash, data[start : start + step])
        hashes.append(parent_hash)
    return hashes


def _chained(parent_hash: int | None, tokens: bytes) -> int:
    head = b"" if parent_hash is None else parent_hash.to_bytes(8, "little")
    return xxhash.xxh64_intdigest(head + tokens)


@dataclass(eq=False, slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # set once the block is full and cached
    token_ids: tuple[int, ...] = field(default=())  # the tokens behind the hash, to verify hits
    parent_hash: int | None = None  # the previous block's hash: a hit verifies the whole chain
    # Neighbours in the free queue while the block is in it (ref_cnt 0)
    prev_free: KVBlock | None = field(default=None, repr=False)
    next_free: KVBlock | None = field(default=None, repr=False)


class FreeQueue:
    """Free blocks, least recently freed first, linked through their prev_free / next_free
    between two sentinels."""

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head, self._tail = KVBlock(-1), KVBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVBlock]:
        block = self._head.next_free
        while block is not self._tail:
            assert block is not None
            yield block
            block = block.next_free

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        block.prev_free, block.next_free = last, self._tail
        last.next_free = self._tail.prev_free = block
        self._len += 1

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is self._tail or block is None:
            raise IndexError("pop from an empty free queue")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"block {block.block_id} is not free"
        prev.next_free, nxt.prev_free = nxt, prev
        block.prev_free = block.next_free = None
        self._len -= 1


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free = FreeQueue(self.blocks)
        self._cached: dict[int, KVBlock] = {}  # block hash -> block

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(
        self, block_hash: int, token_ids: Sequence[int], parent_hash: int | None = None
    ) -> KVBlock | None:
        """The cached block with this hash, these exact tokens and this parent, or None."""
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block if block.parent_hash == parent_hash else None

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cache hits, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self._free.remove(block)
            block.ref_cnt += 1

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self._free):
            raise RuntimeError(f"cannot allocate {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block = self._free.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; blocks reaching zero join the free queue tail.

        Callers pass a request's blocks tail first, so its last (least shared) blocks are
        evicted before its prefix.
        """
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of block {block.block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free.append(block)

    def cache(
        self,
        block: KVBlock,
        block_hash: int,
        token_ids: Sequence[int],
        parent_hash: int | None = None,
    ) -> None:
        """Register a full block under its hash (first writer wins on duplicates)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        block.parent_hash = parent_hash
        self._cached.setdefault(block_hash, block)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible when no block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            self._evict(block)
        return True

    def uncache(self, block: KVBlock) -> None:
        self._evict(block)

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
            block.block_hash = None
            block.token_ids = ()
            block.parent_hash = None
