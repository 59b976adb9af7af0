"""Ref-counted allocator over a fixed pool of KV-cache blocks.

The pool knows block ids only; the tensors that hold K/V live with the model runner on the
device. Every block is in exactly one state:

- free: ref count 0, on the free list, holds nothing anybody will read;
- used: ref count > 0, held by one or more sequences' block tables;
- cached (prefix caching on): ref count 0, but a full block whose K/V the prefix trie still
  offers for reuse. Cached blocks are handed out again (evicted) only when the free list runs
  dry: least recently freed first, and only trie leaves, so a prefix is evicted from its tail.

Contract: ``allocate`` says "no" with ``None`` and changes nothing; ``free`` takes back exactly
the blocks a holder was given (or ``share``d), tail first, so that the tail of a prefix is the
first thing to be evicted. ``num_free_blocks`` counts what ``allocate`` can hand out: free plus
cached.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from cache.prefix_cache import PrefixTrie, TrieNode


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self.trie = PrefixTrie(block_size) if enable_prefix_cache else None
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks ``allocate`` can hand out: free, plus cached ones it would evict."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - len(self._free) - len(self._cached)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take ``num_blocks`` blocks (ref count 1 each), evicting cached ones if the free list
        is short, or ``None`` (nothing changes) if there are too few."""
        if num_blocks > self.num_free_blocks:
            return None
        if num_blocks > len(self._free):
            self._evict(num_blocks - len(self._free))
        blocks = [self._free.popleft() for _ in range(num_blocks)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Add one holder to blocks that are in use or cached (a prefix-cache hit revives them)."""
        for b in blocks:
            if self._ref_counts[b] == 0:
                if b not in self._cached:
                    raise ValueError(f"block {b} is free and cannot be shared")
                del self._cached[b]
            self._ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one holder from each block, tail first; blocks nobody holds return to the pool."""
        for b in reversed(blocks):
            count = self._ref_counts[b]
            if count <= 0:
                raise ValueError(f"block {b} freed more often than it was held")
            self._ref_counts[b] = count - 1
            if count == 1:
                if self.trie is not None and b in self.trie:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    def _evict(self, num_blocks: int) -> None:
        """Move ``num_blocks`` cached blocks to the free list: least recently freed trie leaves
        first (a parent becomes a leaf once its cached children are gone)."""
        for _ in range(num_blocks):
            victim = next(b for b in self._cached if self.trie.is_leaf(b))
            del self._cached[victim]
            self.trie.remove(victim)
            self._free.append(victim)
            self.num_evictions += 1

    # -- prefix cache ----------------------------------------------------------------------------

    def match_prefix(self, token_ids: list[int], max_blocks: int, namespace: str = "") -> list[TrieNode]:
        """The cached path of full blocks spelling the longest prefix of ``token_ids`` (at most
        ``max_blocks``); the caller ``share``s the blocks it takes. Empty without a trie."""
        if self.trie is None:
            return []
        path = self.trie.match(token_ids, max_blocks, namespace)
        for node in path:  # a hit counts as a use: move cached blocks to the recent end
            if node.block in self._cached:
                self._cached.move_to_end(node.block)
        return path

    def cache_full_blocks(self, node: TrieNode, token_ids: list[int], blocks: list[int], start: int, end: int) -> TrieNode | None:
        """Offer a holder's full blocks ``blocks[start:end]`` (``token_ids``: the tokens of those
        blocks) to the trie, chained under ``node`` (the holder's block ``start - 1``).
        Returns the node of block ``end - 1``, or None when a block turned out to be cached
        already under another id: that block stays private and the holder's chain ends there
        (a holder only extends a path it holds; see ``cache.prefix_cache``)."""
        bs = self.block_size
        for i in range(start, end):
            tokens = tuple(token_ids[(i - start) * bs : (i - start + 1) * bs])
            node, inserted = self.trie.insert(node, tokens, blocks[i])
            if not inserted:
                return None
        return node

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def check_integrity(self, holders: list[list[int]] | None = None) -> None:
        """Assert the pool's invariants (free + used + cached == total, each block in exactly one
        state, cached blocks in the trie, free ones not); with ``holders`` (every live block
        table), also that each block's ref count equals the number of tables that hold it."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert not free & self._cached.keys(), "a block is both free and cached"
        num_used = sum(1 for count in self._ref_counts if count > 0)
        assert len(free) + len(self._cached) + num_used == self.num_blocks, "blocks are not conserved"
        for b, count in enumerate(self._ref_counts):
            assert count >= 0, f"block {b} has ref count {count}"
            idle = b in free or b in self._cached
            assert (count == 0) == idle, f"block {b}: ref count {count}, free={b in free}, cached={b in self._cached}"
            if self.trie is not None:
                assert b not in free or b not in self.trie, f"free block {b} is still in the trie"
                assert b not in self._cached or b in self.trie, f"cached block {b} is not in the trie"
        if self.trie is not None:
            self.trie.check_integrity()
        if holders is not None:
            expected = [0] * self.num_blocks
            for table in holders:
                for b in table:
                    expected[b] += 1
            assert expected == self._ref_counts, "ref counts do not match the block tables"
