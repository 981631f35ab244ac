"""Which KV blocks each request owns, prefix-cache lookups, and slot allocation for a step."""

from __future__ import annotations

from atom.engine.block_pool import BlockPool, KVBlock, hash_blocks
from atom.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self._num_cached_blocks: dict[str, int] = {}  # leading blocks already in the cache map
        self.prefix_query_tokens = 0  # for the hit-rate metric
        self.prefix_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def get_computed_blocks(self, req: Request) -> list[KVBlock]:
        """The longest cached prefix of a new request, in whole blocks.

        At least one token is left to compute, since its logits give the next token. Requests that
        want prompt logprobs skip the cache: their logprobs need every prompt position computed.
        """
        if not self.enable_caching or req.sampling_params.prompt_logprobs is not None:
            return []
        bs = self.block_size
        max_blocks = (req.num_tokens - 1) // bs
        hashes = self._block_hashes(req, max_blocks * bs)
        hits: list[KVBlock] = []
        for i in range(max_blocks):
            parent = hashes[i - 1] if i else None
            block = self.pool.lookup(hashes[i], req.token_ids_slice(i * bs, (i + 1) * bs), parent)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate_slots(
        self, req: Request, num_new_tokens: int, computed_blocks: list[KVBlock] | None = None
    ) -> list[int] | None:
        """Make room for `num_new_tokens` more tokens of `req` (after any prefix hit).

        Returns the ids of the blocks added to the request, or None (changing nothing) when the
        pool cannot supply them.
        """
        if not computed_blocks:  # a decode step within its last block: nothing to do
            held = self.req_blocks.get(req.request_id)
            num_total = req.num_computed_tokens + num_new_tokens
            if (
                held
                and num_total <= len(held) * self.block_size
                and (
                    not self.enable_caching
                    or min(num_total, req.num_tokens) // self.block_size
                    <= self._num_cached_blocks.get(req.request_id, 0)
                )
            ):
                return []
        computed_blocks = computed_blocks or []
        blocks = self.req_blocks.setdefault(req.request_id, [])
        num_total = req.num_computed_tokens + len(computed_blocks) * self.block_size
        num_total += num_new_tokens
        num_needed = cdiv(num_total, self.block_size) - len(blocks) - len(computed_blocks)
        # Hits on free blocks leave the free queue, so they cannot also be allocated.
        num_free_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_free_hits:
            if not blocks:
                del self.req_blocks[req.request_id]
            return None
        if not blocks and self.enable_caching and req.sampling_params.prompt_logprobs is None:
            self.prefix_query_tokens += req.num_tokens
            self.prefix_hit_tokens += len(computed_blocks) * self.block_size
        self.pool.touch(computed_blocks)
        new_blocks = computed_blocks + self.pool.allocate(max(num_needed, 0))
        blocks.extend(new_blocks)
        self._cache_full_blocks(req, blocks, num_total)
        return [b.block_id for b in new_blocks]

    def free(self, req: Request) -> None:
        blocks = self.req_blocks.pop(req.request_id, [])
        self._num_cached_blocks.pop(req.request_id, None)
        self.pool.free(reversed(blocks))

    def uncache_from(self, req: Request, num_tokens: int) -> None:
        """Forget the hashes of the request's blocks past its first `num_tokens` tokens: a failed
        step registered them but never wrote their KV."""
        keep = num_tokens // self.block_size
        for block in self.req_blocks.get(req.request_id, [])[keep:]:
            self.pool.uncache(block)
        if self._num_cached_blocks.get(req.request_id, 0) > keep:
            self._num_cached_blocks[req.request_id] = keep

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block, and the hit-rate counters with them (as vLLM does); False,
        and nothing reset, while a request still holds blocks."""
        if not self.pool.reset_prefix_cache():
            return False
        self.prefix_query_tokens = self.prefix_hit_tokens = 0
        return True

    def _cache_full_blocks(self, req: Request, blocks: list[KVBlock], num_tokens: int) -> None:
        if not self.enable_caching:
            return
        bs = self.block_size
        num_full = min(num_tokens, req.num_tokens) // bs
        start = self._num_cached_blocks.get(req.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(req, num_full * bs)
        tokens = req.token_ids_slice(start * bs, num_full * bs)
        for i in range(start, num_full):
            j = (i - start) * bs
            self.pool.cache(blocks[i], hashes[i], tokens[j : j + bs], hashes[i - 1] if i else None)
        self._num_cached_blocks[req.request_id] = num_full

    def _block_hashes(self, req: Request, num_tokens: int) -> list[int]:
        """Extend the request's chained block hashes to cover its first `num_tokens` tokens."""
        bs = self.block_size
        hashes = req.block_hashes
        start, end = len(hashes), num_tokens // bs
        if end > start:
            tokens = req.token_ids_slice(start * bs, end * bs)
            hashes += hash_blocks(hashes[-1] if hashes else None, tokens, bs)
        return hashes
