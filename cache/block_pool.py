"""Ref-counted allocator over a fixed pool of KV-cache blocks.

The pool knows block ids only; the tensors that hold K/V live with the model runner on the
device. Every block is in exactly one state:

- free: ref count 0, on the free list, holds nothing anybody will read;
- used: ref count > 0, held by one or more sequences' block tables.

(The prefix-cache issue adds a third state, cached: ref count 0 but its contents kept for reuse.)

Contract: ``allocate`` says "no" with ``None`` and changes nothing; ``free`` takes back exactly
the blocks a holder was given (or ``share``d), tail first, so that when prefix caching arrives
the tail of a prefix is the first thing to be evicted.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take ``num_blocks`` free blocks (ref count 1 each), or ``None`` if there are too few."""
        if num_blocks > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(num_blocks)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Add one holder to blocks that are already in use."""
        for b in blocks:
            if self._ref_counts[b] <= 0:
                raise ValueError(f"block {b} is not in use and cannot be shared")
            self._ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one holder from each block, tail first; blocks nobody holds return to the pool."""
        for b in reversed(blocks):
            count = self._ref_counts[b]
            if count <= 0:
                raise ValueError(f"block {b} freed more often than it was held")
            self._ref_counts[b] = count - 1
            if count == 1:
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def check_integrity(self, holders: list[list[int]] | None = None) -> None:
        """Assert the pool's invariants; with ``holders`` (every live block table), also that
        each block's ref count equals the number of tables that hold it."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b, count in enumerate(self._ref_counts):
            assert count >= 0, f"block {b} has ref count {count}"
            assert (count == 0) == (b in free), f"block {b}: ref count {count}, free={b in free}"
        if holders is not None:
            expected = [0] * self.num_blocks
            for table in holders:
                for b in table:
                    expected[b] += 1
            assert expected == self._ref_counts, "ref counts do not match the block tables"
