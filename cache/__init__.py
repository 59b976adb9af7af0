"""KV-cache block pool and allocator, memory accounting (prefix trie and pruning: later issues)."""

from cache.block_pool import BlockPool

__all__ = ["BlockPool"]
